"""`vaelab-eval`: how good is a trained VAE on the test set, in nats per image.

- the negative ELBO, -E_q[log p(x|z)] + KL(q(z|x) || p(z)), and its two parts (beta = 1, whatever the training beta);
- the importance-weighted estimate of -log p(x) (Burda et al., the IWAE bound):
      -log p(x) ~ -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x),
  computed with logsumexp; it is never above the negative ELBO in expectation and tightens as K grows;
- active units: latent dimensions u with Var_x(E_q[z_u|x]) > threshold (Burda et al.);
- the reconstruction error of noisy inputs against the clean images, for each noise level;
- a linear probe of the posterior means and Fréchet distances of samples and reconstructions (vaelab.evaluation.measures), in
  the feature space of a small classifier trained once per dataset and cached (vaelab.evaluation.classifier).

q(z|x) is N(mu, exp(logvar)) from the encoder. A checkpoint trained with the notebook's objective samples
z = mu + exp(logvar) * eps * 0.1 instead; its likelihood is evaluated for the proper posterior N(mu, exp(logvar)),
and eval.json says so.

A conditional VAE (trained with model.conditional=true) is evaluated conditioned on the true test labels: every
figure is then of p(x|y), q(z|x, y) (the IWAE estimate is of -log p(x|y)), and eval.json (`conditioned_on`) and the
printed summary say so.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from vaelab import progress
from vaelab.errors import build, when_stopped
from vaelab.evaluation import measures
from vaelab.evaluation.bounds import active_units, likelihood, noisy_input_errors, plot_noise_errors
from vaelab.evaluation.classifier import load_or_train_classifier, training_data
from vaelab.evaluation.test_data import test_set
from vaelab.files import atomic_write
from vaelab.model.likelihoods import describe
from vaelab.model.vae import VAE
from vaelab.runs.checkpoints import load_vae
from vaelab.runs.hardware import resolve_device, use_threads

log = logging.getLogger(__name__)
CONDITIONED = (
    "conditional VAE: every figure is conditioned on the true test labels (-log p(x|y), the encoder and decoder given y)"
)


def notes_on(vae: VAE, cfg: DictConfig) -> tuple[list[str], str]:
    """How eval.json's figures are to be read, and how the test data was prepared against how the model was trained."""
    hp, binarize = vae.settings, str(cfg.data.get("binarize") or "none")
    notes = [
        describe(hp["likelihood"], binarize, vae.image_shape[0]),
        "beta = 1 here (the true ELBO), whatever beta the model was trained with",
        "noisy_inputs: the posterior mean of each noisy input (Gaussian noise, clipped to [0, 1]) is decoded and "
        "compared with the clean image",
    ]
    trained_on = str(hp.get("binarize", "none"))
    if binarize == trained_on:
        preparation = f"binarize={binarize}, as the model was trained (the checkpoint records it)"
    else:
        preparation = f"binarize={binarize} as asked, although the model was trained on binarize={trained_on}"
        notes.append(f"evaluated on data.binarize={binarize} as asked, although the model was trained on {trained_on}")
    if getattr(vae, "conditional", False):
        notes.append(CONDITIONED)
    if hp["objective"] == "notebook":
        notes.append(
            "objective=notebook: the model samples z = mu + exp(logvar) * eps * epsilon_std in training; "
            "this evaluates the proper posterior N(mu, exp(logvar)) instead (logvar as the log-variance)"
        )
    return notes, preparation


