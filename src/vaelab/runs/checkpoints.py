"""Checkpoint files: written atomically, read as untrusted input.

- `read_checkpoint` reads a file once: its zip CRCs are tested (torch.load alone reads a flipped byte without
  complaint), then it is unpickled weights-only, which refuses any Python object but plain data and tensors.
  What is read from it is then checked like a setting (`check_contents`): weights are finite tensors, the model's
  hyperparameters are what vaelab-train's model.* settings allow (vaelab.runs.settings.MODEL, the one declaration),
  the training state has its types.
- What a checkpoint asks to build is decided by what each `_target_` *is*: it is resolved without calling
  anything, and only `torch.nn.Module` classes defined in vaelab.model.networks or torch.nn (or named by the user in
  `allow_networks`) pass, with plain-data arguments. Spelling tricks (`vaelab.model.networks.torch.serialization.os.system`)
  fail because a module is imported only when its full name is allowed, and an attribute is looked up in that
  module alone. The optimizer a checkpoint names is never built for evaluation.
"""

from __future__ import annotations

import importlib
import io
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from vaelab.errors import UserError, memory_message, one_line, out_of_memory, show
from vaelab.model.vae import VAE
from vaelab.runs.renames import renamed
from vaelab.runs.settings import CHECKPOINT_HINT, MODEL, check_checkpoint_file

NETWORK_MODULES = ("vaelab.model.networks", "torch.nn")
PLAIN = (str, int, float, bool, type(None))
SPECIAL_KEYS = {"_target_", "_args_", "_recursive_", "_convert_"}
HINT = CHECKPOINT_HINT


def read_checkpoint(path: str | Path, key: str) -> dict:
    """The checkpoint at `path` as plain data, or UserError naming the file, what is wrong and the run's others."""
    path = Path(path)
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    instead = f"; the run's other checkpoints: {', '.join(others)} in {path.parent}" if others else ""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{key}: cannot read {path} ({err.strerror}); {HINT}") from None
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise zipfile.BadZipFile(f"record {damaged} fails its CRC check")
        checkpoint = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # zipfile, torch and pickle raise several types for damaged or foreign files
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(err))
        if refused:
            reason = (
                f"it holds a Python object ({refused.group(1)}) that weights-only loading refuses to unpickle "
                f"(vaelab never runs code from a checkpoint)"
            )
        else:
            reason = f"it is truncated or damaged, not a readable checkpoint ({type(err).__name__}: {one_line(err)[:200]})"
        raise UserError(f"{key}: {path} ({len(raw)} bytes): {reason}{instead}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{key}: {path} is not a vaelab checkpoint (it has no state_dict); {HINT}{instead}")
    check_contents(checkpoint, f"{key}: {path}", instead)
    renamed(checkpoint.get("hyper_parameters"))
    return checkpoint


# A checkpoint records the model's settings as hyper_parameters.<name> (and .<part>.<name>: the prior, the networks'
# options) where vaelab-train has model.<name>: each is checked by that setting's declaration. The prior is plain data
# (no _target_): vaelab.model.priors.build makes it from its name, so a checkpoint chooses among vaelab's priors only.
RECORDED = {tuple(path.split(".")[1:]): setting for path, setting in MODEL.items() if setting.check is not None}
TRAINING_FIELDS = {
    "epoch": (int, "an integer"),
    "global_step": (int, "an integer"),
    "loops": (Mapping, "a dict"),
    "optimizer_states": (list, "a list"),
}


