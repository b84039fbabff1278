"""resume_from's command-line rewrite and the checkpoint checks, in-process (the shell runs: test_reliability)."""

import zipfile
from pathlib import Path

import pytest
import torch

from vaelab.resume import ResumeError, read_checkpoint, resume_argv, resume_point, saved_config


def fake_run(root: Path, checkpoint: bool = True) -> Path:
    """A run directory as vaelab-train leaves it (the parts resuming reads)."""
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "config.yaml").write_text("latent_dim: 16\n")
    (root / ".hydra" / "overrides.yaml").write_text("- latent_dim=16\n- epochs=3\n")
    if checkpoint:
        (root / "checkpoints").mkdir()
        (root / "checkpoints" / "last.ckpt").write_bytes(b"")
    return root


def test_without_resume_from_the_command_line_is_untouched():
    argv = ["vaelab-train", "latent_dim=3", "-m", "lr=1,2"]
    assert resume_argv(argv) is argv
    assert resume_argv(["vaelab-train", "resume_from=null", "lr=1"]) == ["vaelab-train", "lr=1"]


def test_resume_from_becomes_the_runs_config_dir_and_last_checkpoint(tmp_path):
    run = fake_run(tmp_path / "run")
    argv = resume_argv(["vaelab-train", f"resume_from={run}", "trainer.max_epochs=5"])
    assert argv[:5] == ["vaelab-train", "--config-dir", str(run / ".hydra"), "--config-name", "config"]
    assert argv[5] == f"hydra.run.dir='{run}'"
    assert argv[6].startswith("hydra.output_subdir='.hydra/resume-")
    assert argv[7:] == ["ckpt_path=last", "trainer.max_epochs=5"]
    # a later resume uses the config the run last ran with
    (run / ".hydra" / "resume-2026-01-01_00-00-00").mkdir()
    (run / ".hydra" / "resume-2026-01-01_00-00-00" / "config.yaml").write_text("latent_dim: 16\n")
    assert saved_config(run) == run / ".hydra" / "resume-2026-01-01_00-00-00" / "config.yaml"


@pytest.mark.parametrize("extra", ["-m", "hydra.run.dir=/elsewhere", "--config-name=other"])
def test_resume_from_refuses_options_that_point_elsewhere(tmp_path, extra):
    run = fake_run(tmp_path / "run")
    with pytest.raises(ResumeError, match=f"cannot be combined with {extra}"):
        resume_argv(["vaelab-train", f"resume_from={run}", extra])


def test_resume_from_a_run_without_checkpoint_says_how_to_start_again(tmp_path):
    run = fake_run(tmp_path / "run", checkpoint=False)
    with pytest.raises(ResumeError, match=r"nothing to continue from, .*last.ckpt does not exist .* "
                                          r"start it again: vaelab-train latent_dim=16 epochs=3$"):
        resume_argv(["vaelab-train", f"resume_from={run}"])


def test_resume_from_something_that_is_not_a_run(tmp_path):
    with pytest.raises(ResumeError, match="no such directory"):
        resume_argv(["vaelab-train", f"resume_from={tmp_path / 'missing'}"])
    with pytest.raises(ResumeError, match=r"not a vaelab-train run directory \(it has no .hydra/config.yaml\)"):
        resume_argv(["vaelab-train", f"resume_from={tmp_path}"])


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory) -> Path:
    """A real Lightning training checkpoint: one epoch of the VAE on a few batches of Fashion-MNIST."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from conftest import DATA_DIR, REPO
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    folder = tmp_path_factory.mktemp("ckpt")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={folder}", f"paths.data_dir={DATA_DIR}", "latent_dim=4"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        model = instantiate(cfg.model)
        data = instantiate(cfg.data, batch_size=64)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=folder,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)])
    trainer.fit(model, datamodule=data)
    return folder / "last.ckpt"  # written at the end of epoch 0, as in a run


def test_a_whole_checkpoint_reads(training_checkpoint):
    checkpoint = read_checkpoint(training_checkpoint, "ckpt_path=x")
    assert checkpoint["global_step"] == 3 and checkpoint["epoch"] == 0
    assert zipfile.ZipFile(training_checkpoint).testzip() is None  # torch writes the zip's CRCs


@pytest.mark.parametrize("damage,reason", [
    (lambda raw: raw[:-1], "BadZipFile: File is not a zip file"),                          # truncated by one byte
    (lambda raw: raw[: len(raw) // 2], "BadZipFile: File is not a zip file"),
    # one byte of the weights flipped: torch.load alone would read it without complaint
    (lambda raw: raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF]) + raw[len(raw) // 2 + 1:], "fails its CRC check"),
    (lambda raw: b"not a checkpoint", "BadZipFile"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_others(tmp_path, training_checkpoint, damage, reason):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(damage(training_checkpoint.read_bytes()))
    (tmp_path / "best-epoch000.ckpt").write_bytes(training_checkpoint.read_bytes())
    with pytest.raises(ResumeError) as err:
        read_checkpoint(bad, "ckpt_path=last")
    message = str(err.value)
    assert message.startswith(f"ckpt_path=last: {bad} (") and "is truncated or damaged" in message and reason in message
    assert message.endswith(f"the run's other checkpoints: best-epoch000.ckpt in {tmp_path}")


def test_a_weights_only_file_cannot_continue_training(tmp_path, training_checkpoint):
    weights = tmp_path / "weights.ckpt"
    torch.save({"state_dict": torch.load(training_checkpoint, weights_only=True)["state_dict"]}, weights)
    with pytest.raises(ResumeError, match=r"holds no training state \(optimizer and loop counters\)"):
        read_checkpoint(weights, "ckpt_path=x")


def test_ckpt_path_last_is_this_run_directorys_last_checkpoint(compose, tmp_path, training_checkpoint):
    cfg = compose(["ckpt_path=last"])
    with pytest.raises(ResumeError, match=r"ckpt_path=last: there is no .*/run/checkpoints/last.ckpt\. .* resume_from=<run dir>"):
        resume_point(cfg)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(training_checkpoint.read_bytes())
    point = resume_point(cfg)
    assert point.path == tmp_path / "run" / "checkpoints" / "last.ckpt" and point.epoch == 0 and point.step == 3
    assert resume_point(compose([])) is None
    with pytest.raises(ResumeError, match="is a directory"):
        resume_point(compose([f"ckpt_path={tmp_path}"]))
