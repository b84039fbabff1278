"""What a trained VAE's latent code and samples are worth, for vaelab-eval: a linear probe and a Fréchet distance.

- Linear probe: a multinomial logistic regression (plain torch: full-batch L-BFGS from zero weights, so the same
  inputs give the same figure) trained on the posterior means E_q[z|x] of the training images and scored on the test
  images. Beside it the chance level (the largest class share of the test images) and the same probe on the raw
  pixels, so the figure can be read: a code that keeps the class information linearly is near or above the pixels.
- Fréchet distance (FID, Heusel et al. 2017) between two sets of images: each set's features as a Gaussian (mean,
  covariance), d^2 = |m1 - m2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). Computed by torchmetrics' FrechetInceptionDistance
  with the penultimate layer of vaelab.evaluation.classifier's small CNN in place of Inception v3 (which cannot be downloaded
  here and does not suit 28x28 grey images), between the test images and: prior samples (the decoder's mean images
  of z ~ N(0, I)), the model's reconstructions of the test images (the mean image of the posterior mean), and the
  training images (the floor: what two samples of the real distribution score). Figures in this feature space are
  comparable with each other, not with Inception FIDs of other papers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from vaelab.evaluation import classifier as classifiers


def chance_level(labels: torch.Tensor) -> float:
    """The accuracy of always answering the most common class."""
    return torch.bincount(labels).max().item() / len(labels)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    max_iter: int = 100,
    weight_decay: float = 1e-4,
) -> float:
    """Test accuracy of a multinomial logistic regression fitted on (train_x, train_y), rows flattened.

    The features are standardised with the training statistics; the loss is the mean cross-entropy plus
    weight_decay * |W|^2, minimised by full-batch L-BFGS (strong Wolfe line search) from zero weights.
    """
    train_x, test_x = train_x.flatten(1).float(), test_x.flatten(1).float()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    linear = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(train_x), train_y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (linear(test_x).argmax(1) == test_y).double().mean().item()


@torch.no_grad()
def posterior_means(
    vae,
    images: torch.Tensor,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """E_q[z|x] (a conditional VAE: E_q[z|x, y] with each image's label) of each image, the input prepared as in
    evaluation (a density likelihood dequantises it)."""
    return torch.cat(
        [
            vae.encode(vae.target(x, generator), y)[0].float()
            for x, y in zip(images.split(batch_size), by_batch(labels, batch_size))
        ]
    )


@torch.no_grad()
def reconstructions(
    vae,
    images: torch.Tensor,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder's mean image of each image's posterior mean (a conditional VAE: with the image's label)."""
    codes = posterior_means(vae, images, batch_size, generator, labels)
    return torch.cat([vae.decode_mean(z, y).float() for z, y in zip(codes.split(batch_size), by_batch(labels, batch_size))])


@torch.no_grad()
def prior_samples(
    vae, n: int, batch_size: int = 1000, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """The decoder's mean images of n draws z ~ N(0, I) (a conditional VAE: sample i of class labels[i])."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    chunks = labels.split(sizes) if labels is not None else [None] * len(sizes)
    return torch.cat([vae.sample(size, generator=generator, labels=y).float() for size, y in zip(sizes, chunks)])


def by_batch(labels: torch.Tensor | None, batch_size: int) -> list:
    """labels in batches of batch_size, or an endless None for an unconditional model (zip stops at the images)."""
    return labels.split(batch_size) if labels is not None else itertools.repeat(None)


def frechet_distances(
    model: classifiers.Classifier,
    real: torch.Tensor,
    others: dict[str, torch.Tensor],
    batch_size: int = 1000,
    advance: Callable[[int], object] = lambda sets: None,
) -> dict[str, float]:
    """The Fréchet distance between `real` and each of `others`, in the classifier's feature space (torchmetrics'
    FID with that feature extractor; the real images' features are computed once). advance(1) after each set of images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    model.eval()
    # normalize=True: the images are floats in [0, 1], and torchmetrics hands them to a custom extractor unchanged.
    fid = FrechetInceptionDistance(feature=classifiers.Features(model), reset_real_features=False, normalize=True)
    fid = fid.to(real.device)
    for x in real.split(batch_size):
        fid.update(x, real=True)
    advance(1)
    result = {}
    for name, images in others.items():
        fid.reset()  # the fake side only
        for x in images.split(batch_size):
            fid.update(x, real=False)
        result[name] = float(fid.compute())
        advance(1)
    return result
