"""vaelab-train from the shell on the real Fashion-MNIST, read back through TensorBoard's reader."""

import json
import math
import re

import pytest
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import FAST, event_accumulator, read_metrics, run_cli, train_run


def test_run_directory_holds_everything(trained_run):
    assert (trained_run / ".hydra" / "config.yaml").exists()
    assert (trained_run / "checkpoints" / "last.ckpt").exists()
    assert len(list((trained_run / "checkpoints").glob("best-epoch*.ckpt"))) == 1
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = read_metrics(trained_run)
    for key in ["val/loss", "val/recon", "val/kl", "test/loss", "test/recon", "test/kl"]:
        assert key in metrics and metrics[key] > 0
    # the negative ELBO is its two parts (beta = 1)
    assert metrics["val/loss"] == pytest.approx(metrics["val/recon"] + metrics["val/kl"], rel=1e-5)


def test_scalars_are_logged_and_training_learns(trained_run):
    acc = event_accumulator(trained_run)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/recon", "val/kl", "val/noisy_recon"} <= tags
    # no Lightning `epoch` staircase and no one-dot test charts: the test figures are in HPARAMS and TEXT
    assert "epoch" not in tags and not [tag for tag in tags if tag.startswith("test/")]
    # validation every 5 epochs by default, and in the epoch a run ends in: once in 2 epochs, at the end
    assert [e.step for e in acc.Scalars("val/loss")] == [39]  # the last step (Lightning counts from 0 here)
    train = acc.Scalars("train/loss")
    assert [e.step for e in train] == [4, 9, 14, 19, 24, 29, 34, 39]  # every 5 steps, 2 epochs x 20 batches
    assert train[-1].value < train[0].value
    # noisy inputs reconstruct worse than clean ones (the notebook's noise weakness, measured)
    assert acc.Scalars("val/noisy_recon")[-1].value > acc.Scalars("val/recon")[-1].value
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(read_metrics(trained_run)["val/loss"], rel=1e-6)


def _bpd_pairs(acc, nats_tag: str) -> list[tuple[int, float, float]]:
    """(step, nats, bits/dim) for each point of a nats scalar and its _bpd twin, matched by step."""
    bpd = {e.step: e.value for e in acc.Scalars(f"{nats_tag}_bpd")}
    nats = {e.step: e.value for e in acc.Scalars(nats_tag)}
    assert bpd.keys() == nats.keys(), (nats_tag, nats.keys(), bpd.keys())
    return [(step, nats[step], bpd[step]) for step in sorted(nats)]


def test_bits_per_dim_are_tensorboard_scalars_too(trained_run):
    """Bernoulli on 784 pixels: bits/dim = nats / (784 ln 2), logged beside each nats figure at the same step."""
    acc = event_accumulator(trained_run)
    metrics = read_metrics(trained_run)
    pairs = _bpd_pairs(acc, "val/nelbo")
    assert len(pairs) == 1  # the one validation, in the last epoch
    for _, nats, bpd in pairs:
        assert bpd == pytest.approx(nats / (784 * math.log(2)), rel=1e-6)
    assert pairs[-1][2] == pytest.approx(metrics["val/nelbo_bpd"], rel=1e-6)  # metrics.json's final figure
    row = session_values(trained_run)  # the test figures: in the run's HPARAMS row, beside their nats
    for tag in ("test/nelbo", "test/nll_iwae"):
        assert row[f"{tag}_bpd"] == pytest.approx(row[tag] / (784 * math.log(2)), rel=1e-6)
        assert row[f"{tag}_bpd"] == pytest.approx(metrics[f"{tag}_bpd"], rel=1e-6)
    assert "val/nll_iwae_bpd" not in acc.Tags()["scalars"]  # no val/nll_iwae without val_iwae_every_n_epochs


def test_hparams_tab_has_the_settings_and_final_val_loss(trained_run):
    acc = event_accumulator(trained_run)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert values["latent_dim"] == 16 and values["epochs"] == 2 and values["noise_factor"] == pytest.approx(0.3)
    assert values["batch_size"] == 64 and values["model"] == "dense" and values["beta"] == 1 and values["seed"] == 42
    assert values["lr"] == pytest.approx(1e-3)
    experiment = experiment_of(trained_run)
    assert [m.name.tag for m in experiment.metric_infos][:5] == ["val/nelbo", "val/loss", "val/recon", "val/kl", "val/nelbo_bpd"]
    assert {"val/loss", "val/nll_iwae", "train/loss"} <= {m.name.tag for m in experiment.metric_infos}
    # every setting of the run is declared, and the tab opens with the headline ones ticked
    assert {h.name for h in experiment.hparam_infos} == set(values)
    assert opened_with(experiment) == ["epochs", "latent_dim", "lr", "model", "noise_factor"]


