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
import time
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"
METRIC_COLUMNS = ("val/loss", "val/recon", "val/kl", "test/loss")
COLUMNS = ("rank", "job", "status", "val/nelbo", *METRIC_COLUMNS, "epochs", "wall_time_s", "overrides", "error", "dir")
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
        raise NonFiniteObjective(f"the final val/recon + val/kl is {value} (val/recon {metrics['val/recon']}, "
                                 f"val/kl {metrics['val/kl']}); lower the learning rate (lr=...) or raise beta")
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


def _atomic_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")  # write then rename: readers never see half a file
    partial.write_text(text)
    partial.replace(path)


def _write_json(path: Path, data: dict) -> None:
    _atomic_text(path, json.dumps(data, indent=2) + "\n")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the sweep directory itself (no lock file left behind): parallel jobs that end at
    the same moment take turns, so the last summary written is the one that saw every job."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def collect(sweep_dir: Path, metrics_file: str = "metrics.json") -> list[dict[str, Any]]:
    """One row per job under sweep_dir (each job dir holds the job_status.json the callback wrote), best first:
    finished jobs by val/nelbo, then the rest by job number."""
    rows = []
    for status_path in sweep_dir.rglob(STATUS_FILE):
        job_dir = status_path.parent
        status = _read_json(status_path)
        metrics = _read_json(job_dir / metrics_file)
        nelbo = metrics["val/recon"] + metrics["val/kl"] if {"val/recon", "val/kl"} <= metrics.keys() else None
        rows.append({
            "job": status.get("job"),
            "status": status.get("status", "unknown"),
            "val/nelbo": nelbo,
            **{key: metrics.get(key) for key in METRIC_COLUMNS},
            "epochs": status.get("epochs") if status.get("status") == "ok" else None,
            "wall_time_s": status.get("wall_time_s"),
            "overrides": " ".join(status.get("overrides", [])),
            "error": status.get("error", ""),
            "dir": str(job_dir.relative_to(sweep_dir)),
        })

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


def write_summary(sweep_dir: Path, metrics_file: str = "metrics.json") -> list[dict[str, Any]]:
    """summary.csv (every figure in full) and summary.md (a table to read) in sweep_dir."""
    rows = collect(sweep_dir, metrics_file)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if row[k] is None else row[k]) for k in COLUMNS} for row in rows)
    _atomic_text(sweep_dir / "summary.csv", table.getvalue())

    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "running")}
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(rows)} jobs: {counts['ok']} ok, {counts['failed']} failed"
        + (f", {counts['running']} running" if counts["running"] else "")
        + ". Best first, by val/nelbo = val/recon + val/kl (the negative ELBO, nats per image; "
        "val/loss when beta = 1). Wall time in seconds.",
        "",
        "| " + " | ".join(MD_COLUMNS) + " |",
        "|" + "---|" * len(MD_COLUMNS),
    ]
    for row in rows:
        cells = [_cell(k, row[k]).replace("|", "\\|") for k in MD_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    _atomic_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    """Hydra callback: each multirun job records its status and wall time in <job dir>/job_status.json, and the
    sweep directory gets summary.csv and summary.md.

    The summary is rewritten as each job ends, in the job's own process (with the joblib launcher, a worker),
    because Hydra's basic sweeper raises after a batch with a failed job and never calls on_multirun_end;
    on_multirun_end writes it once more, and marks jobs that never reported as failed.
    """

    def __init__(self, metrics_file: str = "metrics.json"):
        self.metrics_file = metrics_file

    @staticmethod
    def _is_multirun(config: DictConfig) -> bool:
        return config.hydra.mode == RunMode.MULTIRUN

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self._is_multirun(config):
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        _write_json(job_dir / STATUS_FILE, {
            "job": int(config.hydra.job.num),
            "status": "running",
            "started": time.time(),
            "overrides": list(config.hydra.overrides.task),
        })

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not self._is_multirun(config):
            return
        from hydra.core.utils import JobStatus

        job_dir = Path(config.hydra.runtime.output_dir)
        status = _read_json(job_dir / STATUS_FILE)
        started = status.get("started")
        failed = job_return.status != JobStatus.COMPLETED
        status.update({
            "job": int(config.hydra.job.num),
            "status": "failed" if failed else "ok",
            "wall_time_s": round(time.time() - started, 2) if started else None,
            "epochs": OmegaConf.select(config, "trainer.max_epochs"),  # as set: only max_steps or early stopping end sooner
            "error": _one_line(job_return._return_value) if failed else "",  # .return_value would re-raise it
            "overrides": list(config.hydra.overrides.task),
        })
        _write_json(job_dir / STATUS_FILE, status)
        sweep_dir = Path(config.hydra.sweep.dir)
        with _locked(sweep_dir):
            write_summary(sweep_dir, self.metrics_file)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        with _locked(sweep_dir):
            for status_path in sweep_dir.rglob(STATUS_FILE):
                status = _read_json(status_path)
                if status.get("status") == "running":  # its process died before Hydra could report it
                    status.update(status="failed", error="the job's process ended without reporting a result")
                    _write_json(status_path, status)
            rows = write_summary(sweep_dir, self.metrics_file)
        ok = [r for r in rows if r["status"] == "ok"]
        best = f"; best: job {ok[0]['job']} ({ok[0]['overrides']}), val/nelbo {ok[0]['val/nelbo']:.4f}" \
            if ok and ok[0]["val/nelbo"] is not None else ""
        log.info("sweep summary: %s (%d ok, %d failed)%s", sweep_dir / "summary.md", len(ok), len(rows) - len(ok), best)
