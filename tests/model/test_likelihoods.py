"""The observation likelihoods against independent float64 computations and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import ContinuousBernoulli as TorchCB
from torch.distributions import Normal

from vaelab.model import likelihoods as L


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pixels(values, dtype=torch.float32) -> torch.Tensor:
    """[N, 1, 1, 1]: one single-pixel image per value."""
    return torch.as_tensor(values, dtype=dtype).reshape(-1, 1, 1, 1)


def _simpson(y: torch.Tensor, h: float) -> torch.Tensor:
    return h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())


# ---------------------------------------------------------------- Bernoulli


def test_bernoulli_is_bce_and_torch_bernoulli():
    g = _gen(1)
    out = 4 * torch.randn(5, 1, 6, 7, generator=g)
    grey = torch.randint(0, 256, (5, 1, 6, 7), generator=g) / 255
    lik = L.Bernoulli()
    bce64 = F.binary_cross_entropy_with_logits(out.double(), grey.double(), reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(lik.nll(out, grey).double(), bce64, rtol=1e-6, atol=1e-4)
    binary = (grey > 0.5).float()
    ref = -TorchBernoulli(logits=out).log_prob(binary).flatten(1).sum(1)
    torch.testing.assert_close(lik.nll(out, binary), ref)
    torch.testing.assert_close(lik.mean(out), torch.sigmoid(out))
    s = lik.sample(out, _gen())
    assert set(s.unique().tolist()) <= {0.0, 1.0}


def test_bernoulli_nll_is_within_float32_of_bce_and_trains_as_bce_bit_for_bit():
    """Its own formula (log(1 + exp(-|z|)): torch's log1p is slow on the CPU) against float64 BCE-with-logits: per
    pixel within 1.5 float32 ulps of max(|z|, 1) (the size of the terms it adds), over the logits a decoder gives and
    beyond (0, +-20, +-100, +-1e4), and per image as close as float32 BCE-with-logits itself; its gradient is BCE's
    to the bit, also through the ELBO's sum over pixels and mean over the batch, so training does not change."""
    g = _gen(2)
    logits = torch.cat([torch.tensor([0.0, 20.0, -20.0, 100.0, -100.0, 1e4, -1e4, 1e-8]), 8 * torch.randn(4000, generator=g)])
    for target in (torch.rand(len(logits), generator=g), (torch.rand(len(logits), generator=g) > 0.5).float()):
        mine = L.bernoulli_pixel_nll(logits, target).double()
        bce64 = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none")
        assert torch.isfinite(mine).all() and ((mine - bce64).abs() / logits.abs().clamp(min=1)).max() < 1.8e-7
    z = 4 * torch.randn(1000, 1, 28, 28, generator=g)
    x = torch.randint(0, 256, z.shape, generator=g) / 255
    bce64 = F.binary_cross_entropy_with_logits(z.double(), x.double(), reduction="none").flatten(1).sum(1)
    bce32 = F.binary_cross_entropy_with_logits(z, x, reduction="none").flatten(1).sum(1)
    error, bce_error = ((nll.double() - bce64).abs().max() for nll in (L.bernoulli_nll(z, x), bce32))
    assert error < 1.5 * bce_error < 1e-3  # nats an image, of about 1,400
    for scale in (0.1, 3.0, 30.0):
        z = scale * torch.randn(64, 1, 28, 28, generator=g)
        x = torch.randint(0, 256, z.shape, generator=g) / 255
        ours, theirs = z.clone().requires_grad_(), z.clone().requires_grad_()
        L.bernoulli_nll(ours, x).mean().backward()
        F.binary_cross_entropy_with_logits(theirs, x, reduction="none").flatten(1).sum(1).mean().backward()
        assert torch.equal(ours.grad, theirs.grad)
    target = torch.rand(3, generator=g).requires_grad_()  # a target with a gradient gets BCE's too: -z
    L.bernoulli_pixel_nll(torch.tensor([-2.0, 0.0, 5.0]), target).sum().backward()
    assert torch.equal(target.grad, torch.tensor([2.0, 0.0, -5.0]))
    with pytest.raises(ValueError, match=r"logits of shape \(2, 1, 4, 4\) for images of shape \(2, 1, 1, 4\)"):
        L.bernoulli_nll(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 1, 4))  # BCE refuses to broadcast too
    # mixed dtypes: computed in the wider one, as BCE-with-logits; each gradient in its input's dtype
    for logits_dtype, target_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
        z = (4 * torch.randn(6, generator=g)).to(logits_dtype).requires_grad_()
        x = torch.rand(6, generator=g, dtype=target_dtype).requires_grad_()
        mine, theirs = L.bernoulli_pixel_nll(z, x), F.binary_cross_entropy_with_logits(z, x, reduction="none")
        assert mine.dtype == theirs.dtype == target_dtype
        exact = F.binary_cross_entropy_with_logits(z.double(), x.double(), reduction="none")  # of the same values
        torch.testing.assert_close(mine.double(), exact, rtol=1e-6, atol=1e-6)
        mine.sum().backward()
        assert z.grad.dtype == logits_dtype and x.grad.dtype == target_dtype


