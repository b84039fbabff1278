"""Loggers (README, Loggers): TensorBoard opening on the curves, CSV, MLflow and W&B, alone or together; the settings and
the final figures reach each one's own view, read back with its own reader; every run and sweep job of one outputs root
in one MLflow store."""

from __future__ import annotations

import csv
import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import DATA_DIR, FAST, event_accumulator, one_line, read_metrics, run_cli, train_run

NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_MODE": "offline"}  # no test sends anything anywhere
MLFLOW_CREATING = "not found. Creating it"  # Lightning's MLFlowLogger's warning for a new experiment
SWEEP_JOBS = [*FAST, "epochs=1", "trainer.limit_train_batches=5", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]


def hparams_of_run(run_dir: Path) -> dict:
    """The values of TensorBoard's HPARAMS row for the run: its settings and test figures."""
    content = event_accumulator(run_dir).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def settings_of_run(run_dir: Path) -> dict:
    return {k: v for k, v in hparams_of_run(run_dir).items() if not k.startswith("test/")}


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


class Project(NamedTuple):
    root: Path  # the outputs root (paths.log_dir) both commands share
    run: Path  # the single run
    jobs: list[Path]  # the sweep's job directories, by job number
    printed: str  # everything both commands printed


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """One outputs root holding a 2-job sweep (TensorBoard and MLflow; latent_dim=2,4, the rest fixed), then one run
    logging to TensorBoard, MLflow and W&B (offline) at once: what each logger must hold is read back by its own test
    (one run and one sweep, not one per logger: each run costs 10-15 s of the suite). The sweep comes first: its two
    jobs find the MLflow store empty."""
    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store, whatever the caller's environment says
        sweep = run_cli(
            "-m", *SWEEP_JOBS, f"paths.log_dir={root}", f"hydra.sweep.dir={root}/sweep", "logger=[tensorboard,mlflow]",
            "latent_dim=2,4", env=NO_TELEMETRY,
        )  # fmt: skip
        # W&B's own folders (its service's logs, its cache and settings) in the test's, not in the home directory
        wandb_dirs = {f"WANDB_{name}_DIR": str(root / f"wandb-{name.lower()}") for name in ("CACHE", "DATA", "CONFIG")}
        run = run_cli(
            *FAST, f"paths.log_dir={root}", f"hydra.run.dir={root}/run", "logger=[tensorboard,mlflow,wandb]", "epochs=2",
            "latent_dim=4", env={**NO_TELEMETRY, **wandb_dirs},
        )  # fmt: skip
    jobs = sorted((p for p in (root / "sweep").iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))
    return Project(root, root / "run", jobs, sweep.stdout + sweep.stderr + run.stdout + run.stderr)


def test_tensorboard_opens_on_the_loss_curves(project):
    """No `epoch` staircase and no one-dot test/* charts among the scalars; the loss curves in CUSTOM SCALARS; the test
    figures in the run's HPARAMS row and in a TEXT table, with their units."""
    metrics = read_metrics(project.run)
    for run_dir in (project.run, *project.jobs):
        acc = event_accumulator(run_dir)
        scalars = acc.Tags()["scalars"]
        assert "epoch" not in scalars and not [t for t in scalars if t.startswith("test/")], scalars
        assert {"train/loss", "val/loss", "val/recon", "val/kl", "val/nelbo_bpd"} <= set(scalars)
        [config] = acc.Tensors("custom_scalars__config__")
        layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
        first = layout.category[0].chart[0]
        assert layout.category[0].title == "loss curves" and list(first.multiline.tag) == ["train/loss$", "val/loss$"]
        regexes = {regex for chart in layout.category[0].chart for regex in chart.multiline.tag}
        assert {"val/recon$", "val/kl$", "val/nelbo$", "val/nll_iwae$", "val/nelbo_bpd$"} <= regexes
    row = hparams_of_run(project.run)
    tests = {k: v for k, v in metrics.items() if k.startswith("test/")}
    assert len(tests) == 8 and {k: row[k] for k in tests} == pytest.approx(tests)
    [text] = event_accumulator(project.run).Tensors("final_figures/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert f"| -ELBO (recon + KL) | {metrics['val/nelbo']:.2f} | {metrics['test/nelbo']:.2f} | nats/image |" in table
    assert f"| {metrics['test/nll_iwae_bpd']:.4f} | bits/dim |" in table  # -log p(x), IWAE, in bits/dim


def test_sweep_jobs_are_named_by_the_setting_that_varies(project):
    """Named by latent_dim alone (not by epochs, logger, trainer.limit_*_batches, ...): the job directories, so the
    TensorBoard runs and HPARAMS trial ids, and the MLflow run names."""
    assert [job.name for job in project.jobs] == ["0_latent_dim=2", "1_latent_dim=4"]
    assert [settings_of_run(job)["latent_dim"] for job in project.jobs] == [2, 4]
    assert [(job / "tensorboard").is_dir() for job in project.jobs] == [True, True]


def test_every_run_and_sweep_job_of_an_outputs_root_is_in_one_mlflow_store(project, monkeypatch):
    """<outputs root>/mlruns: one experiment, made without Lightning's warning (two jobs found the store empty)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its local file store only when told so
    assert sorted(p.name for p in project.root.glob("**/mlruns")) == ["mlruns"] and (project.root / "mlruns").is_dir()
    client = MlflowClient(f"file:{project.root}/mlruns")
    [experiment] = [e for e in client.search_experiments() if e.name == "vaelab"]
    runs = {r.data.tags["run_dir"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(str(p) for p in (project.run, *project.jobs))
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert [runs[str(job)].info.run_name for job in project.jobs] == ["latent_dim=2", "latent_dim=4"]
    assert MLFLOW_CREATING not in project.printed
    assert not [job for job in project.jobs if MLFLOW_CREATING in (job / "train.log").read_text()]


def test_mlflow_beside_tensorboard_gets_the_settings_and_final_figures(project, monkeypatch):
    from mlflow.tracking import MlflowClient

    run_dir = project.run
    metrics = read_metrics(run_dir)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(f"file:{project.root}/mlruns")
    [run] = client.search_runs([client.get_experiment_by_name("vaelab").experiment_id], f"tags.run_dir = '{run_dir}'")
    assert run.info.status == "FINISHED"
    tensorboard = settings_of_run(run_dir)  # the same settings as TensorBoard's HPARAMS tab
    assert set(run.data.params) == set(tensorboard)
    assert {k: run.data.params[k] for k in ("latent_dim", "epochs", "model", "likelihood")} == {
        "latent_dim": "4",
        "epochs": "2",
        "model": "dense",
        "likelihood": "bernoulli",
    }
    assert {k: run.data.metrics[k] for k in metrics} == pytest.approx(metrics)  # every final figure, *_bpd too
    # the same val/loss curve as TensorBoard's, one point per validation (then the final figure, at the last step)
    curve = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)]
    assert curve[:-1] == pytest.approx([s.value for s in event_accumulator(run_dir).Scalars("val/loss")])
    assert curve[-1] == pytest.approx(metrics["val/loss"])


def test_csv_alone_then_resumed_keeps_its_rows(tmp_path):
    """No TensorBoard at all: the pictures still go to images/, and a resume keeps the rows logged before its
    checkpoint (Lightning's CSVLogger alone would start metrics.csv afresh)."""
    run_dir = tmp_path / "run"
    train_run(run_dir, "logger=csv", "epochs=1", "latent_dim=4")
    assert not (run_dir / "tensorboard").exists() and any((run_dir / "images").glob("samples_epoch000.png"))
    first = csv_rows(run_dir)
    final = {k: float(v) for k, v in first[-1].items() if v and k not in ("step", "epoch")}
    assert final == pytest.approx(read_metrics(run_dir))  # the last row: every final figure
    assert yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())["latent_dim"] == 4

    run_cli(str(run_dir), "epochs=2", tool="vaelab-resume")
    rows = csv_rows(run_dir)
    steps_per_epoch = 20  # trainer.limit_train_batches of FAST
    before = [r for r in first if int(r["step"]) < steps_per_epoch]
    assert [{k: v for k, v in r.items() if v} for r in rows[: len(before)]] == [
        {k: v for k, v in r.items() if v} for r in before
    ]  # kept as they were
    assert [r["epoch"] for r in rows if r["val/loss"] and r["epoch"]] == ["0", "1"]  # one validation row per epoch
    assert yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())["epochs"] == 2
    assert float(rows[-1]["test/loss"]) == pytest.approx(read_metrics(run_dir)["test/loss"])


