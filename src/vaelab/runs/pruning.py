"""Optuna pruning for `hparams_search=optuna`: a trial whose validation figure is hopeless after a few epochs stops.

hydra-optuna-sweeper 1.3 asks Optuna for each trial in the sweep's main process and hands its settings to the
launcher: the jobs run in that process, in joblib workers or on SLURM nodes, where no trial object reaches them, and
the sweeper tells Optuna each job's result as COMPLETE or FAIL. It has no pruner setting; Hydra takes a sweeper class
only from the hydra_plugins package; and Optuna 2.10's database storage fails under SQLAlchemy 2 (what pip installs
today). So the sweep directory, which every job already writes to, is where the trials meet:

- Each job's Lightning callback (vaelab.runs.pruning_callback.OptunaPruning) reports its val/nelbo every epoch to
  its `JobTrial`, kept in `<job dir>/optuna_trial.json`. The pruner decides on the trial among the sweep's others as
  their files and job_status.json show them (finished `ok`: COMPLETE; `pruned`: PRUNED; `failed`: FAIL; else
  RUNNING), trial number = job number. When it prunes, the trainer stops at that epoch's end (checkpoints and
  event files whole, the test stage skipped) and the job returns `Pruned`; vaelab.runs.sweep marks it `pruned`.
- The sweeper's one hook, `hydra.sweeper.custom_search_space` = `prepare_trial`, runs in the main process for each
  trial before its job starts: it tags the trial with its job, and at the sweep's first trial gives the study the
  pruner and a `tell` that copies each job's reports into its trial, tells a pruned one PRUNED (`_tell`), and
  writes the study's trials to `<sweep dir>/optuna_trials.json`.
- A pruned trial is not a failure: it counts neither toward max_failure_rate nor toward the sweep's exit status.

Only hydra, omegaconf and vaelab's own light modules are imported here at module level (vaelab.runs.sweep imports
this in the sweep's main process); Optuna inside the functions.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from omegaconf import DictConfig

from vaelab.errors import UserError, build
from vaelab.files import atomic_write

log = logging.getLogger(__name__)

HOOK = "vaelab.runs.pruning.prepare_trial"  # hydra.sweeper.custom_search_space
CALLBACK = "vaelab.runs.pruning_callback.OptunaPruning"  # callbacks.optuna_pruning._target_
TRIAL_FILE = "optuna_trial.json"  # in each job's directory
STUDY_FILE = "optuna_trials.json"  # in the sweep's: the study's trials as Optuna recorded them (it is kept in memory)
JOB_ATTR = "vaelab_job"  # a trial's user attribute: [sweep dir, job number]
PRUNED_ATTR = "vaelab_pruned_after_epochs"  # a pruned trial's user attribute
STATES = {"ok": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL", "interrupted": "FAIL"}  # job status -> trial state


class Pruned(float):
    """A pruned trial's job result: its last val/nelbo (the figure it was pruned on), and the epochs it trained."""

    epochs: int

    def __new__(cls, value: float, epochs: int) -> Pruned:
        result = super().__new__(cls, value)
        result.epochs = epochs
        return result

    def __reduce__(self):  # a joblib worker sends it to the sweep's main process
        return (Pruned, (float(self), self.epochs))


_pruned_after: list[int] = []  # in a job's process: the epochs its trial trained before it was pruned


def job_result(work: Callable[[], Any]) -> Any:
    """A sweep job's work (vaelab.runs.sweep.run_job): its result, as `Pruned` when its trial was pruned."""
    _pruned_after.clear()  # a previous job of this process (basic launcher, joblib worker) was pruned, not this one
    value = work()
    return Pruned(value, _pruned_after[-1]) if _pruned_after and value is not None else value


