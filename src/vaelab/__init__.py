"""vaelab: config-driven variational autoencoders with PyTorch Lightning, Hydra and TensorBoard."""

from vaelab import hardware  # noqa: F401  registers the config resolvers (${vaelab.cpu_precision:})
