"""Optimizers a config can name (model.optimizer._target_) beyond torch.optim's."""

from __future__ import annotations

import torch


class AdamNormGrad(torch.optim.Adam):
    """Adam on gradients each divided by its own L2 norm, g / (|g|_2 + 1e-7), one norm per parameter tensor: the
    optimizer of the VampPrior reference code (jmtomczak/vae_vampprior, utils/optimizer.py AdamNormGrad), which the
    Exemplar VAE paper's code uses too. Everything else is torch's Adam (the reference adds eps to sqrt(v) before the
    bias correction of v, torch after it: with eps = 1e-8 the same to within eps)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # Lightning passes the closure that computes the loss and the gradients
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(torch.linalg.vector_norm(p.grad) + 1e-7)
        super().step()
        return loss
