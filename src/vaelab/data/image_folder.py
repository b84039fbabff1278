"""The user's own images: every PNG/JPEG under a folder, decoded once into a uint8 cache, held as float tensors.

`vaelab-train data=image_folder data.path=<dir>`. First-level subfolders are the classes (their sorted names are
the labels); images directly in the folder, with no subfolders, all get label 0 and no class names. Names starting
with a dot (hidden files and folders, the cache itself, macOS `._*` files) are skipped.

Each image is converted to grey (`channels: 1`) or RGB (`channels: 3`) and brought to image_size x image_size:
resized so that its shorter side is image_size and centre-cropped (`crop: true`), or resized ignoring the aspect
ratio (`crop: false`); `image_size: null` keeps the images' own size, which must then be one size for all and be
given to the networks as `data.image_shape`.

The images are decoded once, in parallel (one process per core unless `workers` says otherwise), into
`<path>/.vaelab-cache/c<channels>-s<image_size>-<crop|resize>-<hash>.pt` (or, when the folder is not writable, into
`cache_dir`), a vaelab.caches cache; the hash covers every file's name and bytes and the settings that change the
pixels, so a changed folder, file (even one rewritten in place with its size and time kept) or setting decodes anew
(replacing the stale cache of the same settings) and an unchanged one loads the cache. Hashing reads every file at
each start, about a tenth of the time decoding takes (1,000 28x28 PNGs on one idle core: 10 ms against 61 ms).
The labels come from the file names. A file that cannot be read (a dangling symbolic link, a loop of them) stops the
run in one line naming it, as an image that cannot be decoded does. Training itself does no per-image Python work.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vaelab import caches
from vaelab.data.tensors import TensorData, seeded_order
from vaelab.errors import UserError, one_line, show

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg")  # compared in lower case
CACHE_FOLDER = ".vaelab-cache"
# version 2: keyed by the files' bytes, holding the images alone (version 1: keyed by names, sizes and times)
CACHE = caches.Cache("image_folder", 2, log, "data: the image cache", "decoding the images again")
GIB = 1024**3


def find_images(root: Path) -> list[str]:
    """The relative POSIX paths of every PNG/JPEG under root, sorted; hidden files and folders are skipped.
    (Plain strings: pathlib's per-file overhead was most of a cached start-up of 10,000 images.)"""
    found, top = [], str(root)
    for folder, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = os.path.relpath(folder, top)
        prefix = "" if base == "." else base.replace(os.sep, "/") + "/"
        found.extend(prefix + f for f in files if not f.startswith(".") and f.lower().endswith(EXTENSIONS))
    return sorted(found)


def label_files(files: list[str]) -> tuple[torch.Tensor, list[str] | None]:
    """Labels from the first-level subfolders (sorted names), or all 0 (and no classes) when there are none."""
    tops = [f.split("/", 1)[0] if "/" in f else None for f in files]
    if all(t is None for t in tops):
        return torch.zeros(len(files), dtype=torch.int64), None
    classes = sorted({t for t in tops if t is not None})
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[t] for t in tops], dtype=torch.int64), classes


