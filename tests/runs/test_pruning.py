"""Optuna pruning in `hparams_search=optuna`: hopeless trials stop early, PRUNED in the study, `pruned` in the summary."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import event_accumulator, one_line, read_metrics, run_cli
from vaelab.errors import UserError
from vaelab.runs import pruning

# Three epochs of a few batches each. With the random sampler's seed 0, lr=choice(1e-6,1e-2) gives job 0 lr=0.01 and
# job 1 lr=1e-06 (which barely learns: val/nelbo about 581 at its second epoch, against about 507 for job 0).
TINY = [
    "epochs=3",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "batch_size=64",
    "data.eval_batch_size=250",
    "~callbacks.progress_bar",
    "hparams_search=optuna",
    "hydra/sweeper/sampler=random",
    "hydra.sweeper.sampler.seed=0",
    "hydra.sweeper.n_trials=2",
    "latent_dim=16",
    "beta=1.0",
    "lr=choice(1e-6,1e-2)",
]
MEDIAN = "callbacks.optuna_pruning.pruner"
DEFAULTS_OFF = f"~{MEDIAN}.n_startup_trials ~{MEDIAN}.n_warmup_steps"  # the preset's MedianPruner settings


def search(sweep_dir: Path, *overrides: str, check: bool = True):
    return run_cli("-m", *TINY, f"hydra.sweep.dir={sweep_dir}", *overrides, check=check)


def rows_of(sweep_dir: Path) -> dict[int, dict]:
    import csv

    with open(sweep_dir / "summary.csv", newline="") as f:
        return {int(row["job"]): row for row in csv.DictReader(f)}


def check_pruned_job(sweep_dir: Path, job: int, epochs: int, done: int) -> None:
    """Job `job` stopped after `done` of its `epochs` epochs, whole: its events, checkpoint and metrics.json."""
    job_dir = sweep_dir / rows_of(sweep_dir)[job]["dir"]
    assert len(event_accumulator(job_dir).Scalars("val/loss")) == done < epochs
    assert torch.load(job_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == done - 1
    metrics = read_metrics(job_dir)
    assert not [key for key in metrics if key.startswith("test/")]  # the test stage was skipped
    reports = json.loads((job_dir / pruning.TRIAL_FILE).read_text())
    assert reports["pruned_after_epochs"] == done and len(reports["reports"]) == done
    assert reports["reports"][str(done - 1)] == pytest.approx(metrics["val/recon"] + metrics["val/kl"], rel=1e-5)
    assert f"Optuna pruned this trial after {done} epoch(s)" in (job_dir / "train.log").read_text()


def test_a_hopeless_trial_is_pruned_in_the_study_and_the_summary(tmp_path):
    sweep_dir = tmp_path / "median"
    # the preset's MedianPruner, from the first completed trial on: job 1 runs after job 0 (basic launcher) and, at
    # its second epoch (step 1, past the warm-up), is worse than job 0 was there
    proc = search(sweep_dir, f"{MEDIAN}.n_startup_trials=1", f"{MEDIAN}.n_warmup_steps=1")
    assert proc.returncode == 0
    rows = rows_of(sweep_dir)
    assert (rows[0]["overrides"].split()[0], rows[1]["overrides"].split()[0]) == ("lr=0.01", "lr=1e-06"), "other draws"
    assert (rows[0]["status"], rows[0]["epochs"], rows[0]["rank"]) == ("ok", "3", "1")
    assert (rows[1]["status"], rows[1]["epochs"], rows[1]["rank"], rows[1]["error"]) == ("pruned", "2", "2", "")
    assert "2 jobs: 1 ok, 0 failed, 1 pruned." in (sweep_dir / "summary.md").read_text()
    assert "| pruned |" in (sweep_dir / "summary.md").read_text()
    assert "(1 ok, 1 pruned, 0 failed)" in proc.stdout + proc.stderr
    assert proc.stderr.count("A new study created") <= 1  # the sweeper's own; a job's pruner says nothing there
    check_pruned_job(sweep_dir, 1, epochs=3, done=2)

    study = {t["job"]: t for t in json.loads((sweep_dir / pruning.STUDY_FILE).read_text())}
    assert (study[0]["state"], study[1]["state"]) == ("COMPLETE", "PRUNED")
    assert study[1]["value"] == pytest.approx(float(rows[1]["val/nelbo"]), rel=1e-5)  # its last report, as Optuna keeps
    assert set(study[0]["reports"]) == {"0", "1", "2"} and set(study[1]["reports"]) == {"0", "1"}
    assert study[1]["reports"]["1"] > study[0]["reports"]["1"]  # why it was pruned
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best_params.lr == pytest.approx(0.01)


@pytest.mark.slow
def test_trials_in_joblib_workers_are_pruned_too(tmp_path):
    sweep_dir = tmp_path / "joblib"
    # both jobs at once, so nothing has completed while they run: a ThresholdPruner, past the first epoch, stops
    # job 1 (about 581) and not job 0 (about 507)
    search(
        sweep_dir,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"{MEDIAN}._target_=optuna.pruners.ThresholdPruner",
        f"~{MEDIAN}.n_startup_trials",
        f"+{MEDIAN}.upper=550.0",
    )
    rows = rows_of(sweep_dir)
    assert [(rows[j]["status"], rows[j]["epochs"]) for j in (0, 1)] == [("ok", "3"), ("pruned", "2")]
    check_pruned_job(sweep_dir, 1, epochs=3, done=2)
    study = {t["job"]: t["state"] for t in json.loads((sweep_dir / pruning.STUDY_FILE).read_text())}
    assert study == {0: "COMPLETE", 1: "PRUNED"}


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (f"{MEDIAN}.n_startup_trials=-1", f"{MEDIAN} (optuna.pruners.MedianPruner) refuses its settings: ValueError"),
        (f"{MEDIAN}._target_=optuna.samplers.RandomSampler {DEFAULTS_OFF}", "is not an Optuna pruner"),
        ("hydra.sweeper.custom_search_space=null", "pruning needs vaelab.runs.pruning.prepare_trial there"),
    ],
)
def test_bad_pruning_settings_end_in_one_line_before_any_trial(tmp_path, override, says):
    sweep_dir = tmp_path / "bad"
    proc = search(sweep_dir, *override.split(), check=False)
    assert proc.returncode == 1
    assert says in one_line(proc, "vaelab-train: error: ")
    assert not [p for p in sweep_dir.iterdir() if p.is_dir()]  # no job was started


# --- the parts, in this process -----------------------------------------------------------------------------------


def sweep_config(sweep_dir: Path, **pruner) -> OmegaConf:
    return OmegaConf.create(
        {
            "callbacks": {"optuna_pruning": {"_target_": pruning.CALLBACK, "pruner": pruner}},
            "hydra": {
                "sweep": {"dir": str(sweep_dir)},
                "sweeper": {
                    "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                    "custom_search_space": pruning.HOOK,
                    "direction": "minimize",
                },
            },
        }
    )


def past_job(sweep_dir: Path, job: int, status: str, reports: dict[int, float], pruned_after: int | None = None) -> Path:
    job_dir = sweep_dir / f"{job}_x"
    job_dir.mkdir(parents=True)
    (job_dir / "job_status.json").write_text(json.dumps({"job": job, "status": status}))
    data = {"job": job, "reports": reports, "system_attrs": {}, "pruned_after_epochs": pruned_after}
    (job_dir / pruning.TRIAL_FILE).write_text(json.dumps(data))
    return job_dir


def test_a_job_is_pruned_against_the_median_of_the_completed_jobs(tmp_path):
    import optuna

    sweep_dir = tmp_path / "sweep"
    past_job(sweep_dir, 0, "ok", {0: 500.0, 1: 400.0})
    past_job(sweep_dir, 1, "ok", {0: 520.0, 1: 420.0})
    past_job(sweep_dir, 2, "failed", {0: 90.0, 1: 50.0})  # failed: not in the median
    past_job(sweep_dir, 3, "pruned", {0: 10.0}, pruned_after=1)  # pruned: nor this
    past_job(sweep_dir, 4, "running", {0: 1.0, 1: 1.0})  # still running: nor this
    (sweep_dir / "5_x").mkdir()
    (sweep_dir / "5_x" / pruning.TRIAL_FILE).write_text('{"job": "five"}')  # not vaelab's: left out
    median = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    (sweep_dir / "6_x").mkdir()
    mine = pruning.JobTrial(median, sweep_dir / "6_x", sweep_dir, 6, "vaelab", "minimize")
    assert json.loads((sweep_dir / "6_x" / pruning.TRIAL_FILE).read_text())["reports"] == {}  # the others see it
    assert mine.report(900.0, 0) is False  # step 0 is the warm-up
    # step 1: the median of the completed jobs' step-1 figures is (400 + 420) / 2 = 410
    assert mine.report(415.0, 1) is True
    mine.reports.pop(1)
    assert mine.report(405.0, 1) is False
    written = json.loads((sweep_dir / "6_x" / pruning.TRIAL_FILE).read_text())
    assert written["reports"] == {"0": 900.0, "1": 405.0} and written["pruned_after_epochs"] is None

    (sweep_dir / "1_x" / "job_status.json").write_text(json.dumps({"job": 1, "status": "running"}))
    assert mine.report(1000.0, 2) is False  # one completed job: n_startup_trials=2 not reached
    assert pruning.job_result(lambda: mine.pruned(3) or 1000.0).epochs == 3


def test_the_sweeps_study_tells_a_pruned_job_pruned(tmp_path):
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir = tmp_path / "sweep"
    config = sweep_config(sweep_dir, _target_="optuna.pruners.MedianPruner", n_startup_trials=1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trials = [study.ask() for _ in range(3)]
    for trial in trials:
        pruning.prepare_trial(config, trial)  # what hydra-optuna-sweeper calls for each trial of a batch, in order
    assert [t.user_attrs[pruning.JOB_ATTR] for t in trials] == [[str(sweep_dir), n] for n in range(3)]
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    past_job(sweep_dir, 0, "ok", {0: 5.0, 1: 4.0})
    past_job(sweep_dir, 1, "pruned", {0: 9.0, 1: 8.5}, pruned_after=2)

    # as the sweeper tells them: COMPLETE with each job's figure, FAIL for a job that raised
    study.tell(trial=trials[0], state=TrialState.COMPLETE, values=[4.0])
    study.tell(trial=trials[1], state=TrialState.COMPLETE, values=[8.5])
    study.tell(trial=trials[2], state=TrialState.FAIL, values=None)
    done = study.get_trials(deepcopy=False)
    assert [t.state for t in done] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert done[0].intermediate_values == {0: 5.0, 1: 4.0} and done[1].intermediate_values == {0: 9.0, 1: 8.5}
    assert done[1].value == 8.5 and done[1].user_attrs[pruning.PRUNED_ATTR] == 2
    assert study.best_trial.number == 0
    written = json.loads((sweep_dir / pruning.STUDY_FILE).read_text())
    assert [(t["job"], t["state"], t["value"]) for t in written] == [(0, "COMPLETE", 4.0), (1, "PRUNED", 8.5), (2, "FAIL", None)]


def test_a_pruned_result_crosses_processes_and_never_outlives_its_job():
    result = pickle.loads(pickle.dumps(pruning.Pruned(512.5, 2)))  # a joblib worker's result
    assert isinstance(result, pruning.Pruned) and float(result) == 512.5 and result.epochs == 2
    pruning._pruned_after.append(2)  # a previous job of this process was pruned
    assert type(pruning.job_result(lambda: 3.0)) is float


def test_pruning_settings_are_checked_before_the_sweep(tmp_path):
    config = sweep_config(tmp_path, _target_="optuna.pruners.MedianPruner")
    pruning.check(config)
    del config.callbacks.optuna_pruning
    pruning.check(config)  # no pruning: nothing to check
    config = sweep_config(tmp_path, _target_="optuna.pruners.MedianPruner")
    config.hydra.sweeper.direction = ["minimize", "maximize"]
    with pytest.raises(UserError, match="prunes only single-objective"):
        pruning.check(config)
    config.hydra.sweeper._target_ = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    with pytest.raises(UserError, match="add hparams_search=optuna"):
        pruning.check(config)
