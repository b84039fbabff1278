"""vaelab's TensorBoard and MLflow loggers (conf/logger/): Lightning's, with what a run should open on.

TensorBoard: the loss curves grouped in CUSTOM SCALARS (one layout per run, written with its event file), and no
one-dot charts in SCALARS and TIME SERIES: Lightning's `epoch` counter is not written (the step axis is the curves'),
nor the test stage's figures (each a single point): they reach TensorBoard at the end of the run, as HPARAMS columns
and a table in TEXT (vaelab.training.hparams.write_hparams).

MLflow: the experiment made before the run, so that every run of one outputs root goes into one store and one
experiment without Lightning's "not found. Creating it." warning (and without two parallel jobs making two
experiments of one name).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from urllib.parse import urlparse
from urllib.request import url2pathname

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning import loggers
from pytorch_lightning.utilities import rank_zero_only
from typing_extensions import override

from vaelab.errors import UserError

NOT_CURVES = ("epoch",)  # Lightning's epoch counter, added to every log_metrics call: a staircase, not a figure
FINAL_STAGE = "test/"  # figures logged once, at the end: a one-dot chart each

# TensorBoard's CUSTOM SCALARS tab: {category: {chart title: ["Multiline", [tag regexes, matched from the start]]}}.
# The same layout in every run (TensorBoard merges the layouts of all runs it reads into one), so a chart whose tags a
# run does not log (val/nll_iwae without model.val_iwae_every_n_epochs) shows the runs that do.
LAYOUT = {
    "loss curves": {
        "train/loss, val/loss": ["Multiline", ["train/loss$", "val/loss$"]],
        "val/nelbo, val/nll_iwae (the -ELBO and the IWAE bound)": ["Multiline", ["val/nelbo$", "val/nll_iwae$"]],
        "val/recon": ["Multiline", ["val/recon$"]],
        "val/kl": ["Multiline", ["val/kl$"]],
        "bits per dimension: val/nelbo_bpd, val/nll_iwae_bpd": ["Multiline", ["val/nelbo_bpd$", "val/nll_iwae_bpd$"]],
    }
}


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's TensorBoardLogger that writes LAYOUT once, when its event file is made, and leaves out the
    scalars that would be one-dot charts or a staircase (NOT_CURVES, FINAL_STAGE)."""

    @property
    @override
    @rank_zero_experiment
    def experiment(self):
        made = self._experiment is None
        writer = super().experiment
        if made:
            writer.add_custom_scalars(LAYOUT)
        return writer

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        curves = {k: v for k, v in metrics.items() if k not in NOT_CURVES and not k.startswith(FINAL_STAGE)}
        if curves:
            super().log_metrics(curves, step)


class MLFlowLogger(loggers.MLFlowLogger):
    """Lightning's MLFlowLogger that finds or makes its experiment itself, before the run is made in it. An empty
    run_name (a run without overrides) leaves the name to MLflow."""

    def __init__(self, experiment_name: str = "lightning_logs", run_name: str | None = None, **kwargs):
        super().__init__(experiment_name, run_name or None, **kwargs)

    @property
    @override
    @rank_zero_experiment
    def experiment(self):
        if not self._initialized and self._run_id is None and self._experiment_id is None:
            self._experiment_id = experiment_id(
                self._mlflow_client, self._experiment_name, self._artifact_location, self._tracking_uri
            )
        return super().experiment


def experiment_id(client, name: str, artifact_location: str | None, tracking_uri: str) -> str:
    """The id of the experiment `name` in the client's store, made when there is none (one process at a time in a
    local file store: it has no unique names, so two jobs starting together would each make one)."""
    from mlflow.exceptions import MlflowException

    with _store_locked(tracking_uri):
        found = client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            raise UserError(
                f"logger.mlflow.experiment_name={name} is a deleted experiment of the MLflow store {tracking_uri}: restore it "
                f"(mlflow experiments restore --experiment-id {found.experiment_id}) or choose another name"
            )
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name=name, artifact_location=artifact_location)
        except MlflowException:  # a database or server store: another process made it meanwhile
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id


@contextlib.contextmanager
def _store_locked(tracking_uri: str) -> Iterator[None]:
    """An exclusive lock on `<store>/.vaelab.lock` for a local file store (made if missing); nothing for others."""
    url = urlparse(tracking_uri)
    if url.scheme not in ("", "file"):
        yield
        return
    root = url2pathname(url.path) if url.scheme else tracking_uri
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, ".vaelab.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