def session_values(run_dir) -> dict:
    """The run's HPARAMS row as TensorBoard reads it: its settings and its test figures."""
    content = event_accumulator(run_dir).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def experiment_of(run_dir):
    """The hparams plugin's experiment as TensorBoard reads it from the run's event files."""
    content = event_accumulator(run_dir).PluginTagToContent("hparams")
    return plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment


def opened_with(experiment) -> list[str]:
    """The settings the HPARAMS tab ticks when it opens: the plugin's backend orders them by (not differs, name)
    (tensorboard/plugins/hparams/backend_context.py, _sort_and_reduce_to_hparams_limit) and the page ticks the
    first five (tf-hparams-query-pane, _computeHParams)."""
    ordered = sorted(experiment.hparam_infos, key=lambda info: (not info.differs, info.name))
    return [info.name for info in ordered[:5]]


def test_checkpoint_rebuilds_the_model_weights_only(trained_run):
    from vaelab.training.module import VAEModule

    module = VAEModule.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert module.hparams.latent_dim == 16 and module.vae.latent_dim == 16
    assert module.vae.sample(3).shape == (3, 1, 28, 28)


# What Lightning prints that says nothing to a vaelab user (vaelab.training.console silences each at its source).
CLUTTER = ("litlogger", "FLOPs", "eval_means", "LeafSpec", "log_every_n_steps")


def messages(text: str) -> list[str]:
    """What a command said, each log line without Hydra's [time][module][level] prefix."""
    return [re.sub(r"^\[[^]]*\]\[[^]]*\]\[\w+\] - ", "", line) for line in text.splitlines()]


def clutter(proc) -> list[str]:
    """The lines (stdout and stderr) that say one of CLUTTER, except the settings given, which may name them."""
    said = messages(proc.stdout + "\n" + proc.stderr)
    return [line for line in said if any(w in line for w in CLUTTER) and not line.startswith("settings changed from")]


def test_same_seed_same_metrics_and_a_console_to_read(tmp_path, trained_run):
    run = tmp_path / "again"
    proc = train_run(run, "epochs=2", "latent_dim=16", "noise_factor=0.3")
    metrics = read_metrics(run)
    assert metrics == read_metrics(trained_run)
    said = messages(proc.stdout)
    # first, before training: where the run goes and what differs from the defaults
    assert said[:2] == [
        f"run directory: {run}",
        "settings changed from the defaults: " + " ".join(FAST) + " epochs=2 latent_dim=16 noise_factor=0.3 "
        "(`vaelab-train --cfg job` prints every setting)",
    ]
    # one line per epoch: the mean training loss, the validation -ELBO in nats and bits/dim where the epoch
    # validated (every 5 epochs and the last), the seconds
    epochs = [
        re.fullmatch(r"epoch (\d) \| train loss (\S+)( \| val -ELBO (\S+) nats/image, (\S+) bits/dim)? \| [\d.]+ s", m)
        for m in said
    ]
    epochs = [m.groups() for m in epochs if m]
    assert [e[0] for e in epochs] == ["0", "1"] and float(epochs[1][1]) < float(epochs[0][1])
    assert epochs[0][2] is None and epochs[1][2] is not None
    epochs[1] = (*epochs[1][:2], *epochs[1][3:])
    assert [float(v) for v in epochs[1][2:]] == pytest.approx([metrics["val/nelbo"], metrics["val/nelbo_bpd"]], abs=6e-3)
    # at the end, a table of the final figures with their units (metrics.json keeps every digit)
    start = said.index(
        "final figures (Bernoulli on grey levels, not a density (pixels in [0, 1], not binarized)); val: the last "
        "epoch, test: the best checkpoint"
    )
    assert said[start + 2] == f"  loss (recon + beta KL)    {metrics['val/loss']:.2f}    {metrics['test/loss']:.2f}  nats/image"
    assert f"  -ELBO                     {metrics['val/nelbo_bpd']:.4f}    {metrics['test/nelbo_bpd']:.4f}  bits/dim" in said
    assert not any(re.search(r"\d\.\d{6}", line) for line in said[start:])  # no 16-digit figures
    assert said[-1] == f"run directory: {run} (metrics.json: every figure in full)"
    assert not clutter(proc)