def _size(n: int) -> str:
    if n >= GIB // 10:
        return f"{n / GIB:.1f} GiB"
    return f"{n / 1024**2:.1f} MiB" if n >= 1024**2 else f"{n} bytes"


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _to_array(image, channels: int, image_size: int | None, crop: bool) -> np.ndarray:
    """One opened PIL image as uint8 [C, H, W], converted and sized as asked."""
    from PIL import Image, ImageOps

    mode = "L" if channels == 1 else "RGB"
    if image_size is not None and image.format == "JPEG":
        image.draft(mode, (image_size, image_size))  # decode a large JPEG at a reduced scale (still >= image_size)
    image = ImageOps.exif_transpose(image)  # photos stored sideways with an orientation tag
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey: keep the top 8 bits (convert would clip)
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    image = image.convert(mode)
    if image_size is not None:
        size = (image_size, image_size)
        if crop:
            image = ImageOps.fit(image, size, method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
        elif image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_chunk(
    root: str, files: list[str], channels: int, image_size: int | None, crop: bool
) -> tuple[np.ndarray | None, list[tuple[int, int]], list[tuple[str, str]]]:
    """Decode some files (in a worker process): (their images stacked as uint8 [k, C, H, W], or None when they are
    not all one size or some failed; each image's (height, width); (file, reason) for each one PIL cannot decode)."""
    from PIL import Image

    arrays, sizes, failures = [], [], []
    for name in files:
        try:
            with Image.open(os.path.join(root, name)) as image:
                array = _to_array(image, channels, image_size, crop)
        except Exception as err:  # PIL raises many types for a broken file (OSError, SyntaxError, ValueError, ...)
            failures.append((name, f"{type(err).__name__}: {one_line(err)[:200]}"))
            sizes.append((0, 0))
            continue
        arrays.append(array)
        sizes.append(tuple(array.shape[1:]))
    same = not failures and len({a.shape for a in arrays}) <= 1
    return (np.stack(arrays) if same and arrays else None), sizes, failures


def settings_prefix(channels: int, image_size: int | None, crop: bool) -> str:
    return f"c{channels}-s{image_size or 'own'}-{'crop' if crop else 'resize'}-"


def write_cache(path: Path, data: bytes, stale_prefix: str) -> None:
    """One cache file (CACHE.pack's bytes), whole or not at all; then the caches of the same settings for an
    earlier state of the folder are removed (the folder changed: they can never be used again)."""
    CACHE.write(path, data)
    for old in path.parent.glob(f"{stale_prefix}*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
            log.info("data: removed the stale image cache %s", old)


class ImageFolder(TensorData):
    """Every PNG/JPEG under `path` (recursively), labelled by first-level subfolder, split with a fixed seed."""

    def __init__(
        self,
        path: str,
        data_dir: str = "data",
        cache_dir: str | None = None,
        channels: int = 1,
        image_size: int | None = 28,
        crop: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        workers: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        seed: int = 0,
        binarize: str = "none",
        image_shape: tuple[int, int, int] = (1, 28, 28),
        dataset: str = "ImageFolder",
    ):
        super().__init__(batch_size, eval_batch_size, seed, binarize, tuple(image_shape), split_seed)
        # Each setting alone is checked by its declaration (vaelab.runs.settings) before the run starts; here the two together.
        if val_fraction + test_fraction >= 1:
            raise UserError(
                f"data.val_fraction={show(val_fraction)} and data.test_fraction={show(test_fraction)} leave no training "
                "images: make them sum to less than 1, e.g. 0.1 each"
            )
        shape = list(self.image_shape)
        if image_size is not None:
            if shape != [channels, image_size, image_size]:
                raise UserError(
                    f"data.image_shape={show(shape)} does not match data.channels={channels} and data.image_size={image_size}: "
                    f"set data.image_shape=[{channels},{image_size},{image_size}] (its default follows those two settings)"
                )
        elif not (len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape) and shape[0] == channels):
            raise UserError(
                f"data.image_size=null keeps the images' own size, which the networks must know, but data.image_shape={show(shape)}: "
                f"give it as data.image_shape=[{channels},<height>,<width>], or set data.image_size=<side> to resize the images"
            )
        self.path, self.data_dir, self.cache_dir, self.dataset = path, data_dir, cache_dir, dataset
        self.channels, self.image_size, self.crop = channels, image_size, bool(crop)
        self.val_fraction, self.test_fraction, self.workers = val_fraction, test_fraction, workers
        self._decoded: tuple[torch.Tensor, torch.Tensor, list[str] | None] | None = None

    # -- where things are

    def root(self) -> Path:
        root = Path(self.path).expanduser()
        if not root.exists():
            raise UserError(f"data.path={self.path}: no such folder; point data.path at the folder holding your images")
        if not root.is_dir():
            raise UserError(f"data.path={self.path} is a file, not a folder; point data.path at the folder holding your images")
        return root

    def cache_paths(self, root: Path, name: str) -> list[Path]:
        """Where the cache may be: beside the data first, then under cache_dir (default <data_dir>/image_folder), in a
        folder of this data.path's own (a hash of it), so that replacing a stale cache never touches another folder's."""
        base = Path(self.cache_dir).expanduser() if self.cache_dir is not None else Path(self.data_dir) / "image_folder"
        return [root / CACHE_FOLDER / name, base / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16] / name]

    # -- the one-off work

    def prepare_data(self) -> None:
        """Decode (or load the cache) once, on one process: under DDP the other ranks then load the cache."""
        if self.train_set is None:  # trainer.test after trainer.fit calls this again: the tensors are there
            self.decoded()

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
        """(uint8 images [N, C, H, W], int64 labels, class names): the labels from the file names, the images from
        the cache or decoded and cached."""
        if self._decoded is not None:
            return self._decoded
        root = self.root()
        files = find_images(root)
        if not files:
            raise UserError(
                f"data.path={self.path} holds no images (looked for {', '.join(EXTENSIONS)} in any case, in all subfolders); "
                "put your PNG or JPEG files there, or in one subfolder per class"
            )
        self.split_sizes(len(files))
        self.check_memory(len(files))
        key = caches.files_key(root, files, CACHE.name, self.channels, self.image_size, self.crop)
        paths = self.cache_paths(root, f"{settings_prefix(self.channels, self.image_size, self.crop)}{key[:20]}.pt")
        schema = {"images": caches.Tensor(torch.uint8, (len(files), *self.image_shape))}
        for path in paths:
            cached = CACHE.read(path, key, schema)
            if cached is not None:
                log.info("data: %d images from the cache %s", len(files), path)
                images = cached["images"]
                break
        else:
            images = self.decode(root, files)
            self.check_shape(images)
            self.store(paths, CACHE.pack(key, {"images": images}), len(files))
        self._decoded = (images, *label_files(files))
        return self._decoded

    def store(self, paths: list[Path], packed: bytes, n: int) -> None:
        """The cache into the first of paths that can be written; one line when none can."""
        errors = []
        for path in paths:
            try:
                write_cache(path, packed, settings_prefix(self.channels, self.image_size, self.crop))
            except OSError as err:
                errors.append(f"{path} ({err.strerror or err})")
                continue
            log.info("data: %d images decoded into the cache %s", n, path)
            return
        raise UserError(
            f"cannot write the image cache to {errors[0]} nor to {errors[1]}: choose a writable folder with data.cache_dir=<dir>"
        )

    def decode(self, root: Path, files: list[str]) -> torch.Tensor:
        """Every file as uint8 [N, C, H, W], in worker processes over chunks of files; each fault as one line."""
        n = len(files)
        workers = max(1, min(self.workers or os.cpu_count() or 1, n))
        per_chunk = max(1, min(256, math.ceil(n / (workers * 4))))
        chunks = [files[i : i + per_chunk] for i in range(0, n, per_chunk)]
        c, h, w = self.image_shape
        images = torch.empty((n, c, h, w), dtype=torch.uint8)
        sizes: list[tuple[int, int]] = []
        failures: list[tuple[str, str]] = []
        mismatched = []
        log.info("data: decoding %d images from %s with %d worker(s)", n, root, workers)
        args = (str(root), self.channels, self.image_size, self.crop)
        if workers == 1 or len(chunks) == 1:
            results = (decode_chunk(args[0], chunk, *args[1:]) for chunk in chunks)
            self._collect(results, chunks, images, sizes, failures, mismatched)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(decode_chunk, args[0], chunk, *args[1:]) for chunk in chunks]
                self._collect((f.result() for f in futures), chunks, images, sizes, failures, mismatched)
        if failures:
            name, reason = failures[0]
            more = f" ({len(failures)} files in all cannot be decoded)" if len(failures) > 1 else ""
            raise UserError(f"{root / name}: not a readable image ({reason}){more}; delete or fix it, then run again")
        if len(set(sizes)) > 1:
            first = sizes[0]
            other = next(i for i, s in enumerate(sizes) if s != first)
            raise UserError(
                f"the images differ in size, e.g. {root / files[0]} is {first[1]}x{first[0]} and {root / files[other]} is "
                f"{sizes[other][1]}x{sizes[other][0]} (width x height); set data.image_size=<side> to bring them all to one size"
            )
        if mismatched:
            self.check_shape(torch.empty((n, c, *sizes[0]), dtype=torch.uint8))
        return images

    @staticmethod
    def _collect(results, chunks, images, sizes, failures, mismatched) -> None:
        start = 0
        for chunk, (array, chunk_sizes, chunk_failures) in zip(chunks, results):
            sizes.extend(chunk_sizes)
            failures.extend(chunk_failures)
            if array is not None and tuple(array.shape[1:]) == tuple(images.shape[1:]):
                images[start : start + len(chunk)] = torch.from_numpy(array)
            elif array is not None:
                mismatched.append(start)
            start += len(chunk)

    def check_shape(self, images: torch.Tensor) -> None:
        """TensorData's check, with the fix for a folder: the setting that resizes the images."""
        shape = tuple(images.shape[1:])
        if shape != tuple(self.image_shape):
            raise UserError(
                f"the images in {self.path} are {shape[2]}x{shape[1]} (width x height) with {shape[0]} channel(s), but "
                f"data.image_shape={show(list(self.image_shape))}: set data.image_shape=[{shape[0]},{shape[1]},{shape[2]}], "
                "or set data.image_size=<side> to resize them"
            )

    def split_sizes(self, n: int) -> tuple[int, int, int]:
        """(train, val, test) counts; each must be at least 1."""
        n_val, n_test = round(n * self.val_fraction), round(n * self.test_fraction)
        n_train = n - n_val - n_test
        if min(n_train, n_val, n_test) < 1:
            raise UserError(
                f"{n} images in data.path={self.path} split into {n_train} for training, {n_val} for validation and {n_test} "
                f"for testing (data.val_fraction={show(self.val_fraction)}, data.test_fraction={show(self.test_fraction)}): "
                "each needs at least one image; add images or change the fractions"
            )
        return n_train, n_val, n_test

    def check_memory(self, n: int) -> None:
        """Refuse, before decoding, a folder whose float32 images (plus their uint8 copy) do not fit in memory."""
        available = memory_available()
        c, h, w = self.image_shape
        need = n * c * h * w * 5
        if available is None or need <= available:
            return
        fit = math.isqrt(max(available // (n * c * 5), 0))
        hint = f"e.g. data.image_size={fit}" if fit >= 1 else "or use fewer images"
        raise UserError(
            f"{n} images at {c}x{h}x{w} need {_size(need)} of memory (float32 plus a uint8 copy) but "
            f"{_size(available)} are available: choose a smaller data.image_size ({hint})"
        )

    # -- what training sees

    def class_names(self) -> list[str] | None:
        """The first-level subfolders' names (None for a folder of images alone)."""
        if self.train_set is not None:
            return self.classes
        return self.decoded()[2]  # decoded (or read from the cache) once: load() then takes the same tensors

    def load(self):
        images, labels, classes = self.decoded()
        self.classes = classes
        n_train, n_val, _ = self.split_sizes(len(images))
        order = seeded_order(len(images), self.split_seed)
        parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
        splits = tuple((images[idx].to(torch.float32).div_(255.0), labels[idx]) for idx in parts)
        self._decoded = None  # the float tensors are kept by TensorData; the uint8 copy can go
        return splits
