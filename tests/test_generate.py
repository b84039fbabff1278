"""vaelab-generate from the shell and its interpolation rows (the checkpoint loader's refusals: test_checkpoints)."""

import torch
from PIL import Image

from conftest import run_cli
from vaelab.callbacks import interpolation_rows
from vaelab.checkpoints import load_vae


def only_run_dir(root):
    [run_dir] = list((root / "outputs" / "generate").glob("*/*"))  # its own run directory: outputs/generate/<date>/<time>
    return run_dir


def test_vaelab_generate_writes_seeded_grids(tmp_path, trained_run):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    run_cli(
        f"ckpt_path={ckpt}",
        f"paths.root_dir={tmp_path / 'a'}",
        "num_samples=10",
        "temperature=0.8",
        "interpolate=true",
        "num_pairs=3",
        "num_steps=5",
        tool="vaelab-generate",
    )
    run_a = only_run_dir(tmp_path / "a")
    # make_grid: tiles of 28 + 2 padding, plus 2; samples: ceil(sqrt(10)) = 4 per row, 3 rows
    with Image.open(run_a / "samples.png") as png:
        assert png.size == (4 * 30 + 2, 3 * 30 + 2)
    # interpolation: per row the two test images around num_steps decoded points; one row per pair
    with Image.open(run_a / "interpolation.png") as png:
        assert png.size == ((5 + 2) * 30 + 2, 3 * 30 + 2)
    run_cli(
        f"ckpt_path={ckpt}",
        f"paths.root_dir={tmp_path / 'b'}",
        "num_samples=10",
        "temperature=0.8",
        "nrow=5",
        tool="vaelab-generate",
    )
    run_b = only_run_dir(tmp_path / "b")
    assert not (run_b / "interpolation.png").exists()
    with Image.open(run_a / "samples.png") as a, Image.open(run_b / "samples.png") as b:
        assert b.size == (5 * 30 + 2, 2 * 30 + 2)
        # the same seed: the same ten samples, laid out differently
        tiles = lambda img, per_row: [
            img.crop(
                (2 + 30 * (i % per_row), 2 + 30 * (i // per_row), 30 * (i % per_row) + 30, 30 * (i // per_row) + 30)
            ).tobytes()
            for i in range(10)
        ]
        assert tiles(a.convert("L"), 4) == tiles(b.convert("L"), 5)
        assert len(set(tiles(a.convert("L"), 4))) == 10  # and they differ from one another


def test_interpolation_rows_run_from_one_image_to_the_other(trained_run):
    vae = load_vae(trained_run / "checkpoints" / "last.ckpt")
    torch.manual_seed(0)
    start, end = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    rows = interpolation_rows(vae, start, end, num_steps=4).view(2, 6, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rows[:, 0], start) and torch.equal(rows[:, -1], end)
        assert torch.allclose(rows[:, 1], torch.sigmoid(vae.decode(vae.encode(start)[0])), atol=1e-6)
        assert torch.allclose(rows[:, 4], torch.sigmoid(vae.decode(vae.encode(end)[0])), atol=1e-6)
        midpoint = (vae.encode(start)[0] * 2 + vae.encode(end)[0]) / 3  # step 1 of 0..3
        assert torch.allclose(rows[:, 2], torch.sigmoid(vae.decode(midpoint)), atol=1e-5)


def test_vaelab_generate_fails_in_one_line_on_a_truncated_checkpoint(tmp_path, trained_run):
    truncated = tmp_path / "last.ckpt"
    truncated.write_bytes((trained_run / "checkpoints" / "last.ckpt").read_bytes()[:4096])
    proc = run_cli(f"ckpt_path={truncated}", f"paths.root_dir={tmp_path}", tool="vaelab-generate", check=False)
    assert proc.returncode != 0
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"vaelab-generate: error: ckpt_path={truncated}: {truncated} (4096 bytes): it is truncated or damaged")
    assert not list(tmp_path.rglob("*.png"))


def test_vaelab_generate_draws_colour_grids_at_the_image_size(tmp_path, rgb_run):
    import numpy as np

    from conftest import rgb_data

    run, folder = rgb_run
    out = tmp_path / "generate"
    run_cli(
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        *rgb_data(folder),
        "num_samples=10",
        "interpolate=true",
        "num_pairs=3",
        "num_steps=5",
        f"hydra.run.dir={out}",
        tool="vaelab-generate",
    )
    # make_grid: tiles of 32 + 2 padding, plus 2; samples: 4 per row, 3 rows; interpolation: 5 + 2 per row, 3 rows
    for name, size in (("samples.png", (4 * 34 + 2, 3 * 34 + 2)), ("interpolation.png", (7 * 34 + 2, 3 * 34 + 2))):
        with Image.open(out / name) as png:
            assert png.mode == "RGB" and png.size == size, name
            pixels = np.asarray(png, dtype=np.float32)[2:34, 2:34] / 255  # the first tile
        assert np.abs(pixels[..., 0] - pixels[..., 1]).mean() > 0.01 or np.abs(pixels[..., 1] - pixels[..., 2]).mean() > 0.01