def test_nested_overrides_and_config_groups_train(tmp_path):
    run = tmp_path / "conv"
    proc = train_run(run, "model=conv", "model.latent_dim=8", "trainer.max_epochs=1", "trainer.limit_train_batches=3")
    # 3 batches an epoch, fewer than log_every_n_steps=5: Lightning's warning about it is not said (train/loss is
    # logged on the global step: small epochs log it too), nor any other clutter
    assert not clutter(proc)
    cfg = (run / ".hydra" / "config.yaml").read_text()
    assert "ConvEncoder" in cfg and "latent_dim: 8" in cfg
    assert read_metrics(run)["val/loss"] > 0


def test_notebook_preset_trains_with_its_loss(tmp_path):
    run = tmp_path / "nb"
    train_run(run, "experiment=notebook", "trainer.max_epochs=1", "trainer.limit_train_batches=5")
    metrics = read_metrics(run)
    # the notebook's loss is per pixel (BCE ~0.3-0.7 on these images), not nats per image (hundreds)
    assert 0 < metrics["val/recon"] < 1.0
    assert metrics["val/loss"] == pytest.approx(metrics["val/recon"] + metrics["val/kl"], rel=1e-5)


def test_cfg_job_prints_composed_config():
    out = run_cli("--cfg", "job", "latent_dim=16").stdout
    assert "latent_dim: 16" in out and "_target_: vaelab.training.module.VAEModule" in out and "max_epochs: ${epochs}" in out


