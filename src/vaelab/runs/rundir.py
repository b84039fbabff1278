"""The life of a run directory: claimed uniquely, locked while in use, never written over, resumed in place.

- Every run (and sweep) gets a directory no other run has: the default `<date>/<time>` is claimed with an
  exclusive mkdir (atomic on local and network file systems), `<time>-2`, `-3`, ... when taken.
- Every run, sweep and sweep-job directory vaelab makes carries a small marker file, `.vaelab`, naming what made it.
- While a command uses its directory it holds an exclusive lock on it (flock on the directory itself, so no
  file is added; a sweep's, for as long as the sweep runs): a second command on it stops in one line.
- A directory named with hydra.run.dir (or hydra.sweep.dir) is locked before anything in it is looked at (one in
  use is left as it is). If it already holds vaelab's outputs it is refused, unless overwrite=true and it carries
  vaelab's marker: then it is moved aside whole, to `<dir>.replaced-<YYYYmmdd-HHMMSS>`. Nothing is deleted.

The Hydra callback `RunDirectory` is where a run's settings, its accelerator and its checkpoint file are checked
(`check_run`), once, before its directory is claimed, locked and marked (a sweep's job: vaelab.runs.sweep.run_job;
a resume: vaelab.runs.resume). Only the standard library, hydra and omegaconf are imported here: it runs at start-up.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from vaelab.errors import UserError, before_work, disk_message, exit_cleanly, when_stopped
from vaelab.files import atomic_write
from vaelab.runs import settings
from vaelab.runs.hardware import check_accelerator, check_device
from vaelab.runs.renames import RETIRED, retired

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


def folders_elsewhere(config: DictConfig, run_dir: Path) -> list[tuple[str, str, Path]]:
    """(setting, its value, folder) of each folder a run writes into outside its run directory: a checkpoint
    callback's `dirpath`, a picture's `image_dir`, a TensorBoard or CSV logger's fixed log folder (a `version` given,
    as vaelab's presets give it: <save_dir>/<name>/<version>, Lightning's log_dir)."""
    found = []
    for name, node in (config.get("callbacks") or {}).items():
        for key in settings.PATH_KEYS:  # the folders a callback writes to (dirpath, image_dir)
            if isinstance(node, DictConfig) and node.get(key):
                found.append((f"callbacks.{name}.{key}", str(node[key]), Path(str(node[key]))))
    for name, node in (config.get("logger") or {}).items():
        target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
        if not target.endswith(("TensorBoardLogger", "CSVLogger")) or node.get("version") is None or not node.get("save_dir"):
            continue
        version = node.version if isinstance(node.version, str) else f"version_{node.version}"
        found.append(
            (f"logger.{name}.save_dir", str(node.save_dir), Path(str(node.save_dir)) / str(node.get("name") or "") / version)
        )
    inside = os.path.realpath(run_dir)
    return [(s, v, folder) for s, v, folder in found if not Path(os.path.realpath(folder)).is_relative_to(inside)]


def take_folders_elsewhere(config: DictConfig, run_dir: Path, new: bool) -> None:
    """Lock each folder the run writes into outside its run directory (one in use by another command is refused,
    like a run directory); a new run also refuses one that holds files: it would write over another run's
    last.ckpt, metrics.csv, hparams.yaml, projector or pictures, or mix its own with them. The checks come first, so
    a refusal makes nothing."""
    then = "; then start the run again" if new else f"; then continue with: vaelab-resume {shlex.quote(str(run_dir))}"
    folders = folders_elsewhere(config, run_dir)
    for setting, value, folder in sorted(folders, key=lambda entry: not entry[2].is_dir()):  # every check before a mkdir
        try:
            existed = folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            lock(folder)
            held = sorted(p.name for p in folder.iterdir()) if existed else []
        except OSError as err:  # named as a fault while the run writes there would be
            raise UserError(disk_message(err, f"{setting}=<dir>") + then) from None
        if new and held:
            raise UserError(
                f"{setting}={value}: {folder} already holds another run's files ({', '.join(held[:3])}"
                f"{', ...' if len(held) > 3 else ''}), which this run would write over or mix with its own; give it a "
                f"folder of its own, e.g. {setting}={Path(value) / run_dir.name}, or leave it at its default, in the run "
                f"directory"
            )


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


def check_run(config: DictConfig, command: str, checkpoint: bool = True) -> None:
    """Every check of a run's settings before anything is read or written: their rules, the accelerator or device,
    and (last: a bad setting is named first, whatever the checkpoint) that ckpt_path is a file."""
    settings.check(config, command)
    if command == "train":
        check_accelerator(str(config.trainer.get("accelerator")), "trainer.accelerator", "use trainer=cpu")
    else:
        check_device(str(config.device))
    if checkpoint and config.get("ckpt_path"):
        settings.check_checkpoint_file(str(config.ckpt_path))


def _given(config: DictConfig, key: str, overrides: str = "hydra") -> list[str]:
    """The values given for `key` on the command line (Hydra's record of the overrides, as typed)."""
    return [o.split("=", 1)[1] for o in config.hydra.overrides[overrides] if "=" in o and o.split("=", 1)[0].lstrip("+~") == key]


def _refuse_retired(config: DictConfig) -> None:
    for key in RETIRED:  # where the schema still has the key (where it has not, Hydra refuses it: vaelab.errors)
        if values := _given(config, key, "task"):
            raise UserError(retired(key, values[-1]))


class RunDirectory(HydraCallback):
    """Hydra callback: check the settings, then claim, lock and mark the run (or sweep) directory, before Hydra creates
    or writes anything. Hydra turns an exception raised in a callback into a warning, so each refusal ends the command
    here, in an exit_cleanly of its own."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        app = config.hydra.help.app_name
        with exit_cleanly(app):
            HydraConfig.instance().set_config(config)  # so that ${hydra:...} in the paths resolves already
            _refuse_retired(config)
            _not_empty(str(config.hydra.run.dir), "hydra.run.dir")
            check_run(config, COMMANDS[app])
            given = bool(_given(config, "hydra.run.dir"))
            directory = self.fresh(config, str(config.hydra.run.dir), given, "hydra.run.dir=<dir>", OUTPUTS)
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.run.dir = str(directory)
            when_stopped(f"{before_work(app)}; {directory} holds only its settings and log")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        app = config.hydra.help.app_name
        with exit_cleanly(app):
            HydraConfig.instance().set_config(config)
            _refuse_retired(config)
            _not_empty(str(config.hydra.sweep.dir), "hydra.sweep.dir")
            given = bool(_given(config, "hydra.sweep.dir"))
            directory = self.fresh(config, str(config.hydra.sweep.dir), given, "hydra.sweep.dir=<dir>", SWEEP_OUTPUTS)
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.sweep.dir = str(directory)
                # each job recomposes its config from these overrides: they must name the claimed directory
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{_quoted(directory)}'")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:  # Hydra has made the job's directory in the sweep's (locked)
            lock(Path(config.hydra.runtime.output_dir))
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
    resume = f" (to continue it: vaelab-resume {shlex.quote(str(directory))})" if "checkpoints" in found else ""
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
