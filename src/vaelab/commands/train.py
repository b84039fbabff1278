"""`vaelab-train`: check everything, build every part with hydra.utils.instantiate, fit, test, report.

The console script (vaelab.commands.cli) has already claimed and locked the run directory (vaelab.runs.rundir.RunDirectory).
`resume_from=<run dir>` is one plain branch of `prepare`: that run's saved config, its own newest checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab.errors import DISK_ERRNOS, UserError, build, disk_message, raise_if_interrupted, recorded
from vaelab.files import atomic_write
from vaelab.model.likelihoods import describe
from vaelab.runs import rundir, settings
from vaelab.runs.rundir import ResumePoint
from vaelab.runs.sweep import job_reporting, objective, parallel_threads

log = logging.getLogger(__name__)
BPD_KEYS = ("val/nelbo", "test/nelbo", "val/nll_iwae", "test/nll_iwae")  # also reported in bits per dimension
TRAINING_STATE = {"state_dict", "optimizer_states", "loops", "epoch", "global_step"}


def hparams_of(cfg: DictConfig) -> dict[str, int | float | str | bool]:
    """The flat, always-identical key set shown in TensorBoard's HPARAMS tab (read from where each
    value finally lives, so nested overrides such as trainer.max_epochs=5 are reported truly)."""
    return {
        "latent_dim": int(cfg.model.latent_dim),
        "epochs": int(cfg.trainer.max_epochs),
        "noise_factor": float(cfg.model.noise_factor),
        "denoise": bool(cfg.model.denoise),
        "batch_size": int(cfg.data.batch_size),
        "lr": float(cfg.model.optimizer.lr),
        "model": str(cfg.model.name),
        "objective": str(cfg.model.objective),
        "beta": float(cfg.model.beta),
        "seed": int(cfg.seed),
        "data": str(cfg.data.dataset),
        "likelihood": str(cfg.model.get("likelihood", "bernoulli")),
        "binarize": str(cfg.data.get("binarize", "none")),
        # what the figures are (vaelab.model.likelihoods.describe): e.g. "Bernoulli on grey levels, not a density"
        "figures": describe(str(cfg.model.get("likelihood", "bernoulli")), str(cfg.data.get("binarize", "none"))),
        "kl_warmup_epochs": int(cfg.model.get("kl_warmup_epochs", 0)),
        "free_bits": float(cfg.model.get("free_bits", 0.0)),
        "num_samples": int(cfg.model.get("num_samples", 1)),
        "conditional": bool(cfg.model.get("conditional", False)),
        "prior": str(OmegaConf.select(cfg, "model.prior.name", default="standard")),
    }


# The HPARAMS tab ticks only 5 settings and the first 5 metrics when it opens: the settings whose `differs` flag is
# set come first (the others follow by name), the metrics in the order declared. These are the columns it opens with;
# the others are one tick away.
HPARAMS_SHOWN = ("epochs", "latent_dim", "lr", "model", "noise_factor")
# Every scalar a run may log that is worth a column, the same list in every run (a run without one shows it empty).
HPARAMS_METRICS = (
    "test/nelbo",
    "test/nll_iwae",
    "val/loss",
    "test/recon",
    "test/kl",
    "val/nelbo",
    "val/recon",
    "val/kl",
    "val/nll_iwae",
    "val/noisy_recon",
    "test/noisy_recon",
    "test/loss",
    "train/loss",
)


def hparams_experiment(params: dict[str, int | float | str | bool]):
    """The experiment-level summary of the hparams plugin: every setting of `params` and every metric of
    HPARAMS_METRICS, with HPARAMS_SHOWN marked so that the tab opens with them ticked.

    Without it the plugin reads the first run's own experiment (torch's hparams() writes one per run, listing that
    run's metrics and no order), and the tab opened with batch_size, beta, binarize, data and denoise: the first
    five by name. Types as torch's session summary stores the values: numbers (booleans too) and strings.
    """
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    infos = [
        api_pb2.HParamInfo(
            name=name,
            type=api_pb2.DATA_TYPE_STRING if isinstance(value, str) else api_pb2.DATA_TYPE_FLOAT64,
            differs=name in HPARAMS_SHOWN,
        )
        for name, value in params.items()
    ]
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in HPARAMS_METRICS]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=metadata.EXPERIMENT_TAG,
        metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        tensor=metadata.NULL_TENSOR,
    )
    return summary


def write_hparams(logger, params: dict, metrics: dict[str, float]) -> None:
    """Write the HPARAMS-tab entry into the run's own event file: the experiment (hparams_experiment), this run's
    settings and its end. The metric columns read the run's own scalar curves.

    Lightning's log_hyperparams(params, metrics) would also write each metric as a scalar at step 0,
    a false point on the val/loss curve; the hparams summary alone points the tab at the real curves. (A
    writer of its own: the logger's was closed when the test stage ended; TensorBoard reads every event file
    of the folder as one run.)
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    _, start, end = hparams(params, metrics)  # torch's own experiment summary is replaced by the declared one
    with SummaryWriter(log_dir=logger.log_dir) as writer:
        for summary in (hparams_experiment(params), start, end):
            writer.file_writer.add_summary(summary)