# ---------------------------------------------------------------- continuous Bernoulli


def _cb_log_prob64(eta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Float64 reference: x log lam + (1-x) log(1-lam) + log(2 atanh(1-2lam)/(1-2lam)), the paper's form.

    Beyond |eta| = 5, 1 - 2 lam is too close to -1 for atanh even in float64, so there the identity
    C = eta / tanh(eta/2) is used (the paper's form checks it below 5); log lam from the logit likewise."""
    eta = eta.double()
    x = x.double()
    r = 1 - 2 * torch.sigmoid(eta)
    paper = torch.log(2 * torch.atanh(r) / r)
    log_c = torch.where(
        r == 0, torch.full_like(r, math.log(2)), torch.where(eta.abs() <= 5, paper, torch.log(eta / torch.tanh(eta / 2)))
    )
    return x * F.logsigmoid(eta) + (1 - x) * F.logsigmoid(-eta) + log_c


@pytest.mark.parametrize("eta", [-10.0, -4.0, -1.0, -0.5, -0.05, 0.02, 0.7, 2.5, 6.0, 10.0])
def test_cb_matches_torch_distribution(eta):
    x = torch.linspace(0, 1, 101)
    out = _pixels([eta] * 101)
    nll = L.ContinuousBernoulli().nll(out, _pixels(x))
    # torch's float64 version as the reference; it switches to its own series only within 0.499..0.501.
    ref = -TorchCB(logits=torch.full((101,), eta, dtype=torch.float64)).log_prob(x.double())
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)


ETA_CASES = [
    0.0,
    math.log(0.501 / 0.499),
    -math.log(0.501 / 0.499),
    math.log(1e-4 / (1 - 1e-4)),
    -10.0,
    10.0,
    0.299,
    0.301,
    -0.999,
    1.001,
    3.0,
]


@pytest.mark.parametrize("eta", ETA_CASES)
def test_cb_density_integrates_to_one_and_mean_matches(eta):
    n = 40001  # odd for Simpson; h * |eta| = 2.5e-4 even at |eta| = 10
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    lik = L.ContinuousBernoulli()
    p = torch.exp(-lik.nll(_pixels([eta] * n), _pixels(x))).double()
    h = 1.0 / (n - 1)
    assert abs(_simpson(p, h).item() - 1.0) < 1e-5
    mean = lik.mean(_pixels([eta])).item()
    assert abs(mean - _simpson(x * p, h).item()) < 1e-6


def test_cb_log_normaliser_accurate_and_smooth_across_series_switch():
    eps = L.CB_LOG_NORM_EPS
    etas = torch.tensor([0.0, 1e-30, 1e-6, 1e-3, 0.1, eps * (1 - 1e-6), eps, eps * (1 + 1e-6), 0.5, 2.0, 30.0, 200.0])
    etas = torch.cat([etas, -etas])
    x = _pixels([0.3] * len(etas))
    e = etas.clone().requires_grad_()
    nll = L.ContinuousBernoulli().nll(e.reshape(-1, 1, 1, 1), x)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(e.grad).all()
    # values against the float64 closed form (its own 0/0 at eta = 0 replaced by the limit 2)
    ref = -_cb_log_prob64(etas.reshape(-1, 1, 1, 1), x).flatten()
    torch.testing.assert_close(nll.double(), ref, rtol=2e-7, atol=1e-7)
    # gradient: d(-log p)/d eta = sigmoid(eta) - x - d log C/d eta, d log C/d eta = 1/eta - 1/sinh(eta)
    e64 = etas.double()
    dlogc = torch.where(e64.abs() < 1e-3, e64 / 6, 1 / e64 - 1 / torch.sinh(e64))
    dlogc = torch.where(e64.abs() > 50, 1 / e64, dlogc)
    ref_grad = torch.sigmoid(e64) - 0.3 - dlogc
    torch.testing.assert_close(e.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    # just inside and just outside the switch agree, value and slope
    inside, at, outside = nll[5:8].double()
    assert abs(inside - outside) / abs(at) < 1e-5
    g_in, g_at, g_out = e.grad[5:8].double()
    assert abs(g_in - g_out) < 1e-5 * abs(g_at) + 1e-7


def test_cb_mean_against_float64():
    etas = torch.cat([torch.linspace(-3, 3, 601), torch.tensor([1e-6, -1e-6, 0.999, 1.001, 8.0, -40.0])])
    e64 = etas.double()
    ref = 0.5 + 0.5 * (1 / torch.tanh(e64 / 2) - 2 / e64)  # float64 closed form, fine away from 0
    ref = torch.where(e64.abs() < 1e-3, 0.5 + e64 / 12, ref)
    m = L.ContinuousBernoulli().mean(etas.reshape(-1, 1, 1, 1)).flatten().double()
    assert (m - ref).abs().max() < 1.5e-7


@pytest.mark.parametrize("eta", [9e-5, -9e-5, 1e-3, 0.5, -3.0, 20.0])
def test_cb_sample_is_the_inverse_cdf_of_its_uniforms(eta):
    n = 10_000
    s = L.ContinuousBernoulli().sample(_pixels([eta] * n), _gen(4)).double().flatten()
    u = torch.rand((n, 1, 1, 1), generator=_gen(4)).double().flatten()  # the same uniforms
    e = torch.tensor(eta, dtype=torch.float64)
    ref = torch.log1p(u * torch.expm1(e)) / e  # F^-1(u) = log(1 + u (e^eta - 1)) / eta
    assert (s - ref).abs().max() < 1e-6


def test_cb_mean_switch_and_extremes():
    eps = L.CB_MEAN_EPS
    etas = torch.tensor([eps * (1 - 1e-6), eps * (1 + 1e-6), 0.0, 1e-7, -1e-7])
    m = L.ContinuousBernoulli().mean(etas.reshape(-1, 1, 1, 1)).flatten()
    assert abs(m[0] - m[1]) < 1e-6
    torch.testing.assert_close(m[2:], torch.full((3,), 0.5))
    big = L.ContinuousBernoulli().mean(_pixels([-1e4, -100.0, 100.0, 1e4])).flatten()
    torch.testing.assert_close(big, torch.tensor([1e-4, 0.01, 0.99, 1 - 1e-4]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eta", [-300.0, -8.0, -0.5, 0.0, 5e-5, 1.5, 300.0])
def test_cb_sample_follows_inverse_cdf(eta):
    n = 200_000
    lik = L.ContinuousBernoulli()
    s = lik.sample(_pixels([eta] * n), _gen(3)).flatten().double()
    assert ((s >= 0) & (s <= 1)).all()
    # the empirical CDF at a few points against the analytic F(x) = (lam^x (1-lam)^(1-x) + lam - 1)/(2 lam - 1)
    lam = torch.sigmoid(torch.tensor(eta, dtype=torch.float64))
    for q in (0.1, 0.5, 0.9):
        # for |eta| >= 50 the mass sits within ~1/|eta| of an end: probe there
        xq = q if abs(eta) < 50 else (q / abs(eta) if eta < 0 else 1 - q / abs(eta))
        xq = torch.tensor(xq, dtype=torch.float64)
        if abs(2 * lam - 1) < 1e-9:
            cdf = xq
        elif abs(eta) < 20:
            cdf = (torch.exp(xq * torch.log(lam) + (1 - xq) * torch.log1p(-lam)) + lam - 1) / (2 * lam - 1)
        else:  # the same F written with the logit, (e^(eta x) - 1)/(e^eta - 1): lam rounds to 1 in float64
            cdf = torch.expm1(eta * xq) / math.expm1(eta)
        emp = (s <= xq).double().mean()
        assert abs(emp - cdf) < 5 * math.sqrt(0.25 / n), (q, emp.item(), cdf.item())


# ---------------------------------------------------------------- discretized logistic

DL_CASES = [
    (0.5, -2.0),
    (0.0, -4.0),
    (1.0, -4.0),
    (0.3, L.DL_LOG_SCALE_MIN),
    (0.7, 1.0),
    (-0.2, -3.0),
    (1.3, -5.0),
    (100 / 255, -7.0),
    (0.5, -20.0),
    (0.5, 6.0),
    (0.4, 1.5),
    (0.5, 2.0),
]  # bin width 1/(255 s) just below / above the 1e-3 switch


def _dl_probs64(mu: float, log_s: float) -> torch.Tensor:
    """Direct float64 CDF differences for the 256 bins, edges at -inf / +inf."""
    s = math.exp(max(log_s, L.DL_LOG_SCALE_MIN))
    x = torch.arange(256, dtype=torch.float64) / 255
    upper = torch.where(x > 254.5 / 255, torch.full_like(x, math.inf), x + 0.5 / 255)
    lower = torch.where(x < 0.5 / 255, torch.full_like(x, -math.inf), x - 0.5 / 255)
    a, b = (upper - mu) / s, (lower - mu) / s
    # sigma(a) - sigma(b) = sigma(-b) - sigma(-a): take the side where both are small, no cancellation
    return torch.where(b > 0, torch.sigmoid(-b) - torch.sigmoid(-a), torch.sigmoid(a) - torch.sigmoid(b))


@pytest.mark.parametrize("mu,log_s", DL_CASES)
def test_discretized_logistic_bins_sum_to_one_and_match_float64(mu, log_s):
    lik = L.DiscretizedLogistic()
    out = torch.tensor([[mu, log_s]]).reshape(1, 2, 1, 1).expand(256, 2, 1, 1)
    x = _pixels(torch.arange(256) / 255)
    log_p = -lik.nll(out, x).double()
    assert torch.isfinite(log_p).all()
    assert abs(log_p.exp().sum().item() - 1.0) < 1e-5
    ref = _dl_probs64(mu, log_s)
    keep = ref > 1e-300
    torch.testing.assert_close(log_p[keep], ref[keep].log(), rtol=1e-5, atol=2e-5)


def test_discretized_logistic_finite_for_extremes():
    lik = L.DiscretizedLogistic()
    mus = [-1e6, -50.0, 0.0, 0.5, 1.0, 50.0, 1e6]
    log_ss = [-1e4, -100.0, -8.0, 0.0, 50.0, 100.0, 1e4]
    pairs = torch.tensor([(m, s) for m in mus for s in log_ss])
    n = len(pairs)
    for level in (0, 1, 127, 254, 255):
        out = pairs.reshape(n, 2, 1, 1).clone().requires_grad_()
        nll = lik.nll(out, torch.full((n, 1, 1, 1), level / 255))
        nll.sum().backward()
        assert torch.isfinite(nll).all() and (nll >= 0).all()
        assert torch.isfinite(out.grad).all()
    # a huge scale spreads the mass evenly: P = density 1/(4s) times width 1/255 for a middle bin
    nll = lik.nll(torch.tensor([0.5, 100.0]).reshape(1, 2, 1, 1), torch.full((1, 1, 1, 1), 0.5))
    assert abs(nll.item() - (100.0 + math.log(4 * 255))) < 1e-4


def test_discretized_logistic_mean_and_sample():
    lik = L.DiscretizedLogistic(channels=3)
    g = _gen(5)
    out = torch.cat([torch.rand(4, 3, 5, 5, generator=g) * 1.4 - 0.2, torch.full((4, 3, 5, 5), -3.0)], 1)
    torch.testing.assert_close(lik.mean(out), out[:, :3].clamp(0, 1))
    s = lik.sample(out, _gen(6))
    k = s * 255
    assert ((s >= 0) & (s <= 1)).all() and torch.allclose(k, k.round(), atol=1e-4)
    assert (s - out[:, :3].clamp(0, 1)).abs().mean() < 0.2


# ---------------------------------------------------------------- Gaussian, dequantisation, bits/dim


def test_gaussian_pixel_scale_matches_normal():
    g = _gen(7)
    mu, log_std = torch.rand(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g) - 2
    x = torch.rand(3, 2, 4, 4, generator=g)
    lik = L.Gaussian(channels=2, scale="pixel")
    assert lik.params_per_channel == 2 and not list(lik.parameters())
    ref = -Normal(mu, log_std.exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.nll(torch.cat([mu, log_std], 1), x), ref)


def test_gaussian_global_scale_is_learned():
    g = _gen(8)
    mu, x = torch.rand(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g)
    lik = L.Gaussian(channels=1, init_log_std=-1.5)
    assert lik.scale == "global" and lik.params_per_channel == 1
    assert [p is lik.log_std for p in lik.parameters()] == [True]
    nll = lik.nll(mu, x)
    ref = -Normal(mu, math.exp(-1.5)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(nll, ref)
    nll.sum().backward()
    # d/d log sigma of sum[(x-mu)^2/(2 sigma^2) + log sigma] = sum[1 - (x-mu)^2/sigma^2]
    expected = (1 - (x - mu).pow(2) / math.exp(-3.0)).sum()
    torch.testing.assert_close(lik.log_std.grad, expected)
    s = lik.sample(mu, _gen(9))
    assert torch.allclose(s * 255, (s * 255).round(), atol=1e-4) and ((s >= 0) & (s <= 1)).all()


def test_dequantize_maps_each_level_into_its_bin():
    k = torch.arange(256).repeat(400)
    x = (k / 255).reshape(-1, 1, 8, 8)
    y = L.dequantize(x, _gen(10)).flatten()
    assert y.dtype == torch.float32
    assert (y >= k / 256).all() and (y < (k + 1) / 256).all()
    # u is uniform: the positions within the bins average 1/2
    assert abs((y * 256 - k).mean().item() - 0.5) < 0.01
    torch.testing.assert_close(L.dequantize(x, _gen(10)), L.dequantize(x, _gen(10)), rtol=0, atol=0)
    # samples of the Gaussian map back to their level
    assert torch.equal(torch.floor(y * 256), k.float())


def test_bits_per_dim_formulas():
    d = 784
    assert L.bits_per_dim(1000.0, d, "discretized_logistic") == pytest.approx(1000 / (d * math.log(2)))
    assert L.bits_per_dim(1000.0, d, "bernoulli") == pytest.approx(1000 / (d * math.log(2)))
    for name in ("gaussian", "continuous_bernoulli"):
        assert L.bits_per_dim(1000.0, d, name) == pytest.approx((1000 + d * math.log(256)) / (d * math.log(2)))
        assert L.bits_per_dim(0.0, d, name) == pytest.approx(8.0)  # uniform density = one of 256 levels
    t = L.bits_per_dim(torch.tensor([0.0, 543.2]), 3, "gaussian")
    torch.testing.assert_close(t, torch.tensor([8.0, 543.2 / (3 * math.log(2)) + 8.0]))
    with pytest.raises(ValueError):
        L.bits_per_dim(1.0, 1, "poisson")


def test_dequantised_gaussian_bits_bound_the_discrete_bits():
    """E_u[-log p((k+u)/256)] + ln 256 >= -log P(k), with P(k) the Gaussian mass of k's bin; tight for wide sigma."""
    k, mu, sigma = 100, 0.45, 0.1
    u = (torch.arange(4096, dtype=torch.float64) + 0.5) / 4096  # midpoint rule over the bin
    y = ((k + u) / 256).reshape(-1, 1, 1, 1).float()
    lik = L.Gaussian(scale="pixel")
    out = torch.tensor([mu, math.log(sigma)]).reshape(1, 2, 1, 1).expand(len(u), 2, 1, 1)
    bound = L.bits_per_dim(lik.nll(out, y).double().mean().item(), 1, "gaussian")
    cdf = Normal(torch.tensor(mu, dtype=torch.float64), sigma).cdf
    exact = -math.log2((cdf(torch.tensor((k + 1) / 256)) - cdf(torch.tensor(k / 256))).item())
    assert exact <= bound + 1e-6 and bound - exact < 1e-4


# ---------------------------------------------------------------- shapes and build


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("bernoulli", {}),
        ("continuous_bernoulli", {}),
        ("discretized_logistic", {}),
        ("gaussian", {"scale": "global"}),
        ("gaussian", {"scale": "pixel"}),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(name, kwargs, channels):
    lik = L.build(name, channels, **kwargs)
    assert lik.name == name and name in L.NAMES and isinstance(lik, torch.nn.Module)
    b, h, w = 2, 5, 6
    out = torch.randn(b, lik.params_per_channel * channels, h, w, generator=_gen(11))
    x = torch.randint(0, 256, (b, channels, h, w), generator=_gen(12)) / 255
    if name == "bernoulli":
        x = x.round()
    nll = lik.nll(out.to(torch.bfloat16), x)
    assert nll.shape == (b,) and nll.dtype == torch.float32 and torch.isfinite(nll).all()
    for picture in (lik.mean(out), lik.sample(out, _gen(13))):
        assert picture.shape == (b, channels, h, w) and ((picture >= 0) & (picture <= 1)).all()
    with pytest.raises(ValueError):
        lik.nll(torch.randn(b, lik.params_per_channel * channels + 1, h, w), x)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("bernoulli", {}),
        ("continuous_bernoulli", {}),
        ("discretized_logistic", {}),
        ("gaussian", {"scale": "global", "init_log_std": -1.5}),
        ("gaussian", {"scale": "pixel"}),
    ],
)
def test_colour_images_sum_over_every_channel(name, kwargs):
    """An RGB image's -log p is the sum of its three channels' (each scored on its own parameters: the means first,
    then the log-scales, `out.chunk(2, dim=1)`), and bits/dim divide by D = C*H*W = 3072 at 32x32."""
    c, h, w = 3, 32, 32
    rgb = L.build(name, c, **kwargs)
    grey = L.build(name, 1, **kwargs)
    out = torch.randn(2, rgb.params_per_channel * c, h, w, generator=_gen(21))
    x = torch.randint(0, 256, (2, c, h, w), generator=_gen(22)) / 255
    if name == "bernoulli":
        x = x.round()
    per_channel = [out[:, [ch + c * p for p in range(rgb.params_per_channel)]] for ch in range(c)]
    summed = sum(grey.nll(o, x[:, ch : ch + 1]).double() for ch, o in enumerate(per_channel))
    torch.testing.assert_close(rgb.nll(out, x).double(), summed, rtol=1e-5, atol=1e-3)
    nats = 5000.0
    offset = c * h * w * math.log(256) if rgb.dequantized else 0.0
    assert L.bits_per_dim(nats, c * h * w, name) == pytest.approx((nats + offset) / (3072 * math.log(2)))


def test_a_colour_vae_reports_bits_per_dim_over_all_its_dimensions():
    """VAE.bits_per_dim (metrics.json, the TensorBoard *_bpd scalars) counts channels: D = 3*8*8 = 192."""
    from conftest import dense_vae

    for name, offset in (("discretized_logistic", 0.0), ("gaussian", 8.0)):
        vae = dense_vae(image_shape=(3, 8, 8), likelihood=name).vae
        assert vae.likelihood.channels == 3
        assert vae.bits_per_dim(400.0) == pytest.approx(400.0 / (192 * math.log(2)) + offset)
        x = torch.randint(0, 256, (4, 3, 8, 8), generator=_gen(23)) / 255
        out = vae.decode(vae.encode(x)[0])
        assert out.shape == (4, vae.likelihood.out_channels, 8, 8) and vae.likelihood.nll(out, x).shape == (4,)


def test_build_rejects_unknown():
    assert L.NAMES == ("bernoulli", "continuous_bernoulli", "discretized_logistic", "gaussian")
    with pytest.raises(ValueError):
        L.build("poisson", 1)
    with pytest.raises(ValueError):
        L.build("gaussian", 1, scale="channel")


@pytest.mark.parametrize(
    "likelihood,binarize,channels,says",
    [
        ("discretized_logistic", "none", 1, "nats per image; discretized_logistic likelihood of the 8-bit grey levels"),
        ("discretized_logistic", "none", 3, "nats per image; discretized_logistic likelihood of the 8-bit RGB levels"),
        (
            "gaussian",
            "none",
            3,
            "nats per image; gaussian density of the uniformly dequantised 8-bit RGB levels; bits/dim include the 8-bit offset",
        ),
        (
            "continuous_bernoulli",
            "none",
            1,
            "nats per image; continuous_bernoulli density of the uniformly dequantised "
            "8-bit grey levels; bits/dim include the 8-bit offset",
        ),
        ("bernoulli", "none", 1, "nats per image; Bernoulli on grey levels, not a density (pixels in [0, 1], not binarized)"),
        ("bernoulli", "dynamic", 1, "nats per image; bernoulli likelihood of the binarized pixels (binarize=dynamic)"),
        ("bernoulli", "static", 3, "nats per image; bernoulli likelihood of the binarized RGB pixels (binarize=static)"),
    ],
)
def test_the_figures_are_described_by_their_likelihood_and_the_images_channels(likelihood, binarize, channels, says):
    """What every report says the figures are: colour images are RGB levels, never grey ones."""
    assert L.describe(likelihood, binarize, channels) == says