def _callback(config: DictConfig) -> tuple[str, DictConfig] | None:
    """(name, settings) of the pruning callback among the run's callbacks; None without it (a search that prunes
    nothing, e.g. after ~callbacks.optuna_pruning)."""
    for name, node in (config.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and node.get("_target_") == CALLBACK:
            return str(name), node
    return None


def pruner(config: DictConfig):
    """The pruner callbacks.<name>.pruner sets (an optuna.pruners.BasePruner), or one line saying what is wrong."""
    from optuna.pruners import BasePruner

    name, node = _callback(config)
    key = f"callbacks.{name}.pruner"
    if not isinstance(node.get("pruner"), DictConfig) or "_target_" not in node.pruner:
        raise UserError(f"{key} is {node.get('pruner')!r}; set an Optuna pruner, e.g. {key}._target_=optuna.pruners.MedianPruner")
    made = build(node.pruner, key)
    if not isinstance(made, BasePruner):
        raise UserError(
            f"{key}._target_={node.pruner._target_} is not an Optuna pruner; choose one of optuna.pruners "
            "(MedianPruner, PercentilePruner, SuccessiveHalvingPruner, HyperbandPruner, ThresholdPruner, NopPruner)"
        )
    return made


def check(config: DictConfig) -> None:
    """A sweep's pruning settings, before the study is made (SweepSummary.on_multirun_start): one line for settings
    pruning cannot work with, or for a bad pruner."""
    found = _callback(config)
    if found is None:
        return
    name, sweeper = found[0], config.hydra.sweeper
    drop = f"or search without pruning: ~callbacks.{name}"
    if not str(sweeper.get("_target_", "")).endswith("OptunaSweeper"):
        raise UserError(
            f"callbacks.{name} prunes Optuna trials, but the sweeper is {sweeper.get('_target_')}: add hparams_search=optuna, {drop}"
        )
    if sweeper.get("custom_search_space") != HOOK:
        raise UserError(
            f"hydra.sweeper.custom_search_space={sweeper.get('custom_search_space')}: pruning needs {HOOK} there (it links "
            f"each trial to its job); {drop}"
        )
    if not isinstance(sweeper.get("direction"), str) and len(sweeper.direction) > 1:
        raise UserError(f"hydra.sweeper.direction={list(sweeper.direction)}: Optuna prunes only single-objective studies; {drop}")
    pruner(config)


def prepare_trial(config: DictConfig, trial) -> None:
    """hydra.sweeper.custom_search_space: called in the sweep's main process for each trial, in the order of the jobs
    the trials are handed to (job numbers 0, 1, ... in every sweep), after its settings are drawn, before its job."""
    if _callback(config) is None:
        return
    study, sweep_dir = trial.study, str(config.hydra.sweep.dir)
    if not isinstance(vars(study).get("tell"), functools.partial):  # the sweep's first trial
        study.pruner = pruner(config)  # the samplers ask it (HyperbandPruner's brackets)
        study.tell = functools.partial(_tell, study, Path(sweep_dir))  # what the sweeper calls after each batch
    job = sum(t.user_attrs.get(JOB_ATTR, [None])[0] == sweep_dir for t in study.get_trials(deepcopy=False))
    trial.set_user_attr(JOB_ATTR, [sweep_dir, job])


def _tell(study, sweep_dir: Path, trial, state=None, values=None):
    """The study's tell in the sweep's main process: the job's reports go into its trial first (made in the job's
    process, they are only in its file), and a job that was pruned, which the sweeper would tell COMPLETE with its
    last figure, is told PRUNED: Optuna then records its last report as its value. Then the study's trials so far
    are written to the sweep directory."""
    from optuna import Study
    from optuna.trial import TrialState

    state = TrialState.COMPLETE if state is None else state
    job = trial.user_attrs[JOB_ATTR][1]
    found = [r for r in map(_read, sweep_dir.rglob(TRIAL_FILE)) if r is not None and r["job"] == job]
    if found:
        for step, value in sorted(found[0]["reports"].items()):
            trial.report(value, step)
        if found[0]["pruned_after_epochs"] is not None and state == TrialState.COMPLETE:
            trial.set_user_attr(PRUNED_ATTR, found[0]["pruned_after_epochs"])
            state, values = TrialState.PRUNED, None
    told = Study.tell(study, trial, state=state, values=values)
    trials = [
        {"number": t.number, "job": t.user_attrs.get(JOB_ATTR, [None, None])[1], "state": t.state.name, "value": t.value}
        | {"params": t.params, "reports": t.intermediate_values}
        for t in study.get_trials(deepcopy=False)
    ]
    atomic_write(sweep_dir / STUDY_FILE, json.dumps(trials, indent=1) + "\n")
    return told


def _read(path: Path) -> dict[str, Any] | None:
    """A job's trial file, checked (it is read from disk); None when it is not one vaelab wrote."""
    try:
        data = json.loads(path.read_text())
        reports = {int(step): float(value) for step, value in data["reports"].items()}
        pruned, job = data["pruned_after_epochs"], data["job"]
        if not (type(job) is int and job >= 0 and (pruned is None or type(pruned) is int)):
            raise ValueError(f"job {job!r}, pruned_after_epochs {pruned!r}")
        if not isinstance(data["system_attrs"], dict) or not all(k >= 0 and math.isfinite(v) for k, v in reports.items()):
            raise ValueError("system_attrs not a mapping, or a negative step, or a figure not finite")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        log.warning("%s is not a trial file vaelab wrote (%s): left out", path, err)
        return None
    return {"job": job, "reports": reports, "system_attrs": data["system_attrs"], "pruned_after_epochs": pruned}


class JobTrial:
    """A sweep job's Optuna trial as its pruner sees it: its reports, in <job dir>/optuna_trial.json, among the trials
    of the sweep's other jobs (trial number = job number)."""

    def __init__(self, pruner, job_dir: Path, sweep_dir: Path, job: int, study_name: str, direction: str):
        self.pruner, self.job_dir, self.sweep_dir, self.job = pruner, job_dir, sweep_dir, job
        self.study_name, self.direction = study_name, direction
        self.reports: dict[int, float] = {}
        self.system_attrs: dict[str, Any] = {}  # what the pruner keeps on the trial (SuccessiveHalvingPruner's rungs)
        self.pruned_after_epochs: int | None = None
        self._write()

    def report(self, value: float, step: int) -> bool:
        """Record the figure of `step` (an epoch, from 0); True when the pruner says the trial should stop."""
        self.reports[step] = value
        study = self._study()
        prune = bool(self.pruner.prune(study, study.trials[self.job]))
        self.system_attrs = dict(study.trials[self.job].system_attrs)
        self._write()
        return prune

    def pruned(self, epochs: int) -> None:
        """The trial stopped after `epochs` epochs: recorded in its file, and for this job's result (job_result)."""
        self.pruned_after_epochs = epochs
        self._write()
        _pruned_after.append(epochs)

    def _write(self) -> None:
        data = {"job": self.job, "reports": self.reports, "system_attrs": self.system_attrs}
        atomic_write(self.job_dir / TRIAL_FILE, json.dumps(data | {"pruned_after_epochs": self.pruned_after_epochs}) + "\n")

    def _study(self):
        """A study in memory holding every trial of the sweep so far, this one RUNNING: what the pruner decides on."""
        import warnings

        import optuna
        from optuna.trial import TrialState, create_trial

        storage = optuna.storages.InMemoryStorage()
        said = logging.getLogger(optuna.storages.InMemoryStorage.__module__)  # "A new study created": on stderr
        level = said.level
        said.setLevel(logging.WARNING)
        try:
            study_id = storage.create_new_study(self.study_name)
        finally:
            said.setLevel(level)
        storage.set_study_directions(study_id, [optuna.study.StudyDirection[self.direction.upper()]])
        study = optuna.Study(self.study_name, storage, sampler=optuna.samplers.RandomSampler(), pruner=self.pruner)
        others = {}
        for path in self.sweep_dir.rglob(TRIAL_FILE):
            found = _read(path)
            status = _read_status(path.parent / "job_status.json")  # the job's own record of its number, and its status
            if found is not None and found["job"] != self.job and status.get("job") == found["job"]:
                others[found["job"]] = found | {"state": TrialState[STATES.get(status.get("status"), "RUNNING")]}
        mine = {"reports": self.reports, "system_attrs": self.system_attrs, "state": TrialState.RUNNING}
        none = {"reports": {}, "system_attrs": {}, "state": TrialState.FAIL}  # a job that has not reported
        for job in range(max([self.job, *others]) + 1):  # trial numbers are job numbers (HyperbandPruner's brackets)
            trial = mine if job == self.job else others.get(job, none)
            state, last = trial["state"], trial["reports"][max(trial["reports"])] if trial["reports"] else None
            state = TrialState.FAIL if state == TrialState.COMPLETE and last is None else state
            value = last if state in (TrialState.COMPLETE, TrialState.PRUNED) else None
            with warnings.catch_warnings():  # add_trial and create_trial are "experimental" in Optuna 2.10
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                made = create_trial(
                    state=state, value=value, intermediate_values=trial["reports"], system_attrs=trial["system_attrs"]
                )
                study.add_trial(made)
        return study


def _read_status(path: Path) -> dict[str, Any]:
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def this_job(pruner) -> JobTrial | None:
    """This sweep job's trial, pruned by `pruner`; None outside a sweep that prunes (a single run, a resume, another
    sweeper)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    sweeper = hydra_cfg.sweeper
    if sweeper.get("custom_search_space") != HOOK:
        return None
    job_dir, sweep_dir = Path(hydra_cfg.runtime.output_dir), Path(hydra_cfg.sweep.dir)
    direction = str(sweeper.direction if isinstance(sweeper.direction, str) else sweeper.direction[0]).rpartition(".")[2]
    return JobTrial(pruner, job_dir, sweep_dir, int(hydra_cfg.job.num), str(sweeper.study_name or "vaelab"), direction)


def epoch_figure(metrics: dict[str, Any]) -> float:
    """What a trial reports each epoch: the validation val/recon + val/kl the search minimises (vaelab.runs.sweep.
    objective; val/loss at beta 1: with a searched beta, val/loss would prune trials for their beta). NaN without it."""
    if "val/recon" not in metrics or "val/kl" not in metrics:
        return math.nan
    return float(metrics["val/recon"]) + float(metrics["val/kl"])
