"""vaelab's TensorBoard and MLflow loggers in-process (vaelab.training.loggers, vaelab.training.hparams): what a
logger writes, read back with TensorBoard's own reader and MLflow's client. The same, from the shell, in a real run and
sweep: tests/commands/test_loggers.py."""

from __future__ import annotations

import logging
import math

import pytest
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import event_accumulator

LAYOUT_TAG = "custom_scalars__config__"  # tensorboard.plugins.custom_scalar.metadata.CONFIG_SUMMARY_TAG


def layout_of(acc) -> layout_pb2.Layout:
    """The CUSTOM SCALARS layout of a run, as the plugin reads it: the first point of its config tag."""
    [event] = acc.Tensors(LAYOUT_TAG)
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def charts_of(layout: layout_pb2.Layout, tags: list[str]) -> dict[str, list[str]]:
    """Each chart of the layout (by title) with the tags of `tags` its regexes match, as the plugin matches them."""
    import re

    return {
        chart.title: [tag for tag in tags if any(re.match(regex, tag) for regex in chart.multiline.tag)]
        for category in layout.category
        for chart in category.chart
    }


def session_values(acc) -> dict:
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def text_of(acc, tag: str) -> str:
    [event] = acc.Tensors(f"{tag}/text_summary")
    return event.tensor_proto.string_val[0].decode()


def test_tensorboard_logger_writes_the_curves_and_the_loss_layout_only(tmp_path):
    """Lightning's logger connector adds `epoch` to every call, and the test stage logs each figure once: neither
    becomes a scalar. The layout is written once, when the event file is made, with the loss curves on top."""
    from vaelab.training.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tensorboard", version="")
    logger.log_metrics({"train/loss": 560.0, "epoch": 0.0}, step=4)
    logger.log_metrics({"val/loss": 554.7, "val/recon": 550.6, "val/kl": 4.1, "val/nelbo": 554.7, "epoch": 0.0}, step=19)
    logger.log_metrics({"val/nelbo_bpd": 1.021, "val/nll_iwae": 553.0, "epoch": 0.0}, step=19)
    logger.log_metrics({"test/loss": 547.9, "test/nelbo_bpd": 1.008, "epoch": 2.0}, step=40)
    logger.log_metrics({"epoch": 2.0}, step=40)
    logger.finalize("success")

    acc = event_accumulator(tmp_path)
    scalars = acc.Tags()["scalars"]
    assert sorted(scalars) == ["train/loss", "val/kl", "val/loss", "val/nelbo", "val/nelbo_bpd", "val/nll_iwae", "val/recon"]
    assert [e.step for e in acc.Scalars("train/loss")] == [4] and [e.step for e in acc.Scalars("val/loss")] == [19]
    layout = layout_of(acc)
    assert [c.title for c in layout.category] == ["loss curves"] and not layout.category[0].closed
    charts = charts_of(layout, scalars)
    assert list(charts.values())[0] == ["train/loss", "val/loss"]  # the first chart: both loss curves together
    assert sorted(t for tags in charts.values() for t in tags) == sorted(scalars)  # every curve has its chart
    assert charts_of(layout, ["val/nll_iwae_bpd", "val/loss_bpd"])["bits per dimension: val/nelbo_bpd, val/nll_iwae_bpd"] == [
        "val/nll_iwae_bpd"
    ]  # each regex matches its tag whole


FINAL = {
    "test/kl": 5.0628,
    "test/loss": 547.9032,
    "test/nelbo": 547.9032,
    "test/nelbo_bpd": 1.00824,
    "test/nll_iwae": 546.217,
    "test/nll_iwae_bpd": 1.00513,
    "test/recon": 542.8403,
    "val/loss": 547.7416,
    "val/nelbo": 547.7416,
    "val/nelbo_bpd": 1.00794,
}


