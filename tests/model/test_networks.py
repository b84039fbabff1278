"""vaelab.model.networks: the conv networks take their shape from the data; the 28x28 default is the network it always was."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import FAST, one_line, run_cli
from vaelab.errors import UserError
from vaelab.model.networks import ConvDecoder, ConvEncoder, DenseDecoder, DenseEncoder, conv_blocks


def former_conv(latent_dim: int, c: int = 1) -> tuple[nn.Module, nn.Module]:
    """The 28x28 conv networks as they were written before the blocks came from the size (two stride-2 convs)."""
    encoder = nn.Module()
    encoder.body = nn.Sequential(
        nn.Conv2d(c, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten()
    )
    encoder.heads = nn.Linear(64 * 7 * 7, 2 * latent_dim)
    decoder = nn.Module()
    decoder.body = nn.Sequential(
        nn.Linear(latent_dim, 64 * 7 * 7),
        nn.ReLU(),
        nn.Unflatten(1, (64, 7, 7)),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(32, c, 4, stride=2, padding=1),
    )
    return encoder, decoder


@pytest.mark.parametrize("channels", [None, [32, 64]])  # the config's default (derived) and the former explicit list
def test_the_28x28_default_is_the_former_network_layer_for_layer(channels):
    encoder, decoder = ConvEncoder(256, (1, 28, 28), channels), ConvDecoder(256, (1, 28, 28), channels)
    old_encoder, old_decoder = former_conv(256)
    for new, old in ((encoder, old_encoder), (decoder, old_decoder)):
        assert repr(new.body) == repr(old.body)
        assert {k: v.shape for k, v in new.state_dict().items()} == {k: v.shape for k, v in old.state_dict().items()}
        new.load_state_dict(old.state_dict())  # strict: a checkpoint of the former network loads as it is
    count = sum(p.numel() for m in (encoder, decoder) for p in m.parameters())
    # conv 1->32 and 32->64 (4x4 kernels), heads 3136->512; linear 256->3136, transposed 64->32 and 32->1
    assert count == (16 * 32 + 32) + (32 * 64 * 16 + 64) + (3136 * 512 + 512) + (256 * 3136 + 3136) + (64 * 32 * 16 + 32) + (
        32 * 16 + 1
    )
    torch.manual_seed(0)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(encoder(x)[0], old_encoder.heads(old_encoder.body(x)).chunk(2, dim=-1)[0])


def test_the_composed_default_conv_model_has_the_former_parameter_count(compose):
    from hydra.utils import instantiate

    vae = instantiate(compose(["model=conv"]).model).vae
    old = sum(p.numel() for m in former_conv(256) for p in m.parameters())
    assert (
        sum(p.numel() for p in vae.parameters()) == old == 2_478_785
    )  # as main's ConvEncoder(256) + ConvDecoder(256) before this change


@pytest.mark.parametrize(
    ("shape", "blocks", "smallest"),
    [
        ((1, 28, 28), [32, 64], 7),
        ((3, 32, 32), [32, 64, 128], 4),
        ((3, 64, 64), [32, 64, 128, 256], 4),
        ((3, 96, 96), [32, 64, 128, 256], 6),
    ],
)
def test_blocks_follow_the_image_size_and_shapes_round_trip(shape, blocks, smallest):
    assert conv_blocks(shape) == blocks
    encoder, decoder = ConvEncoder(8, shape), ConvDecoder(8, shape, out_channels=2 * shape[0])  # e.g. a mean and a scale
    assert decoder.start == (blocks[-1], smallest, smallest)
    assert [m.out_channels for m in encoder.body if isinstance(m, nn.Conv2d)] == blocks
    assert [m.out_channels for m in decoder.body if isinstance(m, nn.ConvTranspose2d)] == [*reversed(blocks[:-1]), 2 * shape[0]]
    x = torch.rand(2, *shape)
    mu, logvar = encoder(x)
    assert mu.shape == logvar.shape == (2, 8)
    assert decoder(mu).shape == (2, 2 * shape[0], *shape[1:])
    assert encoder.heads.in_features == blocks[-1] * smallest * smallest


def test_an_explicit_list_sets_the_blocks_and_a_misfit_is_one_line():
    assert conv_blocks((3, 64, 64), [16, 32]) == [16, 32]
    assert ConvDecoder(4, (3, 64, 64), [16, 32]).start == (32, 16, 16)
    with pytest.raises(UserError) as err:
        ConvEncoder(4, (1, 28, 28), [32, 64, 128])
    assert str(err.value) == (
        "model.encoder.channels=[32,64,128] gives 3 stride-2 blocks, which need image sides divisible by 8, but "
        "data.image_shape=[1,28,28]: use 2 block(s), e.g. model.encoder.channels=[32,64], or model.encoder.channels=null "
        "(blocks derived from the size), or resize the images (data.image_size)"
    )
    with pytest.raises(UserError, match=r"data.image_shape=\[1,27,27\] has an odd side or one under 8 pixels"):
        ConvEncoder(4, (1, 27, 27))
    with pytest.raises(UserError, match=r"model.decoder.channels=\[0\] is not allowed"):
        ConvDecoder(4, (1, 28, 28), [0])
    assert math.prod(ConvDecoder(4, (1, 30, 30)).start) == 32 * 15 * 15  # one block: 30 -> 15


def test_a_size_that_does_not_fit_is_refused_from_the_shell_naming_the_setting(tmp_path):
    proc = run_cli(*FAST, f"hydra.run.dir={tmp_path / 'run'}", "model=conv", "model.encoder.channels=[32,64,128]", check=False)
    line = one_line(proc, "vaelab-train: error: model.encoder.channels=[32,64,128] gives 3 stride-2 blocks")
    assert "data.image_shape=[1,28,28]" in line
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_a_64x64_colour_conv_vae_is_built_from_the_config_and_trains_a_step(compose, tmp_path):
    from hydra.utils import instantiate

    from vaelab.runs import settings

    data = ["data=image_folder", f"data.path={tmp_path}", "data.channels=3", "data.image_size=64"]
    cfg = compose([*data, "model=conv", "model.likelihood=discretized_logistic", "latent_dim=16"])
    settings.check(cfg, "train")
    module = instantiate(cfg.model)
    vae = module.vae
    assert [m.out_channels for m in vae.encoder.body if isinstance(m, nn.Conv2d)] == [32, 64, 128, 256]
    assert [m.out_channels for m in vae.decoder.body if isinstance(m, nn.ConvTranspose2d)] == [128, 64, 32, 6]  # mean, log-scale
    assert module.hparams.decoder["channels"] is None  # the decoder follows the encoder's setting
    x = torch.rand(4, 3, 64, 64)
    parts = vae.loss(x, x)
    parts["loss"].backward()
    assert torch.isfinite(parts["loss"]) and vae.decode_mean(vae.encode(x)[0]).shape == (4, 3, 64, 64)
    explicit = instantiate(compose([*data, "model=conv", "model.likelihood=gaussian", "model.encoder.channels=[16,32]"]).model)
    assert explicit.vae.decoder.start == (32, 16, 16) and explicit.hparams.decoder["channels"] == [16, 32]


CONDITIONAL = {  # model -> (encoder, decoder) of a conditional network of 28x28 images, 10 classes, latent 4
    "dense": lambda: (DenseEncoder(4, (1, 28, 28), num_classes=10), DenseDecoder(4, (1, 28, 28), num_classes=10)),
    "mlp": lambda: (
        DenseEncoder(4, (1, 28, 28), hidden=(32, 16), num_classes=10),
        DenseDecoder(4, (1, 28, 28), hidden=(16, 32), num_classes=10),
    ),
    "conv": lambda: (ConvEncoder(4, (1, 28, 28), num_classes=10), ConvDecoder(4, (1, 28, 28), num_classes=10)),
}


@pytest.mark.parametrize("model", sorted(CONDITIONAL))
def test_conditional_networks_take_the_one_hot_label_at_their_first_linear_layer(model):
    """The label changes the output of both networks; its one-hot vector is the extra input of the first linear
    layer (the conv encoder's heads), so a float one-hot vector gives what the index gives, and a mix of two lies
    between them (the interpolation picture's labels)."""
    torch.manual_seed(0)
    encoder, decoder = CONDITIONAL[model]()
    first = (encoder.body[1] if model == "mlp" else encoder.heads, decoder.body[0])
    assert first[0].in_features == (64 * 7 * 7 if model == "conv" else 784) + 10 and first[1].in_features == 4 + 10
    x, z = torch.rand(2, 1, 28, 28), torch.randn(2, 4)
    three, seven = torch.tensor([3, 3]), torch.tensor([7, 7])
    with torch.no_grad():
        for network, inputs in ((encoder, x), (decoder, z)):
            out3, out7 = (network(inputs, y) for y in (three, seven))
            out3, out7 = (o[0] if isinstance(o, tuple) else o for o in (out3, out7))
            assert (out3 - out7).abs().max() > 1e-3, network  # the label changes the output
            as_vector = network(inputs, torch.nn.functional.one_hot(three, 10).float())
            assert torch.allclose(as_vector[0] if isinstance(as_vector, tuple) else as_vector, out3)
    with pytest.raises(ValueError, match="needs the labels"):
        decoder(z)