def evaluate(vae: VAE, images: torch.Tensor, cfg: DictConfig, device: torch.device, labels: torch.Tensor | None = None) -> dict:
    """Every figure of eval.json for these test images (already on `device`); a conditional VAE's conditioned on
    `labels`, the images' true classes."""
    num_samples = cfg.num_importance_samples or (1000 if device.type == "cuda" else 100)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    conditioned = bool(getattr(vae, "conditional", False))
    if conditioned and labels is None:
        raise ValueError("a conditional VAE is evaluated conditioned on the images' labels: pass them")
    labels = labels if conditioned else None
    started, n, levels = time.perf_counter(), len(images), list(cfg.noise_levels)
    with progress.phase(f"IWAE bound (K = {num_samples})", n, "image") as done:
        per_image = likelihood(vae, images, int(num_samples), int(cfg.pairs_per_pass), generator, labels, done.advance)
    with progress.phase(f"noisy inputs ({len(levels)} noise levels)", n * len(levels), "image") as done:
        noisy = noisy_input_errors(vae, images, levels, int(cfg.batch_size), generator, labels, done.advance)
    hp, binarize = vae.settings, str(cfg.data.get("binarize") or "none")
    notes, preparation = notes_on(vae, cfg)
    mean = {key: per_image[key].mean().item() for key in ("neg_elbo", "recon", "kl", "nll_iwae")}
    return {
        "ckpt_path": str(cfg.ckpt_path),
        "dataset": str(cfg.data.dataset),
        "split": "test",
        "num_images": int(images.shape[0]),
        "model": {
            "name": hp["name"],
            "latent_dim": int(hp["latent_dim"]),
            "objective": hp["objective"],
            "denoise": bool(hp["denoise"]),
            "noise_factor": float(hp["noise_factor"]),
            "beta": float(hp["beta"]),
            "conditional": conditioned,
        },
        "conditioned_on": "the true test labels" if conditioned else None,
        "likelihood": str(hp["likelihood"]),
        "binarize": binarize,
        "trained_binarize": str(hp.get("binarize", "none")),
        "data_preparation": preparation,
        "figures": describe(hp["likelihood"], binarize, vae.image_shape[0]),
        "posterior": "N(mu, exp(logvar))",
        "num_importance_samples": int(num_samples),
        **mean,
        "neg_elbo_bpd": vae.bits_per_dim(mean["neg_elbo"]),
        "nll_iwae_bpd": vae.bits_per_dim(mean["nll_iwae"]),
        "active_units": active_units(per_image["mu"], float(cfg.active_unit_threshold)),
        "active_unit_threshold": float(cfg.active_unit_threshold),
        "noisy_inputs": noisy,
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 2),
        "notes": notes,
    }


def probe_and_frechet(vae: VAE, cfg: DictConfig, num_images: int, device: torch.device) -> dict:
    """linear_probe_accuracy and frechet_distance with what they need to be read (vaelab.evaluation.measures), on the first
    `num_images` test images; null, with a note saying why, where they are off or the data has no classes."""
    result: dict = {"linear_probe_accuracy": None, "frechet_distance": None, "notes": []}
    for key in ("linear_probe", "frechet"):
        if not cfg[key].enabled:
            result["notes"].append(f"{key}: off ({key}.enabled=false)")
    if not (cfg.linear_probe.enabled or cfg.frechet.enabled):
        return result
    datamodule = build(cfg.data, "data")  # data.binarize as the model was trained (test_images resolved it)
    train_x, train_y = training_data(datamodule)
    test_x, test_y = (t[:num_images] for t in datamodule.test_set)
    if int(torch.cat([train_y, test_y]).unique().numel()) < 2:
        result["notes"].append(
            f"no linear probe and no Fréchet distance: data={cfg.data.dataset} has fewer than two classes (they need "
            "labelled images: for a folder of images, one subfolder per class)"
        )
        return result
    if cfg.linear_probe.enabled:
        result["linear_probe_accuracy"], result["linear_probe"] = linear_probe(
            vae, cfg, (train_x, train_y, test_x, test_y), device
        )
    if cfg.frechet.enabled:
        if cfg.data.get("binarize", "none") != "none":  # the classifier and the real side: grey levels
            datamodule = build(cfg.data, "data", binarize="none")
            train_x, test_x = training_data(datamodule)[0], datamodule.test_set[0][:num_images]
        result["frechet_distance"], result["frechet"] = frechet(vae, cfg, datamodule, (train_x, test_x, test_y), device)
        result["notes"].append(
            "frechet_distance: prior samples (the decoder's mean images) against the first num_samples test images "
            "(grey levels); frechet.reconstructions: the mean images of their posterior means; frechet.train_vs_test: "
            "as many training images, the floor"
        )
    if vae.conditional:
        result["notes"].append(
            "conditional model: the probe's posterior means and the reconstructions are given each image's own label, "
            "prior sample i the label of test image i (the test set's class mix)"
        )
    return result


