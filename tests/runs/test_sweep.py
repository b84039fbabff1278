"""Sweeps from the shell: the basic and joblib launchers, the summary, a failed job, Optuna, DDP on CPU, SLURM."""

from __future__ import annotations

import csv
import math
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import FAST, event_accumulator, read_metrics, run_cli

# A few batches per job: sweeps pay a start-up per job, so the jobs themselves are kept tiny.
SWEEP_FAST = [*FAST, "epochs=1", "trainer.limit_train_batches=5", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]


def sweep(sweep_dir, *overrides, check=True):
    return run_cli("-m", *SWEEP_FAST, f"hydra.sweep.dir={sweep_dir}", *overrides, check=check)


def summary_rows(sweep_dir) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def job_dirs(sweep_dir):
    return sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def hparams_of_run(run_dir) -> dict:
    content = event_accumulator(run_dir).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def test_joblib_sweep_runs_jobs_in_parallel_each_in_its_own_tensorboard_run(tmp_path):
    sweep_dir = tmp_path / "joblib"
    proc = sweep(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "latent_dim=2,16", "noise_factor=0.1,0.3")
    jobs = job_dirs(sweep_dir)
    # each job its own directory, named by its number and overrides, each a TensorBoard run of its own
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1", "2", "3"]
    expected = [(2, 0.1), (2, 0.3), (16, 0.1), (16, 0.3)]
    from joblib import cpu_count

    for job, (latent, noise) in zip(jobs, expected):
        assert job.name == f"{jobs.index(job)}_latent_dim={latent},noise_factor={noise}"  # the varying settings only
        acc = event_accumulator(job)
        assert {"val/loss", "train/loss"} <= set(acc.Tags()["scalars"])
        params = hparams_of_run(job)  # the HPARAMS tab's row for this run, compared by the final val/loss
        assert params["latent_dim"] == latent and params["noise_factor"] == pytest.approx(noise)
        assert (job / "checkpoints" / "last.ckpt").exists()
        # two jobs at once share the cores: each torch gets cores // 2 threads (1 on a 2-core machine)
        assert f"{max(1, cpu_count() // 2)} torch thread(s) per job" in (job / "train.log").read_text()

    rows = summary_rows(sweep_dir)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    nelbo = [float(r["val/nelbo"]) for r in rows]
    assert nelbo == sorted(nelbo)  # best first
    for row in rows:
        metrics = read_metrics(sweep_dir / row["dir"])
        assert float(row["val/loss"]) == pytest.approx(metrics["val/loss"])
        assert float(row["test/loss"]) == pytest.approx(metrics["test/loss"])
        assert float(row["val/nelbo"]) == pytest.approx(metrics["val/recon"] + metrics["val/kl"])
        assert row["epochs"] == "1" and float(row["wall_time_s"]) > 0 and row["error"] == ""
    assert "sweep summary:" in proc.stdout
    table = (sweep_dir / "summary.md").read_text()
    assert "4 jobs: 4 ok, 0 failed" in table and table.count("| ok |") == 4


def test_basic_sweep_with_a_failing_job_finishes_the_others_and_summarises_all(tmp_path):
    sweep_dir = tmp_path / "basic"
    proc = sweep(sweep_dir, "latent_dim=2,16", "model.objective=elbo,bogus", check=False)
    assert proc.returncode != 0  # Hydra's basic sweeper reports the failure after running every job
    assert len(job_dirs(sweep_dir)) == 4
    rows = summary_rows(sweep_dir)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    ok, failed = rows[:2], rows[2:]
    assert float(ok[0]["val/nelbo"]) <= float(ok[1]["val/nelbo"])
    for row in ok:
        assert "model.objective=elbo" in row["overrides"] and row["error"] == ""
        assert list((sweep_dir / row["dir"] / "tensorboard").glob("events.out.tfevents.*"))
        assert event_accumulator(sweep_dir / row["dir"]).Scalars("val/loss")
    for row in failed:
        assert "model.objective=bogus" in row["overrides"]
        assert "bogus" in row["error"] and row["val/loss"] == "" and row["epochs"] == ""
        assert not (sweep_dir / row["dir"] / "metrics.json").exists()
    assert sorted(r["job"] for r in failed) == ["1", "3"]
    assert "2 ok, 2 failed" in (sweep_dir / "summary.md").read_text()


