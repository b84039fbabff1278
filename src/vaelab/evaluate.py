"""`vaelab-eval`: how good is a trained VAE on the test set, in nats per image.

- the negative ELBO, -E_q[log p(x|z)] + KL(q(z|x) || p(z)), and its two parts (beta = 1, whatever the training beta);
- the importance-weighted estimate of -log p(x) (Burda et al., the IWAE bound):
      -log p(x) ~ -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x),
  computed with logsumexp; it is never above the negative ELBO in expectation and tightens as K grows;
- active units: latent dimensions u with Var_x(E_q[z_u|x]) > threshold (Burda et al.);
- the reconstruction error of noisy inputs against the clean images, for each noise level.

q(z|x) is N(mu, exp(logvar)) from the encoder. A checkpoint trained with the notebook's objective samples
z = mu + exp(logvar) * eps * 0.1 instead; its likelihood is evaluated for the proper posterior N(mu, exp(logvar)),
and eval.json says so.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from vaelab import rundir, schema
from vaelab.checkpoints import load_vae
from vaelab.errors import UserError, build, recorded, stopped_by_signals
from vaelab.files import atomic_write
from vaelab.hardware import resolve_device
from vaelab.likelihoods import describe
from vaelab.module import VAE, add_noise, bounds
from vaelab.sweep import job_reporting

log = logging.getLogger(__name__)


@torch.no_grad()
def likelihood(
    vae: VAE, images: torch.Tensor, num_samples: int, pairs_per_pass: int = 20000, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Per-image negative ELBO parts, IWAE estimate of -log p(x) (nats) and posterior means, for every image.

    The reconstruction term averages the same K samples the IWAE estimate uses (less noise than one sample);
    the KL term is exact. Images go through in chunks so that at most `pairs_per_pass` (image, sample)
    pairs are decoded at once; with K above that, the samples of one image are split too. A density
    likelihood sees the images dequantised with `generator`'s noise (vaelab.module.VAE.target).
    """
    # The results are written into tensors allocated once: small tensors kept from every chunk would pin the freed
    # decoder outputs in glibc's heap (measured: 7.5 MB more resident memory per image at K = 5000, killed by the
    # OOM killer at 15.8 GB on the 10,000 test images; flat with this).
    n, latent_dim = images.shape[0], int(vae.hparams.latent_dim)
    result = {key: torch.empty(n, dtype=torch.float64, device=images.device) for key in ("recon", "kl", "nll_iwae")}
    result["mu"] = torch.empty(n, latent_dim, device=images.device)
    start = 0
    for x in images.split(max(1, pairs_per_pass // num_samples)):
        target = vae.target(x, generator)
        mu, logvar = vae.encode(target)
        stop = start + x.shape[0]
        for key, value in bounds(vae, target, mu, logvar, num_samples, pairs_per_pass, generator).items():
            result[key][start:stop] = value
        result["mu"][start:stop] = mu
        start = stop
    result["neg_elbo"] = result["recon"] + result["kl"]
    return result


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent units whose posterior mean varies across images: Var_x(E_q[z_u|x]) > threshold."""
    return int((mu.double().var(dim=0, unbiased=False) > threshold).sum())


@torch.no_grad()
def noisy_input_errors(
    vae: VAE, images: torch.Tensor, noise_levels, batch_size: int = 1000, generator: torch.Generator | None = None
) -> list[dict[str, float]]:
    """For each noise std: decode the posterior mean of the noisy input, compare with the clean image.

    recon_nats: the model's negative log-likelihood of the clean image, nats/image; mse: per pixel, of the
    decoded means. Every level sees the same images; the noise comes from `generator`.
    """
    rows = []
    for level in noise_levels:
        nats, squared, count = 0.0, 0.0, 0
        for x in images.split(batch_size):
            target = vae.target(x, generator)
            noisy = add_noise(target, float(level), generator)
            out = vae.decode(vae.encode(noisy)[0])
            nats += vae.likelihood.nll(out, target).double().sum().item()
            squared += (vae.likelihood.mean(out) - x).double().pow(2).sum().item()
            count += x.shape[0]
        rows.append({"noise_level": float(level), "recon_nats": nats / count, "mse": squared / (count * x[0].numel())})
    return rows


def plot_noise_errors(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """Error against noise level, nats/image and MSE/pixel side by side, as a PNG of 1000 x 400 pixels."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    levels = [r["noise_level"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, label in [
        (axes[0], "recon_nats", "-log p(clean | decode(mu(noisy))), nats/image"),
        (axes[1], "mse", "MSE per pixel, decoded mean vs clean"),
    ]:
        ax.plot(levels, [r[key] for r in rows], marker="o")
        ax.set_xlabel("input noise std")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)  # no bbox_inches="tight": the size stays figsize * dpi
    plt.close(fig)


