"""Sweeps: the figure a sweeper minimises, torch threads for parallel jobs, and the summary of every multirun.

Importing this module is cheap (no torch): Hydra builds the summary callback before the first job starts.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vaelab.errors import DISK_ERRNOS, Interrupted, UserError, disk_message, end, exit_cleanly, one_line, quiet, record, stop_with
from vaelab.files import atomic_write
from vaelab.runs import pruning, workers
from vaelab.runs.rundir import COMMANDS, MARKER, check_run

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"
STATUSES = ("ok", "failed", "pruned", "interrupted", "running")  # running: still going, or its process died unreported
DONE = ("ok", "pruned")  # pruned: stopped early by Optuna's pruner (vaelab.runs.pruning), not a failure
METRIC_COLUMNS = (
    "val/nelbo_bpd",
    "val/loss",
    "val/recon",
    "val/kl",
    "test/loss",
    "test/nelbo_bpd",
    "test/nll_iwae",
    "test/nll_iwae_bpd",
)
LABELS = ("likelihood", "binarize")  # what the figures are, from each job's metrics.json
COLUMNS = ("rank", "job", "status", "val/nelbo", *METRIC_COLUMNS, *LABELS, "epochs", "wall_time_s", "overrides", "error", "dir")
MD_COLUMNS = COLUMNS[:-1]  # the table leaves out dir: the job number starts the directory's name


class NonFiniteObjective(FloatingPointError):
    """The figure a sweeper would minimise is NaN or infinite: the job fails instead of returning it."""


def objective(metrics: dict[str, float]) -> float | None:
    """The figure sweepers minimise: the final validation negative ELBO, val/recon + val/kl.

    It equals val/loss when beta = 1. With another beta, val/loss = recon + beta * kl is smallest for the
    smallest beta whatever the model, so a search over beta would only find its lower bound.
    None when there was no validation (the Optuna sweeper then records the trial as failed).
    """
    if "val/recon" not in metrics or "val/kl" not in metrics:
        return None
    value = metrics["val/recon"] + metrics["val/kl"]
    if not math.isfinite(value):
        # hydra-optuna-sweeper 1.3 crashes the whole study on a NaN return value; a raised error fails one trial.
        raise NonFiniteObjective(
            f"the final val/recon + val/kl is {value} (val/recon {metrics['val/recon']}, "
            f"val/kl {metrics['val/kl']}); lower the learning rate (lr=...) or raise beta"
        )
    return value


def parallel_threads() -> int | None:
    """Torch threads for one job of a joblib sweep: the cores shared out among the jobs that run at once
    (the launcher's n_jobs; -1, joblib's default, means one job per core). None outside such a sweep."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or "joblib" not in str(hydra_cfg.launcher.get("_target_", "")):
        return None
    from joblib import cpu_count, effective_n_jobs

    cores, jobs = cpu_count(), effective_n_jobs(hydra_cfg.launcher.n_jobs)
    threads = max(1, cores // jobs)
    log.info("joblib sweep: up to %d jobs at once on %d cores, %d torch thread(s) per job", jobs, cores, threads)
    return threads


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """An exclusive lock on the sweep's marker file (the directory's own lock is the sweep's, held while it runs;
    the marker is made again if someone removed it): parallel jobs that end at the same moment take turns, so the
    last summary written is the one that saw every job. (Opened for writing: NFS emulates flock with POSIX locks.)"""
    fd = os.open(sweep_dir / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job under sweep_dir (each job dir holds the job_status.json the callback wrote), best first:
    finished jobs by val/nelbo, then the rest by job number."""
    rows = []
    for status_path in sweep_dir.rglob(STATUS_FILE):
        job_dir = status_path.parent
        status = _read_json(status_path)
        metrics = _read_json(job_dir / "metrics.json")
        nelbo = metrics["val/recon"] + metrics["val/kl"] if {"val/recon", "val/kl"} <= metrics.keys() else None
        rows.append(
            {
                "job": status.get("job"),
                "status": status.get("status", "unknown"),
                "val/nelbo": nelbo,
                **{key: metrics.get(key) for key in (*METRIC_COLUMNS, *LABELS)},
                "epochs": status.get("epochs") if status.get("status") in DONE else None,
                "wall_time_s": status.get("wall_time_s"),
                "overrides": " ".join(status.get("overrides", [])),
                "error": status.get("error", ""),
                "dir": str(job_dir.relative_to(sweep_dir)),
            }
        )

    def best_first(row):
        ok = row["status"] == "ok" and row["val/nelbo"] is not None and math.isfinite(row["val/nelbo"])
        return (0, row["val/nelbo"]) if ok else (1, row["job"] if row["job"] is not None else math.inf)

    rows.sort(key=best_first)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key == "wall_time_s":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.6g}"
    return str(value)


def _labelled(row: dict[str, Any]) -> str | None:
    """The likelihood as summary.md names it: a Bernoulli on grey levels says its figures are not a density's."""
    if row["likelihood"] == "bernoulli" and row["binarize"] == "none":
        return "bernoulli (Bernoulli on grey levels, not a density)"
    return row["likelihood"]


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """summary.csv (every figure in full) and summary.md (a table to read) in sweep_dir."""
    rows = collect(sweep_dir)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if row[k] is None else row[k]) for k in COLUMNS} for row in rows)
    atomic_write(sweep_dir / "summary.csv", table.getvalue())

    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(rows)} jobs: {counts['ok']} ok, {counts['failed']} failed"
        + "".join(f", {counts[s]} {s}" for s in STATUSES[2:] if counts[s])
        + ". Best first, by val/nelbo = val/recon + val/kl (the negative ELBO, nats per image; "
        "val/loss when beta = 1), under each job's likelihood and binarization; pruned: stopped by Optuna's pruner "
        "after `epochs` epochs, its figures from then; *_bpd: the same figure in bits per "
        "dimension; test/nll_iwae: the IWAE estimate of -log p(x) (K = model.eval_iwae_samples). Wall time in seconds.",
        "",
        "| " + " | ".join(MD_COLUMNS) + " |",
        "|" + "---|" * len(MD_COLUMNS),
    ]
    for row in rows:
        cells = [_cell(k, _labelled(row) if k == "likelihood" else row[k]).replace("|", "\\|") for k in MD_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return rows


def _update_status(job_dir: Path, sweep_dir: Path, **changes: Any) -> None:
    """Change a job's job_status.json and rewrite the sweep's summary (under the sweep directory's lock)."""
    with _locked(sweep_dir):
        status = _read_json(job_dir / STATUS_FILE)
        if status.get("status", "running") == "running" or changes.get("status") != "interrupted":
            status.update(changes)
            _write_json(job_dir / STATUS_FILE, status)
        write_summary(sweep_dir)


def _mark_unfinished(sweep_dir: Path, error: str) -> list[dict[str, Any]]:
    """Every job still 'running' becomes 'interrupted' (its process is gone); returns the summary's rows."""
    with _locked(sweep_dir):
        for status_path in sweep_dir.rglob(STATUS_FILE):
            status = _read_json(status_path)
            if status.get("status") == "running":
                status.update(status="interrupted", error=error)
                _write_json(status_path, status)
        return write_summary(sweep_dir)


def how_far(rows: list[dict[str, Any]], sweep_dir: Path) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return (
        f"the sweep stopped with {counts['ok']} job(s) done, "
        + (f"{counts['pruned']} pruned, " if counts["pruned"] else "")
        + f"{counts['failed']} failed and {counts['interrupted']} interrupted (each continues with vaelab-resume "
        f"<its job dir>); summary: {sweep_dir / 'summary.md'}"
    )


def run_job(prog: str, cfg: DictConfig, work: Callable[[], Any]) -> Any:
    """A command's task (vaelab.commands.cli), where Hydra would print a line of its own for a task that raises and go
    on to a sweep's next job. A single run: its errors end the command here, in one line. A sweep's job, in the sweep's
    process or a joblib worker: its settings are checked here (a single run's were, by RunDirectory, before its
    directory was made); a refusal or a disk fault marks it failed and the sweep goes on (SweepSummary ends it in one
    line naming the failures); a stop marks it and ends the sweep saying how far it got, or, in a joblib worker whose
    sweep has ended (the parent-death signal), ends the worker."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        with exit_cleanly(prog):  # Hydra's own line for a task that raises forces this second boundary
            return work()
    quiet()  # a joblib worker starts afresh
    job_dir, sweep_dir = Path(HydraConfig.get().runtime.output_dir), Path(HydraConfig.get().sweep.dir)
    try:
        check_run(cfg, COMMANDS[prog])
        return pruning.job_result(work)
    except (UserError, OSError) as err:
        if isinstance(err, OSError) and err.errno not in DISK_ERRNOS:
            raise
        message = disk_message(err) if isinstance(err, OSError) else str(err)
        record(err, message)
        _update_status(job_dir, sweep_dir, status="failed", error=one_line(message))
    except Exception as err:  # a bug: recorded, and its traceback left to Hydra
        _update_status(job_dir, sweep_dir, status="failed", error=f"{type(err).__name__}: {one_line(err)}".rstrip(": "))
        raise
    except (Interrupted, KeyboardInterrupt) as err:
        message, code = (str(err) if isinstance(err, Interrupted) else "stopped by SIGINT"), getattr(err, "exit_code", 130)
        record(err, message)
        if workers.sweep_ended():  # no one is left to report to, or to stop this worker
            why = f"the sweep's main process ended while this job ran: {message}"
            _update_status(job_dir, sweep_dir, status="interrupted", error=one_line(why))
            os._exit(code)  # loky would take a SystemExit for the job's result and give this worker the next job
        _update_status(job_dir, sweep_dir, status="interrupted", error=one_line(message))
        stop = Interrupted(f"{message}; {how_far(collect(sweep_dir), sweep_dir)}", code - 128)
        stop.recorded = True  # type: ignore[attr-defined]  (in the job's log already)
        raise stop from None


class SweepSummary(Callback):
    """Hydra callback: each multirun job records its status and wall time in <job dir>/job_status.json, and the
    sweep directory gets summary.csv and summary.md.

    The summary is rewritten as each job ends, in the job's own process (with the joblib launcher, a worker),
    because Hydra's basic sweeper raises after a batch with a failed job and never calls on_multirun_end;
    on_multirun_end writes it once more, and marks jobs that never reported as interrupted. A joblib sweep's main
    process, stopped by SIGTERM or SIGINT, passes it on to its workers, waits for them to stop their jobs cleanly, and
    exits (vaelab.errors.stop_with); its workers end with it however it ends (vaelab.runs.workers).
    """

    def __init__(self, fail_on_failed_jobs: bool = True):
        self.fail_on_failed_jobs = fail_on_failed_jobs  # false for a search whose failed trials are part of it (Optuna)
        self.sweep_pid: int | None = None  # a joblib sweep's main process (the workers get it with this callback)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_cleanly(config.hydra.help.app_name):  # Hydra would take an error in a callback for a warning
            pruning.check(config)  # before Optuna's study is made
        if "joblib" in str(config.hydra.launcher.get("_target_", "")):
            self.sweep_pid = os.getpid()
            workers.start_with_initializer(self.sweep_pid)
            sweep_dir, app = Path(config.hydra.sweep.dir), config.hydra.help.app_name
            stop_with(lambda signum: self.stop_workers(signum, sweep_dir, app))

    @staticmethod
    def stop_workers(signum: int, sweep_dir: Path, app: str, grace: float = 60.0) -> None:
        """SIGTERM to every worker, wait until their jobs have stopped (or `grace` seconds), end them, say how far.
        Only that line reaches stderr: joblib's own threads, seeing their workers go, print tracebacks and warnings
        there (its process-tree kill fails once its pgrep is among the children ended here)."""
        stderr = os.dup(2)
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        started = workers.children()
        for pid in started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        running = lambda: [r for r in collect(sweep_dir) if r["status"] == "running"]  # noqa: E731
        while time.monotonic() < deadline and running() and any(workers.alive(pid) for pid in started):
            time.sleep(0.2)
        for pid in workers.children():  # workers that took the next job meanwhile (not loky's helpers)
            if workers.helper(pid):
                continue
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        rows = _mark_unfinished(sweep_dir, f"the sweep was stopped by {signal.Signals(signum).name}")
        message = f"stopped by {signal.Signals(signum).name}; {how_far(rows, sweep_dir)}"
        end(app, "interrupted", message, 128 + signum, fd=stderr, at_once=True)  # joblib's shutdown would wait for them

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if self.sweep_pid is not None:
            workers.join_sweep(self.sweep_pid)  # no job starts once the sweep has ended
        status = {"job": int(config.hydra.job.num), "status": "running", "started": time.time()}
        _write_json(
            Path(config.hydra.runtime.output_dir) / STATUS_FILE, status | {"overrides": list(config.hydra.overrides.task)}
        )

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        from hydra.core.utils import JobStatus

        job_dir = Path(config.hydra.runtime.output_dir)
        status = _read_json(job_dir / STATUS_FILE)
        started = status.get("started")
        error = status.get("error", "") if status.get("status") == "failed" else ""  # run_job's record
        if job_return.status != JobStatus.COMPLETED and not error:
            error = "the job failed (see its log)"
        pruned = not error and isinstance(job_return.return_value, pruning.Pruned)
        _update_status(
            job_dir,
            Path(config.hydra.sweep.dir),
            job=int(config.hydra.job.num),
            status="failed" if error else "pruned" if pruned else "ok",
            wall_time_s=round(time.time() - started, 2) if started else None,
            # as set (only max_steps or early stopping end sooner), or as many as a pruned trial trained
            epochs=job_return.return_value.epochs if pruned else OmegaConf.select(config, "trainer.max_epochs"),
            error=error,
            overrides=list(config.hydra.overrides.task),
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = _mark_unfinished(sweep_dir, "the job's process ended without reporting a result")
        ok = [r for r in rows if r["status"] == "ok"]
        best = (
            f"; best: job {ok[0]['job']} ({ok[0]['overrides']}), val/nelbo {ok[0]['val/nelbo']:.4f}"
            if ok and ok[0]["val/nelbo"] is not None
            else ""
        )
        pruned = sum(r["status"] == "pruned" for r in rows)
        log.info(
            "sweep summary: %s (%d ok, %d pruned, %d failed)%s",
            sweep_dir / "summary.md",
            len(ok),
            pruned,
            len(rows) - len(ok) - pruned,
            best,
        )
        failed = sorted(
            (r for r in rows if r["status"] not in DONE), key=lambda r: r["job"] if r["job"] is not None else math.inf
        )
        if failed and self.fail_on_failed_jobs:  # every job has run (Hydra's way); the sweep then fails, in one line
            first = failed[0]
            message = (
                f"{len(failed)} of {len(rows)} jobs failed; the first, job {first['job']} ({first['overrides']}): "
                f"{first['error']}; summary: {sweep_dir / 'summary.md'}"
            )
            end(config.hydra.help.app_name, "error", message, 1)  # a callback: Hydra would take an error for a warning