def test_the_test_figures_are_hparams_columns_and_a_text_table_not_scalars(compose, tmp_path):
    from vaelab.training.hparams import HPARAMS_METRICS, TEST_FIGURES, TEXT_TAG, hparams_of, write_hparams
    from vaelab.training.loggers import TensorBoardLogger

    params = hparams_of(compose(["latent_dim=4"]))
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tensorboard", version="")
    write_hparams(logger, params, FINAL)

    acc = event_accumulator(tmp_path)
    assert acc.Tags()["scalars"] == []  # no one-dot chart for any of them
    values = session_values(acc)
    assert {k: values[k] for k in FINAL if k.startswith("test/")} == pytest.approx(
        {k: v for k, v in FINAL.items() if k[:5] == "test/"}
    )
    assert "test/noisy_recon" not in values and "val/loss" not in values  # not figured in this run; val/*: curves
    assert {k: values[k] for k in ("latent_dim", "model")} == {"latent_dim": 4, "model": "dense"}
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [h.name for h in experiment.hparam_infos] == [*params, *TEST_FIGURES]  # the same columns in every run
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAMS_METRICS)
    assert not any(m.startswith("test/") for m in HPARAMS_METRICS)  # a metric column would read a scalar series

    table = text_of(acc, TEXT_TAG).splitlines()
    assert table[0] == f"Final figures: {params['figures']}"
    assert table[2:4] == ["| figure | val: the last epoch | test: the best checkpoint | unit |", "|---|---:|---:|---|"]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table[4:]]
    cells = {label: (val, test, unit) for label, val, test, unit in rows}  # the console's rows (training.console)
    assert cells["-ELBO (recon + KL)"][1:] == ("547.90", "nats/image")
    assert cells["-ELBO"][1:] == ("1.0082", "bits/dim")
    assert cells["KL"][1:] == ("5.0628", "nats/image")
    assert math.isclose(float(cells["loss (recon + beta KL)"][0]), FINAL["val/loss"], abs_tol=0.005)


def test_the_notebook_figures_are_not_called_nats(compose, tmp_path):
    from vaelab.training.hparams import TEXT_TAG, hparams_of, write_hparams
    from vaelab.training.loggers import TensorBoardLogger

    params = hparams_of(compose(["experiment=notebook"]))
    write_hparams(TensorBoardLogger(save_dir=str(tmp_path), name="tensorboard", version=""), params, {"test/loss": 0.31})
    table = text_of(event_accumulator(tmp_path), TEXT_TAG)
    assert (
        "| loss (recon + beta KL) | - | 0.3100 | the notebook's per-pixel loss |" in table
        and "nats" not in table.split("\n", 1)[1]
    )


@pytest.fixture
def file_store(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as vaelab-train sets it for a file: URI
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return f"file:{tmp_path}/outputs/mlruns"


def test_mlflow_logger_makes_its_experiment_once_without_a_warning(file_store, caplog):
    from mlflow.tracking import MlflowClient

    from vaelab.training.loggers import MLFlowLogger

    runs = []
    for _ in range(2):
        logger = MLFlowLogger(experiment_name="vaelab", tracking_uri=file_store, run_name="")
        with caplog.at_level(logging.INFO):
            logger.log_metrics({"val/loss": 1.0}, step=0)
        logger.finalize("success")
        runs.append(logger.run_id)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text  # "... not found. Creating it."
    client = MlflowClient(file_store)
    [experiment] = [e for e in client.search_experiments() if e.name == "vaelab"]
    found = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in found) == sorted(runs)  # both runs in the one experiment of the one store
    assert all(r.info.run_name for r in found)  # an empty run_name: MLflow names the run


def test_a_deleted_experiment_of_that_name_is_one_line(file_store):
    from mlflow.tracking import MlflowClient

    from vaelab.errors import UserError
    from vaelab.training.loggers import MLFlowLogger

    client = MlflowClient(file_store)
    client.delete_experiment(client.create_experiment("vaelab"))
    with pytest.raises(UserError, match=r"^logger.mlflow.experiment_name=vaelab is a deleted experiment of the MLflow store"):
        MLFlowLogger(experiment_name="vaelab", tracking_uri=file_store).log_metrics({"val/loss": 1.0}, step=0)
