"""Load a VAE checkpoint written by vaelab-train, safely, for vaelab-eval and vaelab-generate.

Weights-only unpickling means a checkpoint cannot run code while it is read; the networks are then rebuilt
from the saved hyperparameters with Hydra's instantiate, so their `_target_`s are checked against an
allow-list first (otherwise a crafted checkpoint could name any callable).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from vaelab.module import VAE
from vaelab.validate import UserError

# Where the classes a checkpoint may ask to build live: vaelab's networks and torch's layers and optimizers.
SAFE_TARGET_PREFIXES = ("vaelab.networks.", "torch.nn.", "torch.optim.")
HINT = "pass ckpt_path=<run dir>/checkpoints/last.ckpt (or best-epochNNN.ckpt) from a vaelab-train run"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or null): the GPU when there is one, else the CPU; anything else is passed to torch.device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _targets(node) -> list[str]:
    if isinstance(node, Mapping):
        found = [str(node["_target_"])] if "_target_" in node else []
        return found + [t for value in node.values() for t in _targets(value)]
    if isinstance(node, (list, tuple)):
        return [t for value in node for t in _targets(value)]
    return []


def load_vae(path: str | Path, device: str | torch.device | None = "cpu") -> VAE:
    """The VAE saved at `path`, rebuilt from its own hyperparameters, in eval mode on `device`.

    Raises CheckpointError (one line naming the file) for a missing, unreadable, truncated or foreign file,
    before anything else is built.
    """
    if path in (None, ""):
        raise CheckpointError(f"no checkpoint given; {HINT}")
    path = Path(path)
    if path.is_dir():
        inside = path / "checkpoints" / "last.ckpt"
        hint = f"did you mean ckpt_path={inside}?" if inside.exists() else HINT
        raise CheckpointError(f"checkpoint {path} is a directory, not a .ckpt file; {hint}")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found; {HINT}")
    raw = path.read_bytes()
    try:
        checkpoint = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError) for bad files
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            reason = (f"it holds a Python object ({refused.group(1)}) that weights-only loading refuses to unpickle "
                      f"(vaelab never runs code from a checkpoint)")
        else:
            detail = str(err).strip().splitlines()[-1] if "Weights only load failed" not in str(err) else "not a pickle of plain data"
            reason = f"it is not a readable PyTorch checkpoint, perhaps truncated or another kind of file ({type(err).__name__}: {detail})"
        raise CheckpointError(f"cannot load checkpoint {path} ({len(raw)} bytes): {reason}; {HINT}") from None

    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    if not isinstance(hparams, Mapping) or "state_dict" not in checkpoint or not {"encoder", "decoder", "latent_dim"} <= set(hparams):
        raise CheckpointError(f"checkpoint {path} is not a vaelab VAE checkpoint (it has no state_dict and hyper_parameters "
                              f"with encoder, decoder and latent_dim); {HINT}")
    unsafe = [t for t in _targets(hparams) if not t.startswith(SAFE_TARGET_PREFIXES)]
    if unsafe:
        raise CheckpointError(f"checkpoint {path} asks to build {unsafe}, outside the allowed modules {list(SAFE_TARGET_PREFIXES)}; "
                              f"refusing to instantiate them")
    try:
        vae = VAE.load_from_checkpoint(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # e.g. weights that do not fit the networks its hyperparameters describe
        message = " ".join(str(err).split())  # one line: state-dict errors span several
        message = message if len(message) <= 400 else message[:400] + " ..."
        raise CheckpointError(f"cannot rebuild the VAE from checkpoint {path}: {type(err).__name__}: {message}") from None
    return vae.to(resolve_device(device) if not isinstance(device, torch.device) else device).eval()
