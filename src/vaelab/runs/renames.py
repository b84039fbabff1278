"""What vaelab's classes were called before the redesign, and their names today: one table, read wherever a class name
is read from disk (a checkpoint's hyper_parameters, a resumed run's saved config); and the settings that are settings
no more. Plain Python: start-up imports it."""

from __future__ import annotations

from typing import Any

# What vaelab's classes were called before the redesign (4c48284 and earlier): checkpoints and saved run configs
# name them so. Read wherever a name is read from disk (read_checkpoint, the resumed run config), never guessed.
RENAMED_MODULES = {
    "vaelab.networks": "vaelab.model.networks",
    "vaelab.image_folder": "vaelab.data.image_folder",
}
RENAMED = {
    "vaelab.module.VAE": "vaelab.training.module.VAEModule",
    "vaelab.data.MNISTLike": "vaelab.data.mnist.MNISTLike",
    "vaelab.data.TorchvisionData": "vaelab.data.torchvision_data.TorchvisionData",
    "vaelab.checkpoints.AtomicCheckpointIO": "vaelab.runs.checkpoint_io.AtomicCheckpointIO",
    **{
        f"vaelab.callbacks.{name}": f"vaelab.pictures.grids.{name}"
        for name in ("Reconstructions", "NoisyReconstructions", "Interpolation", "Samples")
    },
    **{f"vaelab.callbacks.{name}": f"vaelab.pictures.latent_maps.{name}" for name in ("LatentMap", "Traversals")},
    "vaelab.callbacks.NotebookPictures": "vaelab.pictures.notebook.NotebookPictures",
    "vaelab.rundir.RunDirectory": "vaelab.runs.rundir.RunDirectory",
    "vaelab.sweep.SweepSummary": "vaelab.runs.sweep.SweepSummary",
}


def current_name(target: str) -> str:
    """The name today of a class an older vaelab wrote as `target` (itself when it was not renamed)."""
    module, _, name = target.rpartition(".")
    return RENAMED.get(target) or (f"{RENAMED_MODULES[module]}.{name}" if module in RENAMED_MODULES else target)


def renamed(node: Any) -> Any:
    """`node` (plain data: dicts and lists, changed in place) with every old `_target_` given its name today."""
    if isinstance(node, list):
        for value in node:
            renamed(value)
    elif isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and current_name(target) != target:
            node["_target_"] = current_name(target)
        for value in node.values():
            renamed(value)
    return node


# Settings that are settings no more, and what does their job now: the line for one given on the command line
# (vaelab.runs.rundir; vaelab.errors where the schema no longer has it); a saved run config's is dropped (resume).
RETIRED = {"resume_from": "to continue a run in place, run vaelab-resume {}"}


def retired(key: str, value: str) -> str:
    import shlex

    given = shlex.quote(value) if value not in ("", "null") else "<run dir>"
    return f"{key}={value} is no longer a setting: {RETIRED[key].format(given)}"
