"""vaelab-generate from the shell and its interpolation rows (the checkpoint loader's refusals: test_checkpoints)."""

import re

import pytest
import torch
from PIL import Image

from conftest import run_cli
from vaelab.commands.generate import class_index
from vaelab.errors import UserError
from vaelab.model.latent import interpolation_rows
from vaelab.runs.checkpoints import load_vae


def only_run_dir(root):
    [run_dir] = list((root / "outputs" / "generate").glob("*/*"))  # its own run directory: outputs/generate/<date>/<time>
    return run_dir


def test_vaelab_generate_writes_seeded_grids(tmp_path, trained_run):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    proc = run_cli(
        f"ckpt_path={ckpt}",
        f"paths.root_dir={tmp_path / 'a'}",
        "threads=1",  # as in every command (vaelab-generate refused it: there was no such setting)
        "num_samples=10",
        "temperature=0.8",
        "interpolate=true",
        "num_pairs=3",
        "num_steps=5",
        tool="vaelab-generate",
    )
    run_a = only_run_dir(tmp_path / "a")
    # its progress, as plain lines (stderr is no terminal here): the pictures started, then done with the seconds
    assert "][INFO] - samples.png, interpolation.png: 2 pictures ...\n" in proc.stdout
    assert re.search(r"\]\[INFO\] - samples.png, interpolation.png: done in \d+\.\d s\n", proc.stdout)
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


FASHION = "0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot"


def test_vaelab_generate_label_writes_samples_of_that_class(tmp_path, conditional_run):
    """label=sandal (a name in any case) and label=7 (an index: Sneaker) write samples of that class: the images the
    model decodes from the same seeded z with that label; a bad label lists the valid ones in one line."""
    from torchvision.utils import make_grid

    ckpt = conditional_run / "checkpoints" / "last.ckpt"
    vae = load_vae(ckpt)
    for label, index in (("sandal", 5), ("7", 7)):
        out = tmp_path / label
        run_cli(f"ckpt_path={ckpt}", f"label={label}", "num_samples=16", f"hydra.run.dir={out}", tool="vaelab-generate")
        samples = vae.sample(16, generator=torch.Generator().manual_seed(0), labels=torch.full((16,), index))
        expected = make_grid(samples, nrow=4, padding=2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)[0]
        with Image.open(out / "samples.png") as png:
            assert png.convert("L").tobytes() == expected.numpy().tobytes(), label
    proc = run_cli(f"ckpt_path={ckpt}", "label=Sandle", f"hydra.run.dir={tmp_path / 'bad'}", tool="vaelab-generate", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "vaelab-generate: error: label=Sandle is not a class of this checkpoint's model: give a name (any case) or an "
        f"index: {FASHION}"
    ]
    assert not list((tmp_path / "bad").glob("*.png"))


def test_class_index_takes_a_name_in_any_case_or_an_index_and_refuses_the_rest():
    names = FASHION.split(", ")
    names = [name.split(" ", 1)[1] for name in names]
    assert class_index("SANDAL", names, "x.ckpt") == class_index(" 5", names, "x.ckpt") == 5
    assert class_index("ankle boot", names, "x.ckpt") == 9
    for bad in ("10", "-1", "boot", ""):
        with pytest.raises(UserError, match=f"label={bad} is not a class of this checkpoint's model: .*9 Ankle boot$"):
            class_index(bad, names, "x.ckpt")


def test_vaelab_generate_label_on_an_unconditional_checkpoint_is_one_line(tmp_path, trained_run):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    proc = run_cli(f"ckpt_path={ckpt}", "label=Sandal", f"hydra.run.dir={tmp_path}", tool="vaelab-generate", check=False)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line == (
        f"vaelab-generate: error: label=Sandal: the checkpoint {ckpt} is of an unconditional VAE, which takes no label; "
        "drop label=, or train a conditional one with vaelab-train model.conditional=true"
    )
    assert not list(tmp_path.glob("*.png"))


def test_conditional_interpolation_rows_mix_the_two_labels_along_the_path(conditional_run):
    """Each end is the reconstruction of its image under its own label; in between, the one-hot labels are mixed."""
    vae = load_vae(conditional_run / "checkpoints" / "last.ckpt")
    torch.manual_seed(0)
    start, end, a, b = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28), torch.tensor([5, 1]), torch.tensor([7, 8])
    rows = interpolation_rows(vae, start, end, 3, start_labels=a, end_labels=b).view(2, 5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(rows[:, 1], vae.decode_mean(vae.encode(start, a)[0], a), atol=1e-6)
        assert torch.allclose(rows[:, 3], vae.decode_mean(vae.encode(end, b)[0], b), atol=1e-6)
        middle = (vae.encode(start, a)[0] + vae.encode(end, b)[0]) / 2
        mixed = (torch.nn.functional.one_hot(a, 10) + torch.nn.functional.one_hot(b, 10)).float() / 2
        assert torch.allclose(rows[:, 2], vae.decode_mean(middle, mixed), atol=1e-5)
