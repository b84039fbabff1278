"""Start-up of data=image_folder on 10,000 PNG images: the first run (every image decoded, in worker processes,
into the uint8 cache) against the second (the cache loaded), timed around the data module's prepare_data + setup.

    .venv/bin/python benchmarks/image_folder_cache.py [--kind fashion|shapes] [--count 10000] [--repeats 3]

--kind fashion: Fashion-MNIST test images written as 28x28 grey PNGs in one folder per class (data.image_size=28);
--kind shapes: coloured shapes drawn as 128x128 RGB PNGs, brought to 64x64 (data.channels=3 data.image_size=64), a
folder of photos in miniature. The folder is written once into a temporary directory (or --folder). Each figure is
the fastest of --repeats; "decode" runs start with no cache (it is deleted), "cache" runs find it. The files are in
the OS page cache in every run (they were just written or read), so the decode figures are the decoding itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vaelab.data.image_folder import CACHE_FOLDER, ImageFolder


def write_fashion(root: Path, count: int) -> dict:
    from vaelab.data.mnist import MNISTLike

    dm = MNISTLike(data_dir=os.environ.get("VAELAB_DATA_DIR", "data"))
    dm.setup()
    images, labels = dm.test_set
    pixels = images.mul(255).round().byte().numpy()
    for i in range(count):
        k = i % len(pixels)
        folder = root / dm.classes[int(labels[k])].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[k, 0], "L").save(folder / f"{i:05d}.png")
    return {"channels": 1, "image_size": 28}


def write_shapes(root: Path, count: int, side: int = 128) -> dict:
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
    for i in range(count):
        name = list(colours)[i % 3]
        image = Image.fromarray(rng.integers(0, 60, (side, side, 3), dtype=np.uint8), "RGB")  # noise: PNG works for it
        r = int(rng.integers(side // 6, side // 3))
        x, y = (int(v) for v in rng.integers(r, side - r, 2))
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=colours[name])
        (root / name).mkdir(parents=True, exist_ok=True)
        image.save(root / name / f"{i:05d}.png")
    return {"channels": 3, "image_size": 64}


def start_up(root: Path, settings: dict, workers: int | None, data_dir: Path) -> float:
    """Seconds from a new data module to its three splits in memory (what vaelab-train waits for before training)."""
    c, s = settings["channels"], settings["image_size"]
    start = time.perf_counter()
    dm = ImageFolder(path=str(root), data_dir=str(data_dir), workers=workers, image_shape=(c, s, s), **settings)
    dm.prepare_data()
    dm.setup("fit")
    seconds = time.perf_counter() - start
    assert sum(len(split[0]) for split in (dm.train_set, dm.val_set, dm.test_set)) == len(list(root.rglob("*.png")))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("fashion", "shapes"), default="fashion")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="where to write the images (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or Path(tmp) / "images"
        started = time.perf_counter()
        settings = (write_fashion if args.kind == "fashion" else write_shapes)(root, args.count)
        size = sum(p.stat().st_size for p in root.rglob("*.png"))
        print(f"{args.count} PNG files ({args.kind}, {size / 2**20:.1f} MiB) written in {time.perf_counter() - started:.1f} s")
        print(f"settings: {settings}; {os.cpu_count()} CPU cores")
        cores = os.cpu_count() or 1
        results = {}
        for label, workers, cached in (
            ("decode, 1 worker", 1, False),
            (f"decode, {cores} workers", None, False),
            ("cache", None, True),
        ):
            times = []
            for _ in range(args.repeats):
                if not cached:
                    shutil.rmtree(root / CACHE_FOLDER, ignore_errors=True)
                times.append(start_up(root, settings, workers, Path(tmp) / "data"))
            results[label] = min(times)
            print(f"{label:>20}: {min(times):6.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})")
        (cache,) = (root / CACHE_FOLDER).glob("*.pt")
        print(f"cache {cache.name}: {cache.stat().st_size / 2**20:.1f} MiB")
        decode = results[f"decode, {cores} workers"]
        print(
            f"first run / second run: {decode / results['cache']:.1f}x; 1 worker / {cores}: {results['decode, 1 worker'] / decode:.2f}x"
        )


if __name__ == "__main__":
    main()
