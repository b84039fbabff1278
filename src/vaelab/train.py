"""`vaelab-train`: compose the config, build every part with hydra.utils.instantiate, fit, test, report."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from vaelab.resume import ResumeError, logger_kwargs, resume_argv, resume_point
from vaelab.sweep import objective, parallel_threads
from vaelab.validate import check_output_dir, exit_cleanly, validate

log = logging.getLogger(__name__)

# conf/ sits at the repository root (editable install). An absolute path, because Hydra resolves a relative
# one against the package when started through a console script.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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
    }


def write_hparams(logger, params: dict, metrics: dict[str, float]) -> None:
    """Write the HPARAMS-tab entry into the run's own event file, with the final metrics as its columns.

    Lightning's log_hyperparams(params, metrics) would also write each metric as a scalar at step 0,
    a false point on the val/loss curve; the hparams summary alone points the tab at the real curves.
    """
    from torch.utils.tensorboard.summary import hparams

    writer = logger.experiment._get_file_writer()
    for summary in hparams(params, metrics):
        writer.add_summary(summary)
    writer.flush()


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and test one configuration; returns the final val/* and test/* metrics (also in metrics.json)."""
    validate(cfg)  # first: a bad value costs a fraction of a second, before torch is imported or data read
    if cfg.get("resume_from"):
        raise ResumeError("resume_from is read by the vaelab-train command line; from Python, compose the run's "
                          ".hydra/config.yaml with hydra.run.dir=<run dir> and ckpt_path=last")
    output_dir = check_output_dir(cfg.paths.output_dir)
    resume = resume_point(cfg)  # ckpt_path checked whole, before any data is read
    import pytorch_lightning as pl
    import torch

    from vaelab.reliability import interruptions

    threads = cfg.threads or parallel_threads()  # in a joblib sweep, null shares the cores out among the jobs
    if threads:
        torch.set_num_threads(int(threads))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    model: pl.LightningModule = instantiate(cfg.model)
    loggers = [instantiate(c, **logger_kwargs(c, resume)) for c in cfg.logger.values() if c is not None] if cfg.get("logger") else []
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] if cfg.get("callbacks") else []
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)

    with interruptions(trainer, output_dir):
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume.path if resume else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    if cfg.test_after_fit and not trainer.interrupted:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        with interruptions(trainer, output_dir):
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    if trainer.is_global_zero:
        metrics = dict(sorted(metrics.items()))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.TensorBoardLogger):
                write_hparams(logger, hparams_of(cfg), metrics)
        log.info("metrics: %s", json.dumps(metrics))
        log.info("run directory: %s", output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """The Hydra task; returns the final val/recon + val/kl (val/loss at beta 1) for sweepers to minimise
    (vaelab.sweep.objective). Bad input ends in one line."""
    with exit_cleanly("vaelab-train"):
        return objective(train(cfg))


def main() -> None:
    """Entry point of `vaelab-train`: `resume_from=<run dir>` becomes that run's saved config (vaelab.resume)."""
    with exit_cleanly("vaelab-train"):
        sys.argv = resume_argv(sys.argv)
    hydra_main()


if __name__ == "__main__":
    main()