@dataclass
class Start:
    """What a run starts from, once every check has passed."""

    cfg: DictConfig
    run_dir: Path
    checkpoint: dict | None = None  # the training checkpoint it continues from
    point: ResumePoint | None = None  # None: a new run; ResumePoint(path=None): a resume from scratch
    overrides: tuple[str, ...] = ()  # a resume's extra settings
    resumed: bool = False  # resume_from: continuing this run directory


def read_training_checkpoint(path: Path, key: str, cfg: DictConfig) -> tuple[dict, ResumePoint]:
    from vaelab.runs.checkpoints import check_buildable, read_checkpoint

    checkpoint = read_checkpoint(path, key)
    if not TRAINING_STATE <= set(checkpoint):
        raise UserError(
            f"{key}: {path} holds no training state (optimizer and loop counters), so training cannot continue from it"
        )
    # The same rule as vaelab-eval's: only network classes, with plain data (the config's own are trusted).
    check_buildable({k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k != "optimizer"}, own_networks(cfg))
    fit_loop = checkpoint["loops"].get("fit_loop")  # the types of what is read here: vaelab.runs.checkpoints.check_contents
    epoch_loop = fit_loop.get("epoch_loop.state_dict") if isinstance(fit_loop, dict) else None
    step = epoch_loop.get("_batches_that_stepped") if isinstance(epoch_loop, dict) else None
    step = step if isinstance(step, int) else checkpoint["global_step"]
    return checkpoint, ResumePoint(
        path=path,
        epoch=int(checkpoint["epoch"]),
        step=int(step),
        saved_at=checkpoint.get("saved_at"),
        val_metrics=dict(checkpoint.get("val_metrics") or {}),
    )


