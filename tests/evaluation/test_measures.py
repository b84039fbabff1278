"""vaelab.evaluation.measures: the linear probe on data whose answer is known, and its chance level; vaelab-eval's notes where
the probe and the Fréchet distance are not computed."""

import torch
from omegaconf import OmegaConf

from vaelab.commands.evaluate import probe_and_frechet
from vaelab.evaluation.measures import chance_level, linear_probe


def blobs(n: int, seed: int, spread: float):
    """Three classes around three corners of a 5-dimensional cube, with Gaussian noise of std `spread`."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.eye(3, 5) * 4
    return centres[labels] + spread * torch.randn(n, 5, generator=generator), labels


def test_the_probe_separates_separable_classes_and_is_deterministic():
    train_x, train_y = blobs(300, 0, 0.5)
    test_x, test_y = blobs(90, 1, 0.5)
    assert linear_probe(train_x, train_y, test_x, test_y) == 1.0
    noisy = [linear_probe(*blobs(300, 0, 3.0), *blobs(300, 1, 3.0)) for _ in range(2)]
    assert noisy[0] == noisy[1] and 0.4 < noisy[0] < 1.0  # overlapping classes: above chance, below perfect


def test_the_probe_finds_nothing_in_features_unrelated_to_the_labels():
    generator = torch.Generator().manual_seed(0)
    x, tx = torch.randn(600, 20, generator=generator), torch.randn(600, 20, generator=generator)
    y, ty = torch.arange(600) % 3, torch.arange(600) % 3
    assert abs(linear_probe(x, y, tx, ty) - 1 / 3) < 0.08


def test_chance_is_the_largest_class_share():
    assert chance_level(torch.tensor([0, 1, 1, 2, 1, 0])) == 0.5


def probe_settings(**data):
    return OmegaConf.create(
        {
            "data": data,
            "seed": 0,
            "batch_size": 100,
            "linear_probe": {"enabled": True, "train_images": None, "max_iter": 10, "weight_decay": 0.0},
            "frechet": {"enabled": True, "num_samples": 10},
            "classifier": {"epochs": 1, "seed": 0, "train_images": None, "cache_dir": None},
        }
    )


def test_data_without_classes_gets_neither_figure_and_a_note_why():
    cfg = probe_settings(_target_="test_classifier.OneClass", image_shape=[1, 8, 8], dataset="ImageFolder")
    result = probe_and_frechet(None, cfg, 20, torch.device("cpu"))
    assert result["linear_probe_accuracy"] is None and result["frechet_distance"] is None
    assert result["notes"] == [
        "no linear probe and no Fréchet distance: data=ImageFolder has fewer than two classes (they need labelled "
        "images: for a folder of images, one subfolder per class)"
    ]
    cfg.linear_probe.enabled = cfg.frechet.enabled = False
    off = probe_and_frechet(None, cfg, 20, torch.device("cpu"))
    assert off["notes"] == ["linear_probe: off (linear_probe.enabled=false)", "frechet: off (frechet.enabled=false)"]