def seeded(cfg: DictConfig, device: torch.device) -> torch.Generator:
    """One of its own for each figure: each is the same whether the others run or not."""
    return torch.Generator(device=device).manual_seed(int(cfg.seed))


def linear_probe(vae: VAE, cfg: DictConfig, data: tuple, device: torch.device) -> tuple[float, dict]:
    """The probe's test accuracy on the posterior means, with the raw pixels' and chance's beside it."""
    (train_x, train_y, test_x, test_y), probe = data, cfg.linear_probe
    started, generator = time.perf_counter(), seeded(cfg, device)
    count = len(train_x) if probe.train_images is None else min(int(probe.train_images), len(train_x))
    x, y, tx, ty = train_x[:count].to(device), train_y[:count].to(device), test_x.to(device), test_y.to(device)
    if cfg.data.get("binarize", "none") == "dynamic":  # the training split's grey levels, drawn once as the model saw them
        x = torch.bernoulli(x, generator=generator)  # (its val part is binary already and stays as it is)
    settings = {"max_iter": int(probe.max_iter), "weight_decay": float(probe.weight_decay)}
    # three steps: the posterior means, the probe on them, the probe on the raw pixels
    with progress.phase(f"linear probe ({count:,} training images)", 3, "step") as done:
        codes = measures.posterior_means(vae, x, int(cfg.batch_size), generator, vae.labels_of(y))
        test_codes = measures.posterior_means(vae, tx, int(cfg.batch_size), generator, vae.labels_of(ty))
        done.advance()
        accuracy = measures.linear_probe(codes, y, test_codes, ty, **settings)
        done.advance()
        raw_pixels = measures.linear_probe(x, y, tx, ty, **settings)
        done.advance()
    return accuracy, {
        "chance": measures.chance_level(ty),
        "raw_pixels_accuracy": raw_pixels,
        "features": "posterior means E_q[z|x] (raw_pixels: the images themselves), standardised",
        "train_images": count,
        "test_images": len(ty),
        **settings,
        "seconds": round(time.perf_counter() - started, 2),
    }


