"""Loggers beside TensorBoard (README, Loggers): CSV, MLflow and W&B, alone or together; the settings and the final
figures reach each one's own view, read back with its own reader."""

from __future__ import annotations

import csv
import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import DATA_DIR, FAST, event_accumulator, one_line, read_metrics, run_cli, train_run

NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_MODE": "offline"}  # no test sends anything anywhere


def hparams_of_run(run_dir: Path) -> dict:
    """The settings of TensorBoard's HPARAMS entry for the run."""
    content = event_accumulator(run_dir).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def three_logger_run(tmp_path_factory) -> Path:
    """One run logging to TensorBoard, MLflow and W&B (offline) at once: what each of them must hold is read back by
    its own test (one run, not one per logger: each run costs 10-15 s of the suite)."""
    run_dir = tmp_path_factory.mktemp("loggers") / "run"
    run_cli(*FAST, f"hydra.run.dir={run_dir}", "logger=[tensorboard,mlflow,wandb]", "epochs=2", "latent_dim=4", env=NO_TELEMETRY)
    return run_dir


def test_mlflow_beside_tensorboard_gets_the_settings_and_final_figures(three_logger_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    run_dir = three_logger_run
    metrics = read_metrics(run_dir)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its local file store only when told so
    client = MlflowClient(f"file:{run_dir}/mlruns")
    [run] = client.search_runs([client.get_experiment_by_name("vaelab").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == str(run_dir)
    tensorboard = hparams_of_run(run_dir)  # the same settings as TensorBoard's HPARAMS tab
    assert set(run.data.params) == set(tensorboard)
    assert {k: run.data.params[k] for k in ("latent_dim", "epochs", "model", "likelihood")} == {
        "latent_dim": "4",
        "epochs": "2",
        "model": "dense",
        "likelihood": "bernoulli",
    }
    assert {k: run.data.metrics[k] for k in metrics} == pytest.approx(metrics)  # every final figure, *_bpd too
    # the same val/loss curve as TensorBoard's, one point per epoch (then the final figure, at the last step)
    curve = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)]
    assert curve[:2] == pytest.approx([s.value for s in event_accumulator(run_dir).Scalars("val/loss")])
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
def test_logger_choices_compose_under_the_run_directory(compose, tmp_path, monkeypatch, choice, loggers):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose([f"logger={choice}"])
    assert {name: node._target_.rpartition(".")[2] for name, node in cfg.logger.items()} == loggers
    run_dir = str(tmp_path / "run")
    for name, node in cfg.logger.items():
        where = node.tracking_uri if name == "mlflow" else node.save_dir
        assert where == (f"file:{run_dir}/mlruns" if name == "mlflow" else run_dir)
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
    target = "WandbLogger" if logger == "wandb" else "MLFlowLogger"
    line = one_line(proc, f"vaelab-train: error: logger.{logger} (pytorch_lightning.loggers.{target}) needs ")
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


def test_wandb_offline_gets_the_settings_and_final_figures(three_logger_run):
    run_dir = three_logger_run
    config, summary = {}, {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        for item in record.config.update if kind == "config" else record.summary.update if kind == "summary" else []:
            (config if kind == "config" else summary)[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    assert set(config) == set(hparams_of_run(run_dir)) and config["latent_dim"] == 4
    metrics = read_metrics(run_dir)
    assert {k: summary[k] for k in metrics} == pytest.approx(metrics)