def test_optuna_search_goes_on_past_a_diverged_trial(tmp_path):
    sweep_dir = tmp_path / "optuna"
    # latent and beta fixed, so the seeded random sampler draws lr only: 1e6 (NaN at the first step), then 1e-3
    proc = sweep(
        sweep_dir,
        "hparams_search=optuna",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.n_trials=2",
        "latent_dim=256",
        "beta=1.0",
        "lr=choice(1e-3,1e6)",
    )
    rows = summary_rows(sweep_dir)
    assert sorted(r["overrides"].split()[0] for r in rows) == ["lr=0.001", "lr=1000000.0"], "the sampler drew other values"
    assert [(r["status"], r["overrides"].split()[0]) for r in rows] == [("ok", "lr=0.001"), ("failed", "lr=1000000.0")]
    assert "nan" in rows[1]["error"] and "lower the learning rate" in rows[1]["error"]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"]["lr"] == pytest.approx(1e-3)
    assert results["best_value"] == pytest.approx(float(rows[0]["val/nelbo"]))
    assert proc.returncode == 0


def test_ddp_on_cpu_two_processes_write_one_run(tmp_path):
    run_dir, temp = tmp_path / "ddp", tmp_path.parent / f"{tmp_path.name}-temp"
    temp.mkdir()
    proc = run_cli(
        *FAST,
        "trainer=ddp",
        "trainer.devices=2",
        "epochs=1",
        "trainer.limit_train_batches=6",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"TMPDIR": str(temp)},
    )
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in proc.stderr and "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # both ranks wrote into the one Hydra run dir
    # Lightning's spawn launcher passes the weights back through a file in a folder of the temp dir: nothing is left
    # but torch's compile cache (torchinductor_<user>, kept for every later run, as torch means it)
    assert [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")] == []
    metrics = read_metrics(run_dir)
    assert metrics["val/loss"] > 0 and metrics["test/loss"] > 0
    assert metrics["val/loss"] == pytest.approx(metrics["val/recon"] + metrics["val/kl"], rel=1e-5)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert len(list((run_dir / "checkpoints").glob("best-epoch*.ckpt"))) == 1
    acc = event_accumulator(run_dir)
    # each scalar written once (by rank 0): one val/loss point for one epoch, not one per rank
    assert len(acc.Scalars("val/loss")) == 1 and hparams_of_run(run_dir)["test/loss"] == pytest.approx(metrics["test/loss"])
    assert acc.Scalars("val/loss")[0].value == pytest.approx(metrics["val/loss"], rel=1e-6)
    # bits per dimension from the means over both ranks' images, once, beside the nats figure
    [nats], [bpd] = acc.Scalars("val/nelbo"), acc.Scalars("val/nelbo_bpd")
    assert nats.value == pytest.approx(metrics["val/nelbo"], rel=1e-6) and bpd.step == nats.step
    assert bpd.value == pytest.approx(metrics["val/nelbo"] / (784 * math.log(2)), rel=1e-6)
    for tag in ("test/nelbo", "test/nll_iwae"):
        assert metrics[f"{tag}_bpd"] == pytest.approx(metrics[tag] / (784 * math.log(2)), rel=1e-6)
    assert hparams_of_run(run_dir)["latent_dim"] == 256


def test_slurm_and_optuna_presets_compose():
    hydra_cfg = yaml.safe_load(run_cli("hydra/launcher=slurm", "--cfg", "hydra").stdout)["hydra"]
    launcher = hydra_cfg["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["timeout_min"] == 120 and launcher["gpus_per_node"] == 1 and launcher["tasks_per_node"] == 1
    assert launcher["cpus_per_task"] == 8 and launcher["mem_gb"] == 32 and "partition" in launcher
    out = run_cli("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra").stdout
    assert yaml.safe_load(out)["hydra"]["launcher"]["partition"] == "gpu"

    sweeper = yaml.safe_load(run_cli("hparams_search=optuna", "--cfg", "hydra").stdout)["hydra"]["sweeper"]
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["direction"] == "minimize"
    assert set(sweeper["params"]) == {"latent_dim", "lr", "beta"} and "log" in sweeper["params"]["lr"]
    assert sweeper["max_failure_rate"] == 1.0


def test_the_summary_gives_bits_per_dim_and_names_each_jobs_likelihood_and_binarization(tmp_path):
    """summary.csv and summary.md from jobs' own records (no training): bits/dim and the IWAE figure beside the nats,
    and the likelihood and binarization of each job, a Bernoulli on grey levels labelled as not a density."""
    import json

    from vaelab.runs.sweep import write_summary

    jobs = [
        ("bernoulli", "none", {"val/recon": 240.0, "val/kl": 20.0, "test/nll_iwae": 255.0}),
        ("discretized_logistic", "none", {"val/recon": 1500.0, "val/kl": 30.0, "test/nll_iwae": 1520.0}),
        ("bernoulli", "dynamic", {"val/recon": 200.0, "val/kl": 25.0, "test/nll_iwae": 221.0}),
    ]
    for num, (likelihood, binarize, figures) in enumerate(jobs):
        job_dir = tmp_path / f"{num}_job"
        job_dir.mkdir()
        nelbo = figures["val/recon"] + figures["val/kl"]
        metrics = {
            "likelihood": likelihood,
            "binarize": binarize,
            "figures": "...",
            **figures,
            "val/loss": nelbo,
            "val/nelbo": nelbo,
            "val/nelbo_bpd": nelbo / (784 * math.log(2)),
            "test/loss": nelbo + 1,
            "test/nelbo_bpd": (nelbo + 1) / (784 * math.log(2)),
            "test/nll_iwae_bpd": figures["test/nll_iwae"] / (784 * math.log(2)),
        }
        (job_dir / "metrics.json").write_text(json.dumps(metrics))
        (job_dir / "job_status.json").write_text(json.dumps({"job": num, "status": "ok", "epochs": 1, "wall_time_s": 3.0}))
    write_summary(tmp_path)
    rows = summary_rows(tmp_path)
    assert [(r["likelihood"], r["binarize"]) for r in rows] == [
        ("bernoulli", "dynamic"),
        ("bernoulli", "none"),
        ("discretized_logistic", "none"),
    ]  # best val/nelbo first
    for row in rows:
        metrics = json.loads((tmp_path / row["dir"] / "metrics.json").read_text())
        for key in ("val/nelbo_bpd", "test/nelbo_bpd", "test/nll_iwae", "test/nll_iwae_bpd"):
            assert float(row[key]) == pytest.approx(metrics[key])
    table = (tmp_path / "summary.md").read_text().splitlines()
    header = [c.strip() for c in table[4].strip("|").split("|")]
    assert {
        "val/nelbo",
        "val/nelbo_bpd",
        "test/nelbo_bpd",
        "test/nll_iwae",
        "test/nll_iwae_bpd",
        "likelihood",
        "binarize",
    } <= set(header)
    cells = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[6:]]
    assert [c["likelihood"] for c in cells] == [
        "bernoulli",
        "bernoulli (Bernoulli on grey levels, not a density)",
        "discretized_logistic",
    ]
    assert cells[1]["val/nelbo_bpd"] == f"{260 / (784 * math.log(2)):.4f}"


def test_objective_is_the_negative_elbo_and_never_nan():
    from vaelab.runs.sweep import NonFiniteObjective, objective

    assert objective({"val/loss": 103.0, "val/recon": 100.0, "val/kl": 6.0}) == 106.0  # beta = 0.5: not val/loss
    assert objective({"test/loss": 1.0}) is None  # no validation: Optuna records a failed trial
    with pytest.raises(NonFiniteObjective, match="nan"):
        objective({"val/recon": math.nan, "val/kl": 1.0})


def test_a_failed_job_ends_the_sweep_in_one_line(tmp_path):
    from conftest import one_line

    proc = sweep(tmp_path / "s", "latent_dim=0,4", "trainer.limit_train_batches=2", check=False)
    line = one_line(proc, "vaelab-train: error: 1 of 2 jobs failed; the first, job 0 (")
    assert "latent_dim=0 is not allowed" in line and line.endswith(f"summary: {tmp_path / 's' / 'summary.md'}")
    assert "latent_dim=0 is not allowed" in next((tmp_path / "s").glob("0_*/train.log")).read_text()


def live(pids) -> list[int]:
    from pathlib import Path

    return [
        pid
        for pid in pids
        if Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] not in "ZX"
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_joblib_sweep_stops_its_workers_and_marks_its_jobs(tmp_path, signum):
    """Both jobs are held in their second epoch (tests/pausing.py), then the sweep's main process is signalled."""
    from conftest import PAUSING_ENV, finished, pause_at, start, wait_for

    sweep_dir, markers = tmp_path / "sweep", tmp_path / "markers"
    markers.mkdir()
    proc = start(
        "-m",
        *SWEEP_FAST,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "latent_dim=2,4,8",
        f"hydra.sweep.dir={sweep_dir}",
        *pause_at(markers / "${latent_dim}", epoch=0, batch=3),
        log=tmp_path / "sweep",
        env=PAUSING_ENV,
    )
    wait_for(markers / "2", proc)
    wait_for(markers / "4", proc)
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    os.kill(proc.pid, signum)
    done = finished(proc, tmp_path / "sweep", timeout=120)
    deadline = time.monotonic() + 60
    while live(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live(workers) == []  # no worker goes on training, or holds its memory, once the sweep is stopped
    rows = {next(o for o in r["overrides"].split() if o.startswith("latent_dim=")): r for r in summary_rows(sweep_dir)}
    # once seen under make test's load (SIGKILL): latent_dim=2 left 'running'; the jobs' logs say how the workers ended
    assert {k: r["status"] for k, r in rows.items()} == {"latent_dim=2": "interrupted", "latent_dim=4": "interrupted"}, "".join(
        f"\n--- {log}\n{log.read_text()[-2000:]}" for log in sorted(sweep_dir.glob("*/train.log"))
    )
    assert not (markers / "8").exists()  # the third job never started
    if signum == signal.SIGTERM:
        from conftest import one_line

        line = one_line(
            done,
            "vaelab-train: interrupted: stopped by SIGTERM; the sweep stopped with 0 job(s) done, 0 failed and 2 interrupted",
            code=143,
        )
        assert line.endswith(f"summary: {sweep_dir / 'summary.md'}")
    assert "2 interrupted" in (sweep_dir / "summary.md").read_text()


def test_a_stopping_sweep_leaves_lokys_helpers_alone(tmp_path):
    """What the stop ends last is every child but loky's helpers (its process-tree kill runs pgrep from the sweep's
    process meanwhile; ended, loky prints a traceback): a pgrep, and a fork of the sweep's process not yet exec'd
    (the pgrep a moment earlier, its command line still the sweep's). A worker (another program) is not one."""
    import shutil
    import subprocess

    from vaelab.runs import workers

    (tmp_path / "pgrep").symlink_to(shutil.which("sleep"))  # a process the kernel names pgrep
    named, worker = (subprocess.Popen([program, "60"]) for program in (str(tmp_path / "pgrep"), shutil.which("sleep")))
    read, write = os.pipe()
    forked = os.fork()
    if forked == 0:  # a fork that has not exec'd: it waits for the pipe to close, then ends running nothing
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        assert set(workers.children()) >= {named.pid, worker.pid, forked}
        assert workers.helper(named.pid) and workers.helper(forked)
        assert not workers.helper(worker.pid)
    finally:
        os.close(write)
        os.waitpid(forked, 0)
        for process in (named, worker):
            process.kill()
            process.wait()
    assert not workers.helper(forked)  # gone: nothing to leave alone


def test_a_pruned_job_is_summarised_as_pruned_and_fails_nothing(tmp_path, caplog):
    """SweepSummary (no training): a job whose result is vaelab.runs.pruning.Pruned is `pruned`, with the epochs it
    trained, ranked after the finished jobs, and a sweep that fails on failed jobs still ends well."""
    import json
    import logging

    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from vaelab.runs.pruning import Pruned
    from vaelab.runs.sweep import SweepSummary

    summary = SweepSummary(fail_on_failed_jobs=True)
    for num, result in enumerate([Pruned(300.0, 2), 250.0, 260.0]):
        job_dir = tmp_path / f"{num}_job"
        job_dir.mkdir()
        config = OmegaConf.create(
            {
                "trainer": {"max_epochs": 5},
                "hydra": {
                    "mode": RunMode.MULTIRUN,
                    "runtime": {"output_dir": str(job_dir)},
                    "sweep": {"dir": str(tmp_path)},
                    "job": {"num": num},
                    "overrides": {"task": [f"lr={num}"]},
                },
            }
        )
        summary.on_job_start(config)
        nelbo = float(result)
        (job_dir / "metrics.json").write_text(json.dumps({"val/recon": nelbo - 10, "val/kl": 10.0, "val/loss": nelbo}))
        summary.on_job_end(config, JobReturn(status=JobStatus.COMPLETED, _return_value=result))
    rows = summary_rows(tmp_path)
    assert [(r["job"], r["status"], r["epochs"]) for r in rows] == [("1", "ok", "5"), ("2", "ok", "5"), ("0", "pruned", "2")]
    assert "3 jobs: 2 ok, 0 failed, 1 pruned." in (tmp_path / "summary.md").read_text()
    end = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "help": {"app_name": "vaelab-train"}}})
    with caplog.at_level(logging.INFO, logger="vaelab.runs.sweep"):
        summary.on_multirun_end(end)  # a failed job would end the process here (status 1)
    assert "(2 ok, 1 pruned, 0 failed); best: job 1 (lr=1)" in caplog.text
