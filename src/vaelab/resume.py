"""Continuing an interrupted run, from its last epoch-end checkpoint, into the same run directory.

    vaelab-train resume_from=<run dir>                      # the run's own saved config, directory and last.ckpt
    vaelab-train <its overrides> hydra.run.dir=<run dir> ckpt_path=last   # or ckpt_path=<a .ckpt file>

The resumed run restores the weights, the optimizer state and the epoch and step counters, and replays the
interrupted epoch from its start (data order and noise are functions of seed and epoch; see
reliability.Resumable). It logs into the same tensorboard/ folder, and its event writer starts with
purge_step=<the first step the killed run logged after its checkpoint>: TensorBoard drops those events, the
resumed run logs those steps again, and each step appears once. (Not simply the checkpoint's step: the
pictures of the checkpointed epoch are logged at that very step, just before the checkpoint is written.)
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vaelab.validate import UserError, check_output_dir

RESUME_KEY = "resume_from="
# Hydra options that would point the resumed run at another config or directory.
CONFLICTING = ("-m", "--multirun", "-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "hydra.run.dir=")


class ResumeError(UserError, ValueError):
    """A run or checkpoint that cannot be continued; the message says which and what to do instead."""


def saved_config(run_dir: Path) -> Path | None:
    """The config the run last ran with: its latest resume's, else the original .hydra/config.yaml."""
    resumes = sorted((run_dir / ".hydra").glob("resume-*/config.yaml"))
    original = run_dir / ".hydra" / "config.yaml"
    return resumes[-1] if resumes else original if original.exists() else None


def _quoted(value: str) -> str:
    """A Hydra override value in single quotes, so any path survives Hydra's override parser."""
    return "'" + value.replace("'", "\\'") + "'"


def resume_argv(argv: list[str]) -> list[str]:
    """Rewrite `vaelab-train resume_from=<run dir> [overrides]` into the Hydra command line that continues it.

    The run's saved config becomes the primary config (so exactly its settings are used, whatever conf/ holds
    now), its directory the run directory, and ckpt_path=last its checkpoints/last.ckpt. Extra overrides
    still apply (e.g. trainer.max_epochs=20 to train further). Hydra records this resume's config and
    overrides in .hydra/resume-<time>/, leaving the run's original .hydra/ files as they were.
    """
    prog, args = argv[0], argv[1:]
    given = [a for a in args if a.startswith(RESUME_KEY)]
    if not given:
        return argv
    value = given[-1][len(RESUME_KEY):].strip().strip("'\"")
    rest = [a for a in args if not a.startswith(RESUME_KEY)]
    if value in ("", "null"):
        return [prog, *rest]
    conflict = next((a for a in rest if a.split("=")[0] in CONFLICTING or a.startswith(CONFLICTING[-1])), None)
    if conflict:
        raise ResumeError(f"resume_from={value} cannot be combined with {conflict}: it continues one run, "
                          f"in its own directory with its own saved config")
    run_dir = Path(os.path.abspath(value))
    if not run_dir.is_dir():
        raise ResumeError(f"resume_from={value}: no such directory; pass a run directory of vaelab-train, "
                          f"e.g. resume_from=outputs/<date>/<time>")
    config = saved_config(run_dir)
    if config is None:
        raise ResumeError(f"resume_from={value}: {run_dir} is not a vaelab-train run directory (it has no .hydra/config.yaml)")
    if not (run_dir / "checkpoints" / "last.ckpt").exists():
        overrides = run_dir / ".hydra" / "overrides.yaml"
        again = " ".join(OmegaConf.load(overrides)) if overrides.exists() else ""
        raise ResumeError(f"resume_from={value}: nothing to continue from, {run_dir / 'checkpoints' / 'last.ckpt'} does not "
                          f"exist (it is written at the end of every epoch, and this run stopped before its first ended); "
                          f"start it again: vaelab-train {again}".rstrip())
    check_output_dir(run_dir, "resume a copy of it in a writable place")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    ckpt = [] if any(a.startswith("ckpt_path=") for a in rest) else ["ckpt_path=last"]
    return [prog, "--config-dir", str(config.parent), "--config-name", "config",
            f"hydra.run.dir={_quoted(str(run_dir))}", f"hydra.output_subdir={_quoted(f'.hydra/resume-{stamp}')}",
            *ckpt, *rest]


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    epoch: int                # the epoch the checkpoint ended (0-based)
    step: int                 # optimizer steps done: the first TensorBoard step the resumed run writes
    saved_at: float | None    # when the checkpoint was written (time.time(); reliability.Resumable records it)


