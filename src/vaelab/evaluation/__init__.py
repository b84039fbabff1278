"""How good a trained VAE is: bounds on -log p(x), the linear probe, Fréchet distances and their classifier."""
