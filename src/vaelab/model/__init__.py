"""The VAE in plain PyTorch: `VAE` (vae.py) with its losses and bounds, the networks, the likelihoods of p(x|z) and
operations on the latent space. Nothing here imports Lightning, Hydra or the run plumbing.

    from vaelab.model import VAE
"""

from vaelab.model.vae import VAE

__all__ = ["VAE"]
