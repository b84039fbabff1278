"""Operations on the latent space (vaelab.model.latent): the paths between two codes."""

import torch

from vaelab.model.latent import interpolate


def test_interpolation_paths():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    for method in ("linear", "spherical"):
        path = interpolate(a, b, 5, method)[0]
        assert path.shape == (5, 2)
        assert torch.equal(path[0], a[0]) and torch.equal(path[-1], b[0])
    assert torch.allclose(interpolate(a, b, 5, "linear")[0, 2], torch.tensor([1.5, 1.5]))
    # slerp keeps the norm between two equal-norm ends; the straight line cuts inside
    assert torch.allclose(interpolate(a, b, 5, "spherical")[0].norm(dim=-1), torch.full((5,), 3.0))
    parallel = interpolate(a, 2 * a, 3, "spherical")[0]
    assert torch.allclose(parallel, torch.tensor([[3.0, 0.0], [4.5, 0.0], [6.0, 0.0]]))
