"""Where a training run starts from: its own directory continued in place (`vaelab-resume RUN_DIR [key=value ...]`), or
a training checkpoint (ckpt_path=, in a new directory).

A resume reads the run's saved config (the latest resume's, else .hydra/config.yaml) with the settings given
(`resumed`; config groups cannot change), outside Hydra's command line (`open_session` sets up what Hydra would), runs
the checks a new run gets (vaelab.runs.rundir.check_run) and continues from the run's newest checkpoint, or from
scratch when it was killed before its first. Only once every check has passed is the resume recorded, in
.hydra/resume-<time>/, and the run's train.log continued: a refused resume leaves the run as it was.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vaelab.errors import UserError, one_line
from vaelab.event_files import use_fast_checksums
from vaelab.files import atomic_write
from vaelab.runs.renames import RETIRED, renamed
from vaelab.runs.rundir import check_run, claim, lock, take_folders_elsewhere

TRAINING_STATE = {"state_dict", "optimizer_states", "loops", "epoch", "global_step"}


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: its checkpoint (None: from scratch) and what the checkpoint recorded."""

    path: Path | None
    epoch: int = -1  # the epoch the checkpoint ended (0-based); -1: none
    step: int = 0  # optimizer steps done: the first TensorBoard step the resumed run writes
    saved_at: float | None = None  # when it was written (guards.Resumable records it)
    val_metrics: dict[str, float] = field(default_factory=dict)  # the val/* of the epoch it ended


@dataclass
class Start:
    """What a run starts from, once every check has passed."""

    cfg: DictConfig
    run_dir: Path
    checkpoint: dict | None = None  # the training checkpoint it continues from
    point: ResumePoint | None = None  # None: a new run; ResumePoint(path=None): a resume from scratch
    overrides: tuple[str, ...] = ()  # a resume's extra settings
    resumed: bool = False  # vaelab-resume: continuing this run directory


def resume_dir(value: str) -> Path:
    directory = Path(os.path.abspath(value))
    if not value.strip():  # Path("") is the working directory
        raise UserError(
            f"RUN_DIR={value!r} is empty; name the run directory to continue, e.g. vaelab-resume outputs/<date>/<time>"
        )
    if not directory.is_dir():
        raise UserError(
            f"{value}: no such directory; pass a run directory of vaelab-train, e.g. vaelab-resume outputs/<date>/<time>"
        )
    if saved_config_path(directory) is None:
        raise UserError(f"{value}: {directory} is not a vaelab-train run directory (it has no .hydra/config.yaml)")
    return directory


def open_session(run_dir: Path) -> None:
    """For a resume, what Hydra sets up for a run: its config (for ${hydra:...}, e.g. the working directory the
    data cache is found from), with run_dir as the output directory. (The log file: record_resume.)"""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import configure_log

    from vaelab import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    console = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)  # to stdout, as in a run; the file comes later
    console["handlers"] = {"console": console["handlers"]["console"]}
    console["root"]["handlers"] = ["console"]
    configure_log(OmegaConf.create(console), cfg.hydra.verbose)


def continue_log() -> None:
    """A resume that has passed its checks logs into the run's train.log again (appended), as Hydra would."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import configure_log

    configure_log(HydraConfig.get().job_logging, HydraConfig.get().verbose)


def saved_config_path(run_dir: Path) -> Path | None:
    """The config the run last ran with: its latest resume's, else the original .hydra/config.yaml."""
    resumes = sorted((run_dir / ".hydra").glob("resume-*/config.yaml"))
    original = run_dir / ".hydra" / "config.yaml"
    return resumes[-1] if resumes else original if original.exists() else None