def check_contents(checkpoint: dict, where: str, instead: str = "") -> None:
    """What the commands read from a checkpoint has the type they read it as: a crafted or foreign file is one line."""

    def refuse(what: str) -> UserError:
        return UserError(f"{where} is not a checkpoint vaelab can use: {what}; {HINT}{instead}")

    weights = checkpoint["state_dict"]
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise refuse("its state_dict is not a mapping of names to tensors")
    broken = next((k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if broken is not None:
        raise UserError(
            f"{where}: its weights hold NaN or infinite values ({broken}), so nothing computed from them means anything; "
            f"use an earlier checkpoint of the run{instead or ' (its checkpoints/ folder)'}"
        )
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams, Mapping):
        raise refuse(f"its hyper_parameters are a {type(hparams).__name__}, not a mapping of settings")
    prior = hparams.get("prior")
    if prior is not None and not (isinstance(prior, Mapping) and all(isinstance(k, str) for k in prior)):
        raise refuse(f"its hyper_parameters.prior={show(prior)[:40]} is not a mapping of the prior's settings")
    for (*parts, name), setting in RECORDED.items():
        node = hparams
        for part in parts:
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and name in node and not setting.check(node[name]):
            raise refuse(f"its hyper_parameters.{'.'.join((*parts, name))}={show(node[name])[:40]} is not {setting.allowed}")
    names = hparams.get("class_names")  # a conditional model's classes: plain strings, one per one-hot input
    if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
        raise refuse(f"its hyper_parameters.class_names={show(names)[:40]} is not a list of class names")
    if hparams.get("conditional") and not names:
        raise refuse("its hyper_parameters.conditional is true but it names no class_names")
    for name, (kind, words) in TRAINING_FIELDS.items():
        if name in checkpoint and not (isinstance(checkpoint[name], kind) and not isinstance(checkpoint[name], bool)):
            raise refuse(f"its {name} is {show(checkpoint[name])[:40]}, not {words}")
    states = checkpoint.get("optimizer_states", [])
    if not all(
        isinstance(s, Mapping) and isinstance(s.get("state"), Mapping) and isinstance(s.get("param_groups"), list) for s in states
    ):
        raise refuse("its optimizer_states are not optimizer state dicts (state and param_groups)")


def check_optimizer_state(model, checkpoint: dict, key: str) -> None:
    """The checkpoint's optimizer state loads into the optimizer these settings build (a copy is tried, so the
    refusal comes before training starts rather than from inside Lightning's restore)."""
    import copy

    states = checkpoint.get("optimizer_states") or []
    if not states:
        return
    optimizer = model.configure_optimizers()
    try:
        optimizer.load_state_dict(copy.deepcopy(states[0]))
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
        raise UserError(
            f"{key}: its optimizer state does not fit the optimizer of these settings ({type(err).__name__}: "
            f"{one_line(err)[:200]}); continue it with its own settings (vaelab-resume <its run dir>) or start a new run"
        ) from None


def network_class(target: Any, allowed: tuple[str, ...] = (), key: str = "") -> type[torch.nn.Module]:
    """The class a `_target_` names, if it is a torch.nn.Module defined in an allowed module (or named in
    `allowed`, which holds modules or classes); found without calling anything, else UserError. For a name the
    user allowed, the error says what is wrong with it (not importable, no such class, not a network)."""
    text = str(target)
    module_name, _, name = text.rpartition(".")
    modules = (*NETWORK_MODULES, *allowed)
    in_allowed = lambda module, among=modules: any(module == m or module.startswith(m + ".") for m in among)  # noqa: E731
    refusal = UserError(
        f"refusing to build {text!r}: a checkpoint may only build torch.nn.Module classes of "
        f"{', '.join(NETWORK_MODULES)} (or ones you allow with allow_networks=[<module or class>])"
    )
    if not module_name or not name.isidentifier() or not (in_allowed(module_name) or text in allowed):
        raise refusal
    users = text in allowed or in_allowed(module_name, allowed)
    where = f"{key}: " if key else ""
    try:
        module = importlib.import_module(module_name)  # only a module whose whole name is allowed is imported
    except ImportError as err:
        if not users:
            raise refusal from None
        raise UserError(
            f"{where}cannot build {text!r}: {module_name} cannot be imported ({type(err).__name__}: {one_line(err)}); "
            f"install it, or add the folder that holds it to PYTHONPATH"
        ) from None
    found = vars(module).get(name)  # this module's own attribute: no further lookups
    network = isinstance(found, type) and issubclass(found, torch.nn.Module)
    if users and found is None:
        origin = f" ({module.__file__})" if getattr(module, "__file__", None) else ""
        raise UserError(f"{where}cannot build {text!r}: the module {module_name}{origin} has no {name}")
    if users and not network:
        what = f"the class {found.__qualname__}" if isinstance(found, type) else f"a {type(found).__name__}"
        raise UserError(f"{where}refusing to build {text!r}: it is {what}, not a network (a torch.nn.Module subclass)")
    if not (network and (in_allowed(found.__module__) or text in allowed)):
        raise refusal
    return found


def check_buildable(node: Any, allowed: tuple[str, ...] = (), where: str = "hyper_parameters") -> None:
    """Every `_target_` in `node` an allowed network class, every other value plain data."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            network_class(node["_target_"], allowed)
        for key, value in node.items():
            if not isinstance(key, str) or (key.startswith("_") and key.endswith("_") and key not in SPECIAL_KEYS):
                raise UserError(f"refusing the checkpoint's {where}: key {key!r} is not a setting vaelab builds")
            check_buildable(value, allowed, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for value in node:
            check_buildable(value, allowed, where)
    elif not isinstance(node, PLAIN):
        raise UserError(f"refusing the checkpoint's {where}: {type(node).__name__} is not plain data")


def check_fits(model: torch.nn.Module, state_dict: Mapping[str, Any], key: str) -> None:
    """The checkpoint's weights have the names and shapes of `model`'s, or UserError naming the first difference."""
    own = model.state_dict()
    for name, tensor in own.items():
        theirs = state_dict.get(name)
        if theirs is None or tuple(theirs.shape) != tuple(tensor.shape):
            was = "missing" if theirs is None else f"{list(theirs.shape)}"
            raise UserError(
                f"{key} holds a different network: {name} is {was} in the checkpoint but {list(tensor.shape)} "
                f"with these settings; continue it with its own settings (vaelab-resume <its run dir>) "
                f"or start a new run"
            )
    extra = sorted(set(state_dict) - set(own))
    if extra:
        raise UserError(
            f"{key} holds a different network: it has {extra[0]} (and {len(extra) - 1} more), which these "
            f"settings do not build; continue it with its own settings or start a new run"
        )


def vae_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain VAE's weights in a training checkpoint: under `vae.` (vaelab.training.module.VAEModule.vae), or at the
    top level in a checkpoint of a vaelab before the redesign. Evaluation metrics' states are not weights."""
    return {k.removeprefix("vae."): v for k, v in state_dict.items() if not k.startswith("eval_means.")}


def load_vae(path: str | Path, device: str | torch.device = "cpu", allow_networks: tuple[str, ...] = ()):
    """The VAE saved at `path`, rebuilt from its own hyperparameters (networks checked first), in eval mode."""
    key = f"ckpt_path={path}"
    if path in (None, ""):
        raise UserError(f"no checkpoint given; {HINT}")
    check_checkpoint_file(str(path))
    checkpoint = read_checkpoint(path, key)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or not {"encoder", "decoder", "latent_dim"} <= set(hparams):
        raise UserError(
            f"checkpoint {path} is not a vaelab VAE checkpoint (its hyper_parameters have no encoder, "
            f"decoder and latent_dim); {HINT}"
        )
    hparams = {k: v for k, v in hparams.items() if k != "optimizer"}  # not needed to evaluate: never built here
    check_buildable(hparams, tuple(allow_networks))
    try:
        vae = VAE.from_settings(hparams, instantiate)  # every _target_ in it was checked above
        weights = vae_weights(checkpoint["state_dict"])
        check_fits(vae, weights, f"checkpoint {path}")
        vae.load_state_dict(weights)
    except UserError:
        raise
    except Exception as err:  # hyperparameters the networks do not take
        if out_of_memory(err):  # e.g. a crafted latent_dim: the checkpoint's sizes, not the user's settings
            raise UserError(f"cannot rebuild the VAE from checkpoint {path}: {memory_message(out_of_memory(err))}") from None
        raise UserError(f"cannot rebuild the VAE from checkpoint {path}: {type(err).__name__}: {one_line(err)[:300]}") from None
    return vae.to(device).eval()