@pytest.mark.parametrize(
    ("choice", "loggers"),
    [
        ("many", {"tensorboard": "TensorBoardLogger", "csv": "CSVLogger", "mlflow": "MLFlowLogger"}),
        ("[csv,wandb]", {"csv": "CSVLogger", "wandb": "WandbLogger"}),
    ],
)
def test_logger_choices_compose_under_the_run_directory_and_outputs_root(compose, tmp_path, monkeypatch, choice, loggers):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose([f"logger={choice}"])
    assert {name: node._target_.rpartition(".")[2] for name, node in cfg.logger.items()} == loggers
    run_dir = str(tmp_path / "run")
    for name, node in cfg.logger.items():
        where = node.tracking_uri if name == "mlflow" else node.save_dir
        assert where == (f"file:{tmp_path}/outputs/mlruns" if name == "mlflow" else run_dir)  # MLflow: the outputs root's
    if "wandb" in loggers:
        assert cfg.logger.wandb.offline is True


# vaelab-train's own entry point, run from the shell with one distribution hidden from importlib.metadata (what
# vaelab reads to know a logger's package is there): the test runs whether or not wandb is installed here.
HIDING_A_PACKAGE = """
import importlib.metadata as metadata, sys
real_version, hidden = metadata.version, sys.argv.pop(1).split(",")
def version(name):
    if name in hidden:
        raise metadata.PackageNotFoundError(name)
    return real_version(name)
metadata.version = version
sys.argv[0] = "vaelab-train"
from vaelab.commands.cli import train
train()
"""


@pytest.mark.parametrize("logger,hidden", [("wandb", "wandb"), ("mlflow", "mlflow,mlflow-skinny")])
def test_a_logger_whose_package_is_missing_is_one_line_naming_the_extra(tmp_path, logger, hidden):
    run_dir = tmp_path / "run"
    env = {**os.environ, "VAELAB_DATA_DIR": str(DATA_DIR)}
    args = [sys.executable, "-c", HIDING_A_PACKAGE, hidden, f"hydra.run.dir={run_dir}", f"logger=[tensorboard,{logger}]"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    target = "pytorch_lightning.loggers.WandbLogger" if logger == "wandb" else "vaelab.training.loggers.MLFlowLogger"
    line = one_line(proc, f"vaelab-train: error: logger.{logger} ({target}) needs ")
    assert f"pip install 'vaelab[{logger}]'" in line
    assert not run_dir.exists()  # refused before the run directory is made


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    [path] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, block, records, pending = Path(path).read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_gets_the_settings_and_final_figures(project):
    run_dir = project.run
    config, summary = {}, {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        for item in record.config.update if kind == "config" else record.summary.update if kind == "summary" else []:
            (config if kind == "config" else summary)[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    assert set(config) == set(settings_of_run(run_dir)) and config["latent_dim"] == 4
    metrics = read_metrics(run_dir)
    assert {k: summary[k] for k in metrics} == pytest.approx(metrics)