def frechet(vae: VAE, cfg: DictConfig, datamodule, data: tuple, device: torch.device) -> tuple[float, dict]:
    """The Fréchet distance of prior samples to test images in the features of vaelab's classifier of this data, with
    the reconstructions' and the training images' beside it."""
    (train_x, test_x, test_y), spec = data, cfg.classifier
    started, generator = time.perf_counter(), seeded(cfg, device)
    model, accuracy = load_or_train_classifier(
        datamodule, int(spec.epochs), int(spec.seed), spec.train_images, spec.cache_dir, device
    )
    classifier_seconds, started = time.perf_counter() - started, time.perf_counter()
    n, batch = min(int(cfg.frechet.num_samples), len(test_x)), int(cfg.batch_size)
    real, labels = test_x[:n].to(device), vae.labels_of(test_y[:n].to(device))
    # six steps: the samples, the reconstructions, then the features of the test images and of each of the three sets
    with progress.phase(f"Fréchet distance ({n:,} images a side)", 6, "step") as done:
        fakes = {"samples": measures.prior_samples(vae, n, batch, generator, labels)}
        done.advance()
        fakes["reconstructions"] = measures.reconstructions(vae, real, batch, generator, labels)
        done.advance()
        fakes["train_vs_test"] = train_x[:n].to(device)
        distances = measures.frechet_distances(model, real, fakes, batch, done.advance)
    return distances.pop("samples"), {
        **distances,
        "num_samples": n,
        "features": f"the penultimate layer ({model.num_features} units) of vaelab's classifier of this data, not Inception v3",
        "classifier_test_accuracy": accuracy,
        "classifier_train_images": len(train_x) if spec.train_images is None else min(int(spec.train_images), len(train_x)),
        "classifier_seconds": round(classifier_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }


def summary(result: dict) -> str:
    m = result["model"]
    lines = [
        f"{result['ckpt_path']}: {m['name']} VAE, latent {m['latent_dim']}, objective {m['objective']}, denoise {m['denoise']}",
        f"{result['dataset']} test set, {result['num_images']} images, {result['data_preparation']}; nats/image:",
        f"  negative ELBO  {result['neg_elbo']:9.2f}  (recon {result['recon']:.2f} + KL {result['kl']:.2f})",
        f"  -log p(x) IWAE {result['nll_iwae']:9.2f}  (K = {result['num_importance_samples']})",
        f"  bits/dim       {result['neg_elbo_bpd']:9.4f}  (-ELBO), {result['nll_iwae_bpd']:.4f} (IWAE)",
        f"  {result['notes'][0]}",
        f"  active units   {result['active_units']:6d} of {m['latent_dim']}  (Var_x E[z|x] > {result['active_unit_threshold']})",
        "  noise std   recon nats   MSE/pixel",
    ]
    lines += [f"  {r['noise_level']:9.2f}   {r['recon_nats']:10.2f}   {r['mse']:9.5f}" for r in result["noisy_inputs"]]
    if result.get("linear_probe_accuracy") is not None:
        probe = result["linear_probe"]
        lines.append(
            f"  linear probe   {result['linear_probe_accuracy']:9.4f}  (raw pixels {probe['raw_pixels_accuracy']:.4f}, "
            f"chance {probe['chance']:.4f}; {probe['train_images']} training images)"
        )
    if result.get("frechet_distance") is not None:
        f = result["frechet"]
        lines.append(
            f"  Fréchet dist.  {result['frechet_distance']:9.2f}  (reconstructions {f['reconstructions']:.2f}, "
            f"training images {f['train_vs_test']:.2f}; {f['num_samples']} images, {f['seconds']:.1f} s; "
            f"classifier accuracy {f['classifier_test_accuracy']:.4f})"
        )
    if result.get("conditioned_on"):
        lines.insert(2, "  " + CONDITIONED)
    if m["objective"] == "notebook":
        lines.append("  note: " + next(n for n in result["notes"] if n.startswith("objective=notebook")))
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    """Load, evaluate, write eval.json and noise_error.png into the run directory; returns eval.json's content."""
    output_dir = Path(cfg.paths.output_dir)
    use_threads(cfg.threads)
    device = resolve_device(cfg.device)
    vae = load_vae(cfg.ckpt_path, device, tuple(cfg.allow_networks))
    images, labels = test_set(cfg, vae)
    if cfg.num_images is not None:
        images, labels = images[: int(cfg.num_images)], labels[: int(cfg.num_images)]
    result = evaluate(vae, images.to(device), cfg, device, labels.to(device))
    extra = probe_and_frechet(vae, cfg, len(images), device)
    result = {**result, **extra, "notes": result["notes"] + extra["notes"]}
    title = (
        f"{cfg.ckpt_path}: latent {result['model']['latent_dim']}, "
        f"denoise={result['model']['denoise']} (noise_factor {result['model']['noise_factor']})\n{result['figures']}"
    )
    plot_noise_errors(result["noisy_inputs"], output_dir / "noise_error.png", title)
    atomic_write(output_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    when_stopped(f" after {output_dir / 'eval.json'} was written: the results are complete")
    log.info("\n%s", summary(result))
    log.info("wrote %s and %s", output_dir / "eval.json", output_dir / "noise_error.png")
    return result


def hydra_task(cfg: DictConfig) -> float:
    """The Hydra task of `vaelab-eval`; returns the IWAE estimate of -log p(x) (for sweeps over checkpoints)."""
    when_stopped("; eval.json is written only at the end: run it again for the results")
    return run(cfg)["nll_iwae"]
