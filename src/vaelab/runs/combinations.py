"""Settings that are each allowed (vaelab.runs.settings) but not together: checked by vaelab-train before any work
starts, after each value alone."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from vaelab import choices
from vaelab.errors import UserError, show


def check(cfg: DictConfig) -> None:
    """Settings that are each allowed but not together (vaelab-train)."""
    model = cfg.get("model") or {}
    objective, likelihood = model.get("objective"), model.get("likelihood", "bernoulli")
    if objective == "notebook" and likelihood != "bernoulli":
        raise UserError(
            f"model.objective=notebook is the notebook's Bernoulli loss; model.likelihood={likelihood} needs "
            f"model.objective=elbo (or iwae)"
        )
    binarize = (cfg.get("data") or {}).get("binarize", "none")
    shape = OmegaConf.select(cfg, "data.image_shape", default=None)
    if likelihood == "bernoulli" and binarize == "none" and shape is not None and shape[0] > 1:
        # Kept on grey levels only as the notebook's loss; on colour images nothing depends on it, so it is refused.
        raise UserError(
            f"model.likelihood=bernoulli is not a likelihood of {shape[0]}-channel images of 256 levels "
            f"(data.image_shape=[{','.join(str(d) for d in shape)}]): add model.likelihood=discretized_logistic "
            f"(or gaussian, or continuous_bernoulli), or binarize the pixels with data.binarize=dynamic"
        )
    if "binarize" in model and model.get("binarize") != binarize:
        # The checkpoint records model.binarize as the data's preparation: vaelab-eval prepares its data by it.
        raise UserError(
            f"model.binarize={model.get('binarize')} is recorded in the checkpoint as how the data was prepared, "
            f"so it must be data.binarize ({binarize}); set data.binarize={model.get('binarize')} instead"
        )
    check_prior(model)
    if objective == "iwae" and model.get("free_bits"):
        raise UserError(
            f"model.free_bits={show(model.free_bits)} applies to the ELBO objective; with model.objective=iwae "
            f"set model.free_bits=0"
        )


def check_prior(model: DictConfig) -> None:
    """model.prior is the config group's choice, and a mixture prior goes with the rest of the model (vaelab-train)."""
    prior = model.get("prior")
    if prior is not None and not isinstance(prior, DictConfig):
        raise UserError(
            f"model.prior={show(prior)} is not allowed: the prior is a config group, chosen with model/prior=<name> "
            f"({', '.join(choices.PRIORS)}), e.g. model/prior=vamp"
        )
    name = prior.get("name", "standard") if prior is not None else "standard"
    if name == "standard":
        return
    # Its KL term is log q(z|x) - log p(z) at a draw of q(z|x): no closed form, no per-dimension split.
    for key, value, fine in (
        ("objective", model.get("objective"), model.get("objective") in ("elbo", "iwae")),
        ("conditional", model.get("conditional", False), not model.get("conditional", False)),
        ("free_bits", model.get("free_bits", 0.0), not model.get("free_bits", 0.0)),
        ("epsilon_std", model.get("epsilon_std", 1.0), model.get("epsilon_std", 1.0) == 1.0),
    ):
        if not fine:
            raise UserError(
                f"model.{key}={show(value)} does not go with the {name} prior (model/prior={name}), whose KL term is the "
                f"estimate log q(z|x) - log p(z) at a draw of q(z|x): use model/prior=standard, or the default model.{key}"
            )
