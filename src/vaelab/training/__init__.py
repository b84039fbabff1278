"""Training with Lightning: the LightningModule that trains a vaelab.model.VAE, and Lightning's view of the data."""