def test_python_module_form_and_help_lists_groups():
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run(
        [sys.executable, "-m", "vaelab", "train", "--help"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    for group in ["data:", "model:", "trainer:", "logger:", "callbacks:", "experiment:"]:
        assert group in out
    assert "conv, dense, mlp" in out and "notebook" in out


def test_missing_data_fails_before_training_naming_three_ways(tmp_path):
    run = tmp_path / "run"
    proc = train_run(run, f"data.data_dir={tmp_path / 'empty'}", "data.system_dir=null", check=False)
    assert proc.returncode != 0
    assert "(1)" in proc.stderr and "data.download=true" in proc.stderr
    assert not (run / "checkpoints").exists()


def test_figures_name_their_likelihood_and_data_and_come_in_bits_per_dim_too(tmp_path, trained_run):
    """Dynamically binarized data, a KL warm-up: metrics.json and the HPARAMS tab say what the figures are."""
    run = tmp_path / "binary"
    train_run(
        run,
        "epochs=2",
        "latent_dim=8",
        "data.binarize=dynamic",
        "model.kl_warmup_epochs=2",
        "model.eval_iwae_samples=5",
        "model.val_iwae_every_n_epochs=2",
    )
    report = json.loads((run / "metrics.json").read_text())
    assert report["likelihood"] == "bernoulli" and report["binarize"] == "dynamic"
    assert report["figures"] == "nats per image; bernoulli likelihood of the binarized pixels (binarize=dynamic)"
    assert report["test/nll_iwae"] <= report["test/nelbo"] + 1.0  # K = 5: a tighter bound than the ELBO, up to noise
    assert report["test/nelbo_bpd"] == pytest.approx(report["test/nelbo"] / (784 * math.log(2)))
    acc = event_accumulator(run)
    betas = [e.value for e in acc.Scalars("train/beta")]  # logged with each train/loss window: 0 -> 1 over 2 epochs
    assert betas == sorted(betas) and 0 < betas[0] < 0.2 and betas[-1] > 0.9
    assert (
        "data.binarize=dynamic: each training image a fresh Bernoulli draw every epoch; validation and test images "
        "binarized once (seeded), and so are the pictures' images"
    ) in (run / "train.log").read_text()  # the run says how its data, the pictures' included, is prepared
    # val/nll_iwae in the second epoch only, and its bits/dim with it
    [(_, nats, bpd)] = _bpd_pairs(acc, "val/nll_iwae")
    assert bpd == pytest.approx(nats / (784 * math.log(2)), rel=1e-6) and nats == pytest.approx(report["val/nll_iwae"])
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert values["likelihood"] == "bernoulli" and values["binarize"] == "dynamic" and values["kl_warmup_epochs"] == 2
    # other settings, other metrics logged (train/beta, val/nll_iwae): the same columns as every other run
    assert experiment_of(run) == experiment_of(trained_run)


def test_the_default_figures_say_they_are_not_a_density(trained_run):
    """metrics.json, the HPARAMS tab and the log label the default figures (a Bernoulli on grey levels)."""
    says = "nats per image; Bernoulli on grey levels, not a density (pixels in [0, 1], not binarized)"
    report = json.loads((trained_run / "metrics.json").read_text())
    assert report["figures"] == says and report["likelihood"] == "bernoulli" and report["binarize"] == "none"
    content = event_accumulator(trained_run).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert values["figures"] == says and values["likelihood"] == "bernoulli" and values["binarize"] == "none"
    log = (trained_run / "train.log").read_text()  # the run's final table says it too
    assert f"final figures ({says.removeprefix('nats per image; ')}); val: the last epoch" in log
    assert "epoch 1 | train loss " in log  # and train.log keeps the line of each epoch


@pytest.mark.parametrize(
    "likelihood,says",
    [
        ("discretized_logistic", "discretized_logistic likelihood of the 8-bit grey levels"),
        ("gaussian", "gaussian density of the uniformly dequantised 8-bit grey levels"),
    ],
)
def test_other_likelihoods_train_from_the_shell(tmp_path, likelihood, says):
    run = tmp_path / likelihood
    train_run(run, "epochs=1", "latent_dim=8", f"model.likelihood={likelihood}", "model.eval_iwae_samples=3")
    report = json.loads((run / "metrics.json").read_text())
    assert says in report["figures"] and math.isfinite(report["test/nll_iwae_bpd"]) and report["test/nelbo_bpd"] > 0
    offset = 8 if likelihood == "gaussian" else 0  # a density of dequantised data: + log2(256) bits per dimension
    acc = event_accumulator(run)
    for _, nats, bpd in _bpd_pairs(acc, "val/nelbo"):
        assert bpd == pytest.approx(nats / (784 * math.log(2)) + offset, rel=1e-6)
    for tag in ("test/nelbo", "test/nll_iwae"):
        assert report[f"{tag}_bpd"] == pytest.approx(report[tag] / (784 * math.log(2)) + offset, rel=1e-6)
    assert list((run / "images").glob("samples_epoch000.png"))


# --- nothing that existed changes its figures -----------------------------------------------------------

# Measured with the code before the likelihoods and objectives existed (commit 6d5c816), fp32, 1 thread:
# `vaelab-train <FAST> epochs=2 latent_dim=16 noise_factor=0.3 trainer.precision=32-true threads=1` and the notebook
# preset for 1 epoch of 5 batches.
PINNED = {
    "default": (
        ["epochs=2", "latent_dim=16", "noise_factor=0.3"],
        {
            "test/kl": 17.095487594604492,
            "test/loss": 491.1874084472656,
            "test/noisy_recon": 476.346923828125,
            "test/recon": 474.0918884277344,
            "val/kl": 17.400341033935547,
            "val/loss": 490.2220764160156,
            "val/noisy_recon": 475.1839599609375,
            "val/recon": 472.82171630859375,
        },
    ),
    "notebook": (
        ["experiment=notebook", "trainer.max_epochs=1", "trainer.limit_train_batches=5"],
        {
            "test/kl": 0.029654329642653465,
            "test/loss": 0.690906822681427,
            "test/noisy_recon": 0.6615359783172607,
            "test/recon": 0.661252498626709,
            "val/kl": 0.029968351125717163,
            "val/loss": 0.6908062696456909,
            "val/noisy_recon": 0.6611286997795105,
            "val/recon": 0.6608378887176514,
        },
    ),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_the_default_run_and_the_notebook_give_the_figures_they_gave_before(tmp_path, name):
    overrides, before = PINNED[name]
    # the validation and test batches these figures were pinned with (FAST's are smaller)
    train_run(tmp_path / name, *overrides, "trainer.precision=32-true", "threads=1", "data.eval_batch_size=1000")
    now = read_metrics(tmp_path / name)
    assert {k: now[k] for k in before} == pytest.approx(before, rel=1e-4)  # new keys beside them are allowed
    if name == "default":
        assert now["test/nll_iwae"] < now["test/loss"] and now["val/nelbo_bpd"] == pytest.approx(
            now["val/nelbo"] / (784 * math.log(2))
        )