def resumed(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's saved config with the user's extra overrides (e.g. epochs=20 to train further), writing to run_dir.
    Plain settings can change; the config groups the run was built from (model=..., data=...) cannot."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = saved_config_path(run_dir)
    try:
        cfg = OmegaConf.load(path)
        if not isinstance(cfg, DictConfig) or "trainer" not in cfg or "model" not in cfg:
            raise ValueError("it is not a vaelab-train config (no model and trainer sections)")
        cfg = OmegaConf.create(renamed(OmegaConf.to_container(cfg, resolve=False)))  # an older vaelab's class names
    except Exception as err:  # yaml, OSError, ValueError: all mean the same to the user
        raise UserError(
            f"{run_dir}: its saved config {path} is damaged ({type(err).__name__}: "
            f"{one_line(err)[:200]}); restore it from a copy, or start a new run"
        ) from None
    for override in OverridesParser.create().parse_overrides(overrides):
        key, line = override.key_or_group, override.input_line
        if key.startswith("hydra.") or key == "ckpt_path":
            raise UserError(
                f"{run_dir} cannot be combined with {line}: it continues that run in its own directory from its own "
                "newest checkpoint"
            )
        if override.is_sweep_override():
            raise UserError(f"{line}: a resume continues one run, it cannot sweep")
        current = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        exists = OmegaConf.select(cfg, key, default="\0missing") != "\0missing"
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if exists:
                with open_dict(node):
                    del node[leaf]
            continue
        value = override.value()
        if isinstance(current, DictConfig) and not isinstance(value, dict):
            raise UserError(
                f"{line}: the run was built from its own {key} config, which a resume cannot swap; start a new run with {line}"
            )
        if not exists and not override.is_add() and not override.is_force_add():
            raise UserError(f"{line}: the run's saved config has no setting {key}; add it with +{line} if it is new")
        if exists and override.is_add():
            raise UserError(f"{line}: the run's saved config has {key} already; drop the + to change it")
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        for key in RETIRED:  # e.g. `resume_from: null` in a run's config saved before vaelab-resume
            cfg.pop(key, None)
    return cfg


def record_resume(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> Path:
    """.hydra/resume-<time>/ with the resumed config and the overrides given: the next resume starts from it."""
    from datetime import datetime

    folder = claim(run_dir / ".hydra" / f"resume-{datetime.now():%Y-%m-%d_%H-%M-%S}", unique=True, setting="RUN_DIR")
    atomic_write(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
    return folder


def newest_checkpoint(run_dir: Path, cfg: DictConfig) -> Path | None:
    """The run's last.ckpt, else its newest checkpoint, in the folders its two checkpoint callbacks write to."""
    keys = ("callbacks.last_checkpoint.dirpath", "callbacks.model_checkpoint.dirpath")
    folders = [Path(folder) for key in keys if (folder := OmegaConf.select(cfg, key))] or [run_dir / "checkpoints"]
    for folder in folders:
        if (folder / "last.ckpt").exists():
            return folder / "last.ckpt"
    others = sorted((path for folder in folders for path in folder.glob("*.ckpt")), key=lambda p: p.stat().st_mtime)
    return others[-1] if others else None


def first_step_logged_after(log_dir: Path, point: ResumePoint) -> int | None:
    """The step from which TensorBoard must forget what the interrupted run logged after its checkpoint."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    use_fast_checksums()  # every record's checksum is checked as it is read
    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    if point.path is None:
        return 0 if files else None  # restarted from scratch: everything the killed run logged goes
    if point.saved_at is None:  # a checkpoint from elsewhere: Lightning's own convention
        return point.step
    later = [
        event.step
        for file in files
        for event in EventFileLoader(str(file)).Load()
        if event.HasField("summary") and event.wall_time > point.saved_at and event.step >= point.step
    ]
    return min(later, default=None)


def csv_rows_logged_before(path: Path, point: ResumePoint) -> list[tuple[int, dict[str, float]]]:
    """The rows of a CSVLogger's metrics.csv logged before the checkpoint a run resumes from (step, metrics); none
    when it restarts from scratch. A value that does not read as a number is left out (the file is untrusted)."""
    import csv

    if point.path is None or not path.is_file():
        return []

    def number(text: str) -> float:
        return int(text) if text.lstrip("-").isdigit() else float(text)

    rows = []
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            try:
                step = int(row.pop("step"))
            except (KeyError, TypeError, ValueError):
                continue
            metrics = {}
            for key, text in row.items():
                try:
                    metrics[key] = number(text)
                except (TypeError, ValueError):  # empty: not logged in that row
                    pass
            if step < point.step and metrics:
                rows.append((step, metrics))
    return rows


def read_training_checkpoint(path: Path, key: str, cfg: DictConfig) -> tuple[dict, ResumePoint]:
    from vaelab.runs.checkpoints import check_buildable, read_checkpoint

    checkpoint = read_checkpoint(path, key)
    if not TRAINING_STATE <= set(checkpoint):
        raise UserError(
            f"{key}: {path} holds no training state (optimizer and loop counters), so training cannot continue from it"
        )
    # The same rule as vaelab-eval's: only network classes, with plain data (the config's own are trusted).
    check_buildable({k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k != "optimizer"}, own_networks(cfg))
    fit_loop = checkpoint["loops"].get("fit_loop")  # the types of what is read here: vaelab.runs.checkpoints.check_contents
    epoch_loop = fit_loop.get("epoch_loop.state_dict") if isinstance(fit_loop, dict) else None
    step = epoch_loop.get("_batches_that_stepped") if isinstance(epoch_loop, dict) else None
    step = step if isinstance(step, int) else checkpoint["global_step"]
    return checkpoint, ResumePoint(
        path=path,
        epoch=int(checkpoint["epoch"]),
        step=int(step),
        saved_at=checkpoint.get("saved_at"),
        val_metrics=dict(checkpoint.get("val_metrics") or {}),
    )


def own_networks(cfg: DictConfig) -> tuple[str, ...]:
    """Every class the run's own config names under model.encoder and model.decoder (a user's own included): a
    checkpoint of this run may build them, since the config names them, not the checkpoint."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            found.extend([str(node["_target_"])] if "_target_" in node else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for key in ("model.encoder", "model.decoder"):
        node = OmegaConf.select(cfg, key)
        walk(OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else None)
    return tuple(found)


def check_networks(cfg: DictConfig) -> None:
    """The encoder and decoder the config names are importable network classes (a user's own config can name
    anything): one line for a missing module or class, or a class that is not a torch.nn.Module."""
    from vaelab.runs.checkpoints import network_class

    for key in ("model.encoder._target_", "model.decoder._target_"):
        target = OmegaConf.select(cfg, key)
        if target is not None:
            network_class(target, (str(target),), key=f"{key}={target}")


def fit_is_done(cfg: DictConfig, point: ResumePoint | None) -> bool:
    if point is None or point.path is None:
        return False
    max_steps = int(cfg.trainer.get("max_steps") or -1)
    return point.epoch + 1 >= int(cfg.trainer.max_epochs) or (max_steps > 0 and point.step >= max_steps)


def prepare_resume(value: str, overrides: list[str]) -> Start:
    """Every check of a resume: the run, its saved config with the settings, its newest checkpoint. Nothing is
    written here, so a refusal leaves the run exactly as it was."""
    run_dir = resume_dir(value)
    lock(run_dir)
    open_session(run_dir)
    cfg = resumed(run_dir, overrides)
    check_run(cfg, "train", checkpoint=False)  # it continues from its own checkpoint, not from its ckpt_path
    check_networks(cfg)
    take_folders_elsewhere(cfg, run_dir, new=False)  # its own logs, elsewhere: continued, and locked like the run
    newest = newest_checkpoint(run_dir, cfg)
    if newest is None:  # killed before its first checkpoint: it starts again, in place
        return Start(cfg, run_dir, point=ResumePoint(path=None), overrides=tuple(overrides), resumed=True)
    checkpoint, point = read_training_checkpoint(newest, str(run_dir), cfg)
    extends = any(o.split("=", 1)[0].lstrip("+~") in ("epochs", "trainer.max_epochs", "trainer.max_steps") for o in overrides)
    if (run_dir / "metrics.json").exists() and (fit_is_done(cfg, point) or not extends):  # e.g. stopped early
        raise UserError(
            f"{run_dir} has nothing left to do: it trained {point.epoch + 1} epochs and has its "
            f"metrics.json; to train it further: vaelab-resume {shlex.quote(str(run_dir))} epochs=<more>",
            exit_code=0,
        )
    return Start(cfg, run_dir, checkpoint, point, tuple(overrides), resumed=True)