def evaluate(vae: VAE, images: torch.Tensor, cfg: DictConfig, device: torch.device) -> dict:
    """Every figure of eval.json for these test images (already on `device`)."""
    num_samples = cfg.num_importance_samples or (1000 if device.type == "cuda" else 100)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    started = time.perf_counter()
    per_image = likelihood(vae, images, int(num_samples), int(cfg.pairs_per_pass), generator)
    noisy = noisy_input_errors(vae, images, list(cfg.noise_levels), int(cfg.batch_size), generator)
    hp = vae.hparams
    binarize = str(cfg.data.get("binarize") or "none")
    notes = [
        describe(hp.likelihood, binarize),
        "beta = 1 here (the true ELBO), whatever beta the model was trained with",
        "noisy_inputs: the posterior mean of each noisy input (Gaussian noise, clipped to [0, 1]) is decoded and "
        "compared with the clean image",
    ]
    trained_on = str(hp.get("binarize", "none"))
    if binarize != trained_on:
        notes.append(f"evaluated on data.binarize={binarize} as asked, although the model was trained on {trained_on}")
    if hp.objective == "notebook":
        notes.append(
            "objective=notebook: the model samples z = mu + exp(logvar) * eps * epsilon_std in training; "
            "this evaluates the proper posterior N(mu, exp(logvar)) instead (logvar as the log-variance)"
        )
    return {
        "ckpt_path": str(cfg.ckpt_path),
        "dataset": str(cfg.data.dataset),
        "split": "test",
        "num_images": int(images.shape[0]),
        "model": {
            "name": hp.name,
            "latent_dim": int(hp.latent_dim),
            "objective": hp.objective,
            "denoise": bool(hp.denoise),
            "noise_factor": float(hp.noise_factor),
            "beta": float(hp.beta),
        },
        "likelihood": str(hp.likelihood),
        "binarize": binarize,
        "posterior": "N(mu, exp(logvar))",
        "num_importance_samples": int(num_samples),
        "neg_elbo": per_image["neg_elbo"].mean().item(),
        "recon": per_image["recon"].mean().item(),
        "kl": per_image["kl"].mean().item(),
        "nll_iwae": per_image["nll_iwae"].mean().item(),
        "neg_elbo_bpd": vae.bits_per_dim(per_image["neg_elbo"].mean().item()),
        "nll_iwae_bpd": vae.bits_per_dim(per_image["nll_iwae"].mean().item()),
        "active_units": active_units(per_image["mu"], float(cfg.active_unit_threshold)),
        "active_unit_threshold": float(cfg.active_unit_threshold),
        "noisy_inputs": noisy,
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 2),
        "notes": notes,
    }


def summary(result: dict) -> str:
    m = result["model"]
    lines = [
        f"{result['ckpt_path']}: {m['name']} VAE, latent {m['latent_dim']}, objective {m['objective']}, denoise {m['denoise']}",
        f"{result['dataset']} test set, {result['num_images']} images, nats/image:",
        f"  negative ELBO  {result['neg_elbo']:9.2f}  (recon {result['recon']:.2f} + KL {result['kl']:.2f})",
        f"  -log p(x) IWAE {result['nll_iwae']:9.2f}  (K = {result['num_importance_samples']})",
        f"  bits/dim       {result['neg_elbo_bpd']:9.4f}  (-ELBO), {result['nll_iwae_bpd']:.4f} (IWAE)",
        f"  {result['notes'][0]}",
        f"  active units   {result['active_units']:6d} of {m['latent_dim']}  (Var_x E[z|x] > {result['active_unit_threshold']})",
        "  noise std   recon nats   MSE/pixel",
    ]
    lines += [f"  {r['noise_level']:9.2f}   {r['recon_nats']:10.2f}   {r['mse']:9.5f}" for r in result["noisy_inputs"]]
    if m["objective"] == "notebook":
        lines.append("  note: " + result["notes"][-1])
    return "\n".join(lines)


def test_images(cfg: DictConfig, vae: VAE) -> torch.Tensor:
    """The test images of cfg.data, prepared as the checkpoint's model was trained (data.binarize=null, the
    default) unless asked otherwise; refused in one line when the model takes another shape."""
    if cfg.data.get("binarize", "none") is None:
        with open_dict(cfg):
            cfg.data.binarize = str(vae.hparams.get("binarize", "none"))
        log.info("data.binarize=%s, as the checkpoint's model was trained", cfg.data.binarize)
    datamodule = build(cfg.data, "data")
    datamodule.setup("test")
    images = datamodule.test_set[0]
    model_shape = tuple(vae.hparams.encoder.get("image_shape") or images.shape[1:])
    if model_shape != tuple(images.shape[1:]):
        c, h, w = model_shape
        size = f"data.image_size={h}" if h == w else f"data.image_size=null data.image_shape=[{c},{h},{w}]"
        raise UserError(
            f"the checkpoint's model takes {model_shape} images but data={cfg.data.dataset} has "
            f"{tuple(images.shape[1:])}; pass the data it was trained on, e.g. "
            + ("data=mnist" if model_shape == (1, 28, 28) else f"data=image_folder data.path=<dir> data.channels={c} {size}")
        )
    return images


def run(cfg: DictConfig) -> dict:
    """Load, evaluate, write eval.json and noise_error.png into the run directory; returns eval.json's content."""
    schema.check(cfg, "eval")
    output_dir = Path(cfg.paths.output_dir)
    rundir.lock(output_dir)
    device = resolve_device(cfg.device)
    vae = load_vae(cfg.ckpt_path, device, tuple(cfg.allow_networks))
    images = test_images(cfg, vae)
    if cfg.num_images is not None:
        images = images[: int(cfg.num_images)]
    result = evaluate(vae, images.to(device), cfg, device)
    title = (
        f"{cfg.ckpt_path}: latent {result['model']['latent_dim']}, "
        f"denoise={result['model']['denoise']} (noise_factor {result['model']['noise_factor']})"
    )
    plot_noise_errors(result["noisy_inputs"], output_dir / "noise_error.png", title)
    atomic_write(output_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    log.info("\n%s", summary(result))
    log.info("wrote %s and %s", output_dir / "eval.json", output_dir / "noise_error.png")
    return result


def hydra_task(cfg: DictConfig) -> float:
    """The Hydra task of `vaelab-eval`; returns the IWAE estimate of -log p(x) (for sweeps over checkpoints)."""
    unfinished = "eval.json is written only at the end: run it again for the results"
    with job_reporting("vaelab-eval"), recorded(), stopped_by_signals(unfinished):
        return run(cfg)["nll_iwae"]


if __name__ == "__main__":
    from vaelab.cli import evaluate as _main

    _main()
