"""The HPARAMS tab of TensorBoard for a finished run: the same flat key set in every run, the columns it opens with, and
the metrics it lists, written into the run's own event file."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from vaelab.model.likelihoods import describe


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
        "figures": describe(
            str(cfg.model.get("likelihood", "bernoulli")),
            str(cfg.data.get("binarize", "none")),
            int((cfg.data.get("image_shape") or [1])[0]),
        ),
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
# The curves worth a metric column, the same list in every run (a run without one shows it empty). A metric column
# reads the last point of the run's scalar series of that tag: only curves are metrics here.
HPARAMS_METRICS = (
    "val/nelbo",
    "val/loss",
    "val/recon",
    "val/kl",
    "val/nelbo_bpd",
    "val/nll_iwae",  # only with model.val_iwae_every_n_epochs: not among the five the tab opens with
    "val/nll_iwae_bpd",
    "val/noisy_recon",
    "train/loss",
)
# The test stage's figures: one number each, so no scalar series (a one-dot chart each in SCALARS and TIME SERIES,
# vaelab.training.loggers); they are columns of the run's HPARAMS row instead, beside its settings, and the TEXT table.
TEST_FIGURES = (
    "test/nelbo",
    "test/nll_iwae",
    "test/loss",
    "test/recon",
    "test/kl",
    "test/noisy_recon",
    "test/nelbo_bpd",
    "test/nll_iwae_bpd",
)
TEXT_TAG = "final_figures"  # the TEXT tab's table of the final figures


def hparams_experiment(params: dict[str, int | float | str | bool]):
    """The experiment-level summary of the hparams plugin: every setting of `params`, the TEST_FIGURES and every
    metric of HPARAMS_METRICS, with HPARAMS_SHOWN marked so that the tab opens with them ticked.

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
    infos += [api_pb2.HParamInfo(name=name, type=api_pb2.DATA_TYPE_FLOAT64) for name in TEST_FIGURES]
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in HPARAMS_METRICS]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=metadata.EXPERIMENT_TAG,
        metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        tensor=metadata.NULL_TENSOR,
    )
    return summary


def figures_table(params: dict, metrics: dict[str, float]) -> str:
    """The final figures as a markdown table with their units: the console's rows (vaelab.training.console)."""
    from vaelab.training.console import figure_rows

    rows = [
        f"| {label} | {val} | {test} | {unit} |" for label, val, test, unit in figure_rows(metrics, str(params.get("objective")))
    ]
    header = ["| figure | val: the last epoch | test: the best checkpoint | unit |", "|---|---:|---:|---|"]
    return "\n".join([f"Final figures: {params.get('figures', '')}", "", *header, *rows])


def write_hparams(logger, params: dict, metrics: dict[str, float]) -> None:
    """Write the HPARAMS-tab entry into the run's own event file: the experiment (hparams_experiment), this run's
    settings and test figures, and its end; and the final figures' table (TEXT_TAG). The metric columns read the run's
    own scalar curves.

    Lightning's log_hyperparams(params, metrics) would also write each metric as a scalar at step 0,
    a false point on the val/loss curve; the hparams summary alone points the tab at the real curves. (A
    writer of its own: the logger's was closed when the test stage ended; TensorBoard reads every event file
    of the folder as one run.)
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    row = params | {key: float(metrics[key]) for key in TEST_FIGURES if key in metrics}
    _, start, end = hparams(row, {})  # torch's own experiment is replaced by the declared one
    with SummaryWriter(log_dir=logger.log_dir) as writer:
        for summary in (hparams_experiment(params), start, end):
            writer.file_writer.add_summary(summary)
        writer.add_text(TEXT_TAG, figures_table(params, metrics))
