"""The life of a run directory: claimed uniquely, locked while in use, never written over, resumed in place.

- Every run (and sweep) gets a directory no other run has: the default `<date>/<time>` is claimed with an
  exclusive mkdir (atomic on local and network file systems), `<time>-2`, `-3`, ... when taken.
- Every run, sweep and sweep-job directory vaelab makes carries a small marker file, `.vaelab`, naming what made it.
- While a command uses its directory it holds an exclusive lock on it (flock on the directory itself, so no
  file is added; a sweep's, for as long as the sweep runs): a second command on it stops in one line.
- A directory named with hydra.run.dir (or hydra.sweep.dir) is locked before anything in it is looked at (one in
  use is left as it is). If it already holds vaelab's outputs it is refused, unless overwrite=true and it carries
  vaelab's marker: then it is moved aside whole, to `<dir>.replaced-<YYYYmmdd-HHMMSS>`. Nothing is deleted.
- `resume_from=<run dir>` continues that run in place with its own saved config and the settings given
  (`resumed`), outside Hydra's command line (`open_session` sets up what Hydra would), and records the resume
  in .hydra/resume-<time>/ only once every check has passed.

The Hydra callback `RunDirectory` does the checks and the claiming before Hydra writes anything. Only the standard library,
hydra and omegaconf are imported here: it runs at start-up.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vaelab.errors import UserError, exit_cleanly, one_line
from vaelab.files import atomic_write
from vaelab.runs import settings
from vaelab.runs.hardware import check_accelerator, check_device
from vaelab.runs.renames import renamed

# What vaelab's commands write into a run directory: a directory holding any of them holds a run.
OUTPUTS = (".hydra", "checkpoints", "tensorboard", "images", "metrics.json", "train.log", "eval.json", "eval.log")
OUTPUTS += ("noise_error.png", "samples.png", "interpolation.png", "generate.log", "job_status.json", "csv", "mlruns", "wandb")
SWEEP_OUTPUTS = ("multirun.yaml", "summary.csv", "summary.md")
COMMANDS = {"vaelab-train": "train", "vaelab-eval": "eval", "vaelab-generate": "generate"}
MARKER = ".vaelab"  # vaelab made this directory (overwrite=true replaces nothing else)


def outputs_in(directory: Path, names: tuple[str, ...] = OUTPUTS) -> list[str]:
    return [name for name in names if (directory / name).exists()] if directory.is_dir() else []


def claim(directory: Path, unique: bool, setting: str) -> Path:
    """Create the directory; unique=True: exclusively, taking the first free `<name>`, `<name>-2`, ..."""
    directory = Path(os.path.abspath(directory))
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        if not unique:
            directory.mkdir(exist_ok=True)
            probe = tempfile.TemporaryFile(dir=directory)  # writable? (nothing is left behind)
            probe.close()
            return directory
        for n in range(1, 10_000):
            candidate = directory if n == 1 else directory.with_name(f"{directory.name}-{n}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
        raise UserError(f"{directory}: 10,000 runs started in the same second; choose a directory with {setting}")
    except OSError as err:
        reason = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror or str(err)
        raise UserError(
            f"cannot write the output directory {directory}: {reason} ({err.filename}); choose a writable one with {setting}"
        ) from None


_locks: dict[str, int] = {}  # realpath -> the open directory whose flock this process holds


def lock(directory: Path) -> None:
    """Hold an exclusive lock on the directory until this process ends (again from the same process: no-op)."""
    key = os.path.realpath(directory)
    if key in _locks:
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"{directory} is in use by another vaelab command right now (it holds the directory's lock); "
            f"wait for it to end, or use another directory"
        ) from None
    _locks[key] = fd


def mark(directory: Path, made_by: str) -> None:
    """vaelab's marker: this directory is vaelab's own (`made_by`: the command and what it is, e.g. 'vaelab-train run')."""
    atomic_write(Path(directory) / MARKER, json.dumps({"made_by": made_by, "created": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


def move_aside(directory: Path, setting: str) -> Path:
    """Rename a run directory this process has locked to a new sibling `<name>.replaced-<YYYYmmdd-HHMMSS>` (`-2`, ...
    when taken) and let go of its lock: the path is free for a new directory (claimed and locked afresh)."""
    directory = Path(os.path.abspath(directory))
    key = os.path.realpath(directory)
    name = f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside = claim(directory.with_name(name), unique=True, setting=setting)
    try:
        os.rename(directory, aside)  # over the empty directory just claimed, so no other can take that name meanwhile
    except OSError as err:
        aside.rmdir()
        raise UserError(
            f"overwrite=true cannot move {directory} aside to {aside.name}: {err.strerror}; "
            f"move it yourself, or choose another directory with {setting}"
        ) from None
    os.close(_locks.pop(key))  # the lock went with the old directory
    return aside


def _given(config: DictConfig, key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+") == key for o in config.hydra.overrides.hydra)


class RunDirectory(HydraCallback):
    """Hydra callback: check the settings, then claim, lock and mark the run (or sweep) directory, before Hydra
    creates or writes anything. (Hydra turns an exception raised here into a warning: the refusals exit.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        app = config.hydra.help.app_name
        with exit_cleanly(app):
            HydraConfig.instance().set_config(config)  # so that ${hydra:...} in the paths resolves already
            command = COMMANDS[app]
            settings.check(config, command)
            if command == "train":
                check_accelerator(str(config.trainer.get("accelerator")), "trainer.accelerator", "use trainer=cpu")
            else:
                check_device(str(config.device))
            _not_empty(str(config.hydra.run.dir), "hydra.run.dir")
            if config.get("ckpt_path"):  # last: a bad setting is named first, whatever the checkpoint
                settings.check_checkpoint_file(str(config.ckpt_path))
            directory = self.fresh(
                config, str(config.hydra.run.dir), _given(config, "hydra.run.dir"), "hydra.run.dir=<dir>", OUTPUTS
            )
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.run.dir = str(directory)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        app = config.hydra.help.app_name
        with exit_cleanly(app):
            HydraConfig.instance().set_config(config)
            _not_empty(str(config.hydra.sweep.dir), "hydra.sweep.dir")
            directory = self.fresh(
                config, str(config.hydra.sweep.dir), _given(config, "hydra.sweep.dir"), "hydra.sweep.dir=<dir>", SWEEP_OUTPUTS
            )  # locked for as long as the sweep runs
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.sweep.dir = str(directory)
                # each job recomposes its config from these overrides: they must name the claimed directory
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{_quoted(directory)}'")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:  # Hydra has made the job's directory in the sweep's
            mark(Path(config.hydra.runtime.output_dir), f"{config.hydra.help.app_name} sweep job")

    @staticmethod
    def fresh(config: DictConfig, directory: str, given: bool, setting: str, names: tuple[str, ...]) -> Path:
        """The directory claimed, locked and marked. A named one that exists is locked first, so one in use is neither
        read nor moved; holding outputs, it is replaced (moved aside) only as `_replaceable` allows."""
        path, what = Path(directory), "a sweep" if names is SWEEP_OUTPUTS else "a run"
        if given and path.is_dir():
            lock(path)
            found = outputs_in(path, names) + (
                [p.name for p in path.iterdir() if p.is_dir() and outputs_in(p)] if what == "a sweep" else []
            )
            if found:
                _replaceable(config, path, found, setting.split("=")[0], what)
                move_aside(path, setting)
        claimed = claim(path, unique=not given, setting=f"{setting} or paths.log_dir=<dir>")
        lock(claimed)
        mark(claimed, f"{config.hydra.help.app_name} {what[2:]}")
        return claimed


def _replaceable(config: DictConfig, directory: Path, found: list[str], key: str, what: str) -> None:
    """A directory holding outputs is replaced only with overwrite=true, only if vaelab made it (its marker: names
    alone may be a user's own folders), and never while it holds the checkpoint the command is about to read."""
    resume = " (to continue it: vaelab-train resume_from=" + shlex.quote(str(directory)) + ")" if "checkpoints" in found else ""
    if not (directory / MARKER).is_file():
        raise UserError(
            f"{key}={directory} holds {', '.join(found[:3])} but no {MARKER} marker: vaelab did not make it (or an older "
            f"vaelab did){resume}, so it will not replace it; choose another directory, or move this one aside yourself"
        )
    if not config.get("overwrite"):
        raise UserError(
            f"{key}={directory} already holds {what} ({', '.join(found[:3])}){resume}; choose a new directory, "
            f"or add overwrite=true to replace it"
        )
    ckpt = config.get("ckpt_path")
    if ckpt and any(os.path.realpath(ckpt).startswith(os.path.realpath(directory / name) + os.sep) for name in found):
        raise UserError(
            f"overwrite=true would move away ckpt_path={ckpt}, which is in {key}={directory}; "
            f"write the results to another directory ({key}=<new dir>)"
        )


def _not_empty(directory: str, key: str) -> None:
    if not directory.strip():  # Path("") is the working directory: a run would be written into it
        raise UserError(f"{key}={directory!r} is empty; name a new directory, e.g. {key}=outputs/my-run")


def _quoted(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace("'", "\\'")


# --- resuming ---------------------------------------------------------------------------------------------------


def resume_dir(value: str) -> Path:
    directory = Path(os.path.abspath(value))
    if not directory.is_dir():
        raise UserError(
            f"resume_from={value}: no such directory; pass a run directory of vaelab-train, e.g. "
            f"resume_from=outputs/<date>/<time>"
        )
    if saved_config_path(directory) is None:
        raise UserError(f"resume_from={value}: {directory} is not a vaelab-train run directory (it has no .hydra/config.yaml)")
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

    Plain settings can change; the config groups the run was built from (model=..., data=...) cannot.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = saved_config_path(run_dir)
    try:
        cfg = OmegaConf.load(path)
        if not isinstance(cfg, DictConfig) or "trainer" not in cfg or "model" not in cfg:
            raise ValueError("it is not a vaelab-train config (no model and trainer sections)")
        cfg = OmegaConf.create(renamed(OmegaConf.to_container(cfg, resolve=False)))  # an older vaelab's class names
    except Exception as err:  # yaml, OSError, ValueError: all mean the same to the user
        raise UserError(
            f"resume_from={run_dir}: its saved config {path} is damaged ({type(err).__name__}: "
            f"{one_line(err)[:200]}); restore it from a copy, or start a new run"
        ) from None
    for override in OverridesParser.create().parse_overrides(overrides):
        key, line = override.key_or_group, override.input_line
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
        cfg.resume_from = None
    return cfg


def record_resume(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> Path:
    """.hydra/resume-<time>/ with the resumed config and the overrides given: the next resume starts from it."""
    from datetime import datetime

    folder = claim(run_dir / ".hydra" / f"resume-{datetime.now():%Y-%m-%d_%H-%M-%S}", unique=True, setting="hydra.run.dir")
    atomic_write(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
    return folder


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: its checkpoint (None: from scratch) and what the checkpoint recorded."""

    path: Path | None
    epoch: int = -1  # the epoch the checkpoint ended (0-based); -1: none
    step: int = 0  # optimizer steps done: the first TensorBoard step the resumed run writes
    saved_at: float | None = None  # when it was written (guards.Resumable records it)
    val_metrics: dict[str, float] = field(default_factory=dict)  # the val/* of the epoch it ended


def newest_checkpoint(run_dir: Path, cfg: DictConfig) -> Path | None:
    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    folder = Path(folder) if folder else run_dir / "checkpoints"
    last = folder / "last.ckpt"
    if last.exists():
        return last
    others = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return others[-1] if others else None


def first_step_logged_after(log_dir: Path, point: ResumePoint) -> int | None:
    """The step from which TensorBoard must forget what the interrupted run logged after its checkpoint."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

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