def checkpoint_dir(cfg: DictConfig) -> Path:
    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    return Path(dirpath) if dirpath else Path(cfg.paths.output_dir) / "checkpoints"


def resume_point(cfg: DictConfig) -> ResumePoint | None:
    """The checkpoint `ckpt_path` names ('last': this run directory's checkpoints/last.ckpt), checked whole.

    Read before any data: a missing, truncated or damaged checkpoint is reported in one line. (Lightning would
    read ckpt_path=last as "the newest checkpoint it can find", and start from scratch when there is none.)
    """
    value = cfg.get("ckpt_path")
    if value in (None, ""):
        return None
    folder = checkpoint_dir(cfg)
    if value == "last":
        path = folder / "last.ckpt"
        if not path.exists():
            raise ResumeError(f"ckpt_path=last: there is no {path}. 'last' is the run directory's checkpoints/last.ckpt, "
                              f"so run in the interrupted run's directory: vaelab-train <its overrides> "
                              f"hydra.run.dir=<run dir> ckpt_path=last, or simply vaelab-train resume_from=<run dir>")
    else:
        path = Path(str(value))
        if path.is_dir():
            raise ResumeError(f"ckpt_path={value} is a directory; pass a checkpoint file, e.g. "
                              f"ckpt_path={path / 'checkpoints' / 'last.ckpt'}, or resume_from={path}")
        if not path.exists():
            raise ResumeError(f"ckpt_path={value}: no such file; pass a checkpoint from a run's checkpoints/ folder, "
                              f"or ckpt_path=last with that run's hydra.run.dir")
    checkpoint = read_checkpoint(path, f"ckpt_path={value}")
    loops = checkpoint.get("loops") or {}
    step = (loops.get("fit_loop") or {}).get("epoch_loop.state_dict", {}).get("_batches_that_stepped", checkpoint["global_step"])
    return ResumePoint(path=path, epoch=int(checkpoint["epoch"]), step=int(step), saved_at=checkpoint.get("saved_at"))


def read_checkpoint(path: Path, key: str) -> dict:
    """A whole training checkpoint, or ResumeError naming what is wrong with it.

    torch.load does not check the zip's CRCs (a flipped byte in the weights loads silently), so the zip
    is tested first; then the training state resuming needs must be there.
    """
    import torch  # here: a bad config fails before torch is imported

    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
    instead = f"; the run's other checkpoints: {', '.join(others)} in {path.parent}" if others else ""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise zipfile.BadZipFile(f"record {damaged} fails its CRC check")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zipfile, torch and pickle raise several types for damaged files
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ResumeError(f"{key}: {path} ({path.stat().st_size} bytes) is truncated or damaged, not a readable "
                          f"checkpoint ({type(err).__name__}: {first_line}){instead}") from None
    needed = {"state_dict", "optimizer_states", "loops", "epoch", "global_step"}
    if not isinstance(checkpoint, dict) or not needed <= set(checkpoint):
        raise ResumeError(f"{key}: {path} holds no training state (optimizer and loop counters), so training cannot "
                          f"continue from it{instead}")
    return checkpoint


def first_step_logged_after(log_dir: Path, resume: ResumePoint) -> int | None:
    """The first step (from the checkpoint's on) of the events written after the checkpoint, by the killed run."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    if resume.saved_at is None:  # a checkpoint from elsewhere: Lightning's own convention, metrics of step < step
        return resume.step
    later = [event.step for file in sorted(Path(log_dir).glob("events.out.tfevents.*"))
             for event in EventFileLoader(str(file)).Load()
             if event.HasField("summary") and event.wall_time > resume.saved_at and event.step >= resume.step]
    return min(later, default=None)


def logger_kwargs(logger_cfg: DictConfig, resume: ResumePoint | None) -> dict:
    """Extra arguments for a logger of a resumed run: TensorBoard's purge_step (see the module docstring)."""
    if resume is None:
        return {}
    from hydra.utils import get_class, instantiate
    from pytorch_lightning.loggers import TensorBoardLogger

    if not issubclass(get_class(logger_cfg._target_), TensorBoardLogger):
        return {}
    purge_step = first_step_logged_after(Path(instantiate(logger_cfg).log_dir), resume)  # building it writes nothing
    return {} if purge_step is None else {"purge_step": purge_step}