def own_networks(cfg: DictConfig) -> tuple[str, ...]:
    """Every class the run's own config names under model.encoder and model.decoder (a user's own included): a
    checkpoint of this run may build them, since the config names them, not the checkpoint."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            found.extend([str(node["_target_"])] if "_target_" in node else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for key in ("model.encoder", "model.decoder"):
        node = OmegaConf.select(cfg, key)
        walk(OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else None)
    return tuple(found)


def check_networks(cfg: DictConfig) -> None:
    """The encoder and decoder the config names are importable network classes (a user's own config can name
    anything): one line for a missing module or class, or a class that is not a torch.nn.Module."""
    from vaelab.runs.checkpoints import network_class

    for key in ("model.encoder._target_", "model.decoder._target_"):
        target = OmegaConf.select(cfg, key)
        if target is not None:
            network_class(target, (str(target),), key=f"{key}={target}")


def fit_is_done(cfg: DictConfig, point: ResumePoint | None) -> bool:
    if point is None or point.path is None:
        return False
    max_steps = int(cfg.trainer.get("max_steps") or -1)
    return point.epoch + 1 >= int(cfg.trainer.max_epochs) or (max_steps > 0 and point.step >= max_steps)


def prepare(cfg: DictConfig) -> Start:
    """Every check before work starts: the settings and the checkpoint to start from. Nothing is written here."""
    settings.check(cfg, "train")
    check_networks(cfg)
    run_dir = Path(cfg.paths.output_dir)
    rundir.lock(run_dir)
    if cfg.get("ckpt_path") in (None, ""):
        return Start(cfg, run_dir)
    settings.check_checkpoint_file(str(cfg.ckpt_path))
    path = Path(str(cfg.ckpt_path))
    checkpoint, point = read_training_checkpoint(path, f"ckpt_path={cfg.ckpt_path}", cfg)
    return Start(cfg, run_dir, checkpoint, point)


def prepare_resume(value: str, overrides: list[str]) -> Start:
    """The checks of `resume_from=<run dir> [settings]`: the run, its saved config with the settings, its newest
    checkpoint. Nothing is written here, so a refusal leaves the run exactly as it was."""
    run_dir = rundir.resume_dir(value)
    rundir.lock(run_dir)
    rundir.open_session(run_dir)
    cfg = rundir.resumed(run_dir, overrides)
    settings.check(cfg, "train")
    check_networks(cfg)
    overrides = tuple(overrides)
    newest = rundir.newest_checkpoint(run_dir, cfg)
    if newest is None:  # killed before its first checkpoint: it starts again, in place
        return Start(cfg, run_dir, point=ResumePoint(path=None), overrides=overrides, resumed=True)
    checkpoint, point = read_training_checkpoint(newest, f"resume_from={run_dir}", cfg)
    extends = any(o.split("=", 1)[0].lstrip("+~") in ("epochs", "trainer.max_epochs", "trainer.max_steps") for o in overrides)
    if (run_dir / "metrics.json").exists() and (fit_is_done(cfg, point) or not extends):  # e.g. stopped early
        raise UserError(
            f"{run_dir} has nothing left to do: it trained {point.epoch + 1} epochs and has its "
            f"metrics.json; to train it further: vaelab-train resume_from={shlex.quote(str(run_dir))} epochs=<more>",
            exit_code=0,
        )
    return Start(cfg, run_dir, checkpoint, point, overrides, resumed=True)


def build_logger(name: str, node: DictConfig, point: ResumePoint | None):
    """One of the run's loggers. Resumed, TensorBoard purges what the interrupted run logged after its checkpoint,
    and CSV keeps the rows logged before it (Lightning's CSVLogger would start metrics.csv afresh); MLflow and W&B
    start a new run of their own. MLflow 3 asks to opt into a local file store (the default: <run dir>/mlruns)."""
    from urllib.parse import urlparse

    from hydra.utils import get_object
    from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger

    key = f"logger.{name}"
    try:
        target = get_object(str(node._target_))
    except Exception:  # build() below says what is wrong with it, in one line
        target = None
    is_a = lambda kind: isinstance(target, type) and issubclass(target, kind)  # noqa: E731
    if is_a(MLFlowLogger) and urlparse(str(node.get("tracking_uri") or "")).scheme in ("", "file"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if point is None:
        return build(node, key)
    if is_a(TensorBoardLogger):
        purge_step = rundir.first_step_logged_after(Path(instantiate(node).log_dir), point)  # building it writes nothing
        return build(node, key, **({} if purge_step is None else {"purge_step": purge_step}))
    if is_a(CSVLogger):
        rows = rundir.csv_rows_logged_before(Path(instantiate(node).log_dir) / "metrics.csv", point)
        logger = build(node, key)
        for step, metrics in rows:
            logger.experiment.log_metrics(metrics, step)
        logger.save()  # at once: the writer has just removed the old file
        return logger
    return build(node, key)


@contextlib.contextmanager
def named_disk_faults(run_dir: Path, cfg: DictConfig) -> Iterator[None]:
    """A full or unwritable disk during the run: the file (TensorBoard's event writer does not say which: its
    folder then), the setting that moves it (a logger's save_dir or a callback's dirpath when the file is theirs,
    else hydra.run.dir) and how to go on. A folder a setting names that cannot be created is a fault of that kind."""
    try:
        yield
    except OSError as err:
        setting = setting_for(cfg, run_dir, err.filename)
        if err.errno not in DISK_ERRNOS and not (setting and err.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST)):
            raise
        named = err if err.filename else OSError(err.errno, err.strerror, str(run_dir / "tensorboard"))
        then = (
            f"; then continue with: vaelab-train resume_from={shlex.quote(str(run_dir))}"
            if rundir.newest_checkpoint(run_dir, OmegaConf.create({}))
            else "; then start the run again"
        )
        raise UserError(disk_message(named, f"{setting or 'hydra.run.dir'}=<dir>") + then) from None


def setting_for(cfg: DictConfig, run_dir: Path, filename: str | None) -> str | None:
    """The logger or callback setting whose folder holds `filename` (or is made inside it), when that folder is not in
    the run directory."""
    if not filename or str(filename).startswith(str(run_dir)):
        return None
    found = []
    for group in ("logger", "callbacks"):
        for name, node in (cfg.get(group) or {}).items():
            for key in settings.PATH_KEYS if isinstance(node, DictConfig) else ():
                folder, failed = str(node.get(key) or "").rstrip("/") + "/", str(filename).rstrip("/") + "/"
                if folder != "/" and (failed.startswith(folder) or folder.startswith(failed)):  # in it, or a parent
                    found.append((len(folder), f"{group}.{name}.{key}"))
    return max(found)[1] if found else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and test one configuration; returns the final val/* and test/* metrics (also in metrics.json).
    With resume_from set, that run continues with its own saved config instead."""
    return run(prepare_resume(str(cfg.resume_from), []) if cfg.get("resume_from") else prepare(cfg))


def resume(value: str, overrides: list[str]) -> dict[str, float]:
    """`vaelab-train resume_from=<run dir> [settings]` (vaelab.commands.cli): continue that run in place."""
    return run(prepare_resume(value, overrides))


def run(start: Start) -> dict[str, float]:
    cfg, run_dir, point = start.cfg, start.run_dir, start.point
    import pytorch_lightning as pl
    import torch

    from vaelab.runs.checkpoints import check_fits, check_optimizer_state, vae_weights
    from vaelab.runs.guards import for_run, interruptions
    from vaelab.runs.hardware import check_accelerator
    from vaelab.training.data import LightningData

    check_accelerator(str(cfg.trainer.accelerator), "trainer.accelerator", "use trainer=cpu")
    threads = cfg.threads or parallel_threads()  # in a joblib sweep, null shares the cores out among the jobs
    if threads:
        torch.set_num_threads(int(threads))
    pl.seed_everything(cfg.seed, workers=True)

    data = build(cfg.data, "data")
    datamodule = LightningData(data)
    model: pl.LightningModule = build(cfg.model, "model", **conditioning(cfg, data))
    if start.checkpoint is not None:
        check_fits(model.vae, vae_weights(start.checkpoint["state_dict"]), f"the checkpoint {point.path}")
        check_optimizer_state(model, start.checkpoint, f"the checkpoint {point.path}")
    loggers = [build_logger(name, c, point) for name, c in (cfg.get("logger") or {}).items() if c is not None]
    callbacks = [build(c, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c is not None]
    trainer: pl.Trainer = build(cfg.trainer, "trainer", logger=loggers or False, callbacks=[*callbacks, *for_run(cfg.seed)])
    raise_if_interrupted()
    if start.resumed:  # recorded only now: a resume refused by any check above leaves the run as it was
        rundir.record_resume(run_dir, cfg, list(start.overrides))
        rundir.continue_log()

    with recorded(), named_disk_faults(run_dir, cfg):
        fit_done = fit_is_done(cfg, point)
        with interruptions(trainer, run_dir):
            trainer.fit(model, datamodule=datamodule, ckpt_path=point.path if point else None, weights_only=True)
        metrics = (
            point.val_metrics if fit_done else {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        )

        if cfg.test_after_fit and not trainer.interrupted:
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            with interruptions(trainer, run_dir):
                trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

        metrics.update({f"{key}_bpd": model.vae.bits_per_dim(metrics[key]) for key in BPD_KEYS if key in metrics})
        metrics = dict(sorted(metrics.items()))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, pl.loggers.TensorBoardLogger):
                    write_hparams(logger, hparams_of(cfg), metrics)
                else:  # MLflow's params and metrics, CSV's hparams.yaml and a last metrics.csv row, W&B's config and summary
                    logger.log_hyperparams(hparams_of(cfg))
                    logger.log_metrics(metrics, step=trainer.global_step)
                    logger.finalize("success")  # written out (Lightning finalized them after the test: once more)
            report = {key: hparams_of(cfg)[key] for key in ("likelihood", "binarize", "figures")} | metrics
            atomic_write(run_dir / "metrics.json", json.dumps(report, indent=2) + "\n")  # last: the run is complete
            log.info("metrics (%s): %s", report["figures"], json.dumps(metrics))
            log.info("run directory: %s", run_dir)
    return metrics


def conditioning(cfg: DictConfig, datamodule) -> dict:
    """For model.conditional=true, the data's class names (plain strings, saved in the checkpoint) the model is built
    with; one line when the data has none. Nothing for an unconditional model."""
    if not cfg.model.get("conditional", False):
        return {}
    names = datamodule.class_names() if hasattr(datamodule, "class_names") else None
    if not names:
        where = (
            f"data.path={cfg.data.path} has no class subfolders"
            if cfg.data.get("path")
            else f"data={cfg.data.dataset} has no class names"
        )
        raise UserError(
            f"model.conditional=true needs labelled images, but {where}: put the images in one subfolder per class, "
            "or train without model.conditional=true"
        )
    return {"class_names": list(names)}


def hydra_task(cfg: DictConfig) -> float | None:
    """The Hydra task; returns the final val/recon + val/kl (val/loss at beta 1) for sweepers to minimise."""
    with job_reporting("vaelab-train"):
        return objective(train(cfg))
