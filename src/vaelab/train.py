"""`vaelab-train`: compose the config, build every part with hydra.utils.instantiate, fit, test, report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

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
    output_dir = Path(cfg.paths.output_dir)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    model: pl.LightningModule = instantiate(cfg.model)
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None] if cfg.get("logger") else []
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] if cfg.get("callbacks") else []
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    if cfg.test_after_fit and not trainer.interrupted:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
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
def main(cfg: DictConfig) -> float | None:
    """Entry point of `vaelab-train`; returns the final val/loss for sweepers to minimise."""
    return train(cfg).get("val/loss")


if __name__ == "__main__":
    main()
