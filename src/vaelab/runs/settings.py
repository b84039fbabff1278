"""The settings of each command, each declared once and checked before any work starts.

A `Setting` declares what a key's value must be: its type, its range (in words and as a test) and an example. Each is
declared once below (PATHS and DATA serve every command; MODEL is also what a checkpoint records, checked by
vaelab.runs.checkpoints), and the rest is derived: the structured configs (`train_schema`, ...: the first entry of each
command's defaults list), so that `seed=abc` is refused while Hydra composes, in the declaration's words
(`type_message`), the config groups (data, model, ...) left open for a user's own keys; and `check(cfg, command)`, one
line naming the first value out of range as the user typed the key, what is allowed and an example. The names a
choice takes are vaelab.choices'. Importing this registers the schemas and resolvers; only hydra and omegaconf load.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, make_dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vaelab import choices, errors
from vaelab.errors import UserError, show
from vaelab.runs import combinations, hardware  # hardware also registers the resolvers the configs use

IS = {
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def fits(kind: Any, value: Any) -> bool:
    """`value` is of the type `kind` (an int is a float, a bool is neither; Optional[...], list[...] and Any too)."""
    if get_origin(kind) is Union:
        return value is None or fits(get_args(kind)[0], value)
    if get_origin(kind) is list:
        return isinstance(value, (list, ListConfig)) and all(fits(get_args(kind)[0], v) for v in value)
    return IS.get(kind, lambda v: True)(value)


@dataclass(frozen=True)
class Setting:
    kind: Any  # its type: the structured config's (Hydra checks it while it composes), and check()'s
    allowed: str  # in words
    example: str  # a good value, as typed
    range: Callable[[Any], bool] | None = None  # what a value of that type (other than null) must be
    headline: str | None = None  # the key of conf/train.yaml a config group reads it through (`${latent_dim}`)
    checked: bool = True  # False: typed only (a value that exists once a run starts)

    def __call__(self, example: str, headline: str | None = None) -> Setting:
        """The same setting with this key's example (and headline key)."""
        return replace(self, example=example, headline=headline)

    def check(self, value: Any) -> bool:
        return fits(self.kind, value) and (value is None or self.range is None or bool(self.range(value)))


def whole(low: int | None = None, high: int | None = None, note: str = "", optional: bool = False) -> Setting:
    """An integer in [low, high] (None: no bound), or null if optional; `note` says what values mean."""
    if high is not None:
        words = f"an integer between {low} and {high}"
    else:
        words = "a positive integer" if low == 1 else "an integer" if low is None else f"an integer >= {low}"
    words += (" or null" if optional else "") + (f" ({note})" if note else "")
    inside = lambda v: (low is None or v >= low) and (high is None or v <= high)  # noqa: E731
    return Setting(Optional[int] if optional else int, words, "null" if optional else "0", inside)


def number(low: float, high: float | None = None, strict: bool = False, optional: bool = False) -> Setting:
    """A finite number >= low (> low if strict), <= high, or null if optional."""
    words = f"a number in [{low:g}, {high:g}]" if high is not None else f"a number {'>' if strict else '>='} {low:g}"
    inside = lambda v: (v > low if strict else v >= low) and (high is None or v <= high)  # noqa: E731
    return Setting(Optional[float] if optional else float, ("null or " if optional else "") + words, "", inside)


def pair(low: float = -math.inf, high: float = math.inf) -> Callable[[list], bool]:
    """[a, b] with low < a < b < high."""
    return lambda v: len(v) == 2 and low < v[0] < v[1] < high


def one_of(*names: str) -> Setting:
    return Setting(str, f"one of {', '.join(names)}", names[0], lambda v: v in names)


POSITIVE, OPTIONAL_POSITIVE, INTEGER = whole(1), whole(1, optional=True), whole()
BOOL = Setting(bool, "true or false", "false")
STRING = Setting(str, "a non-empty string", "...", lambda v: v.strip() != "")
# A path given as an empty string would mean the working directory: refused wherever vaelab reads or writes a path.
OPTIONAL_PATH = Setting(Optional[str], "a path or null", "null", STRING.range)
FRACTION = Setting(float, "a fraction in [0, 1)", "0.1", lambda v: 0 <= v < 1)
LIMIT = Setting(
    Optional[float],
    "null, a number of batches (an integer >= 0) or a fraction in [0, 1]",
    "null",
    lambda v: v >= 0 and (IS[int](v) or v <= 1),
)
CKPT = "outputs/<date>/<time>/checkpoints/last.ckpt"

PATHS = {
    **{f"paths.{key}": STRING("outputs") for key in ("root_dir", "data_dir", "log_dir")},
    "paths.output_dir": Setting(Optional[str], "a path or null", "null", checked=False),  # Hydra's: null until a run
}
DATA = {
    "data.dataset": STRING("CIFAR10"),
    "data.batch_size": POSITIVE("128", "batch_size"),
    "data.eval_batch_size": POSITIVE("1000"),
    "data.val_size": whole(1, 59999)("5000"),
    "data.split_seed": INTEGER,
    "data.seed": INTEGER("42", "seed"),
    "data.download": BOOL,
    "data.binarize": one_of(*choices.BINARIZE),
    # data=image_folder (vaelab.data.image_folder.ImageFolder); before data.image_shape, which follows channels and image_size
    "data.path": STRING("path/to/images"),
    "data.channels": Setting(int, "1 (grey) or 3 (RGB)", "3", lambda v: v in (1, 3)),
    "data.image_size": OPTIONAL_POSITIVE("32"),
    "data.crop": BOOL("true"),
    "data.val_fraction": FRACTION,
    "data.test_fraction": FRACTION,
    "data.workers": OPTIONAL_POSITIVE("4"),
    "data.cache_dir": OPTIONAL_PATH,
    "data.data_dir": STRING("data"),
    "data.system_dir": OPTIONAL_PATH,
    "data.image_shape": Setting(
        list[int], "three positive integers [channels, height, width]", "[1,28,28]", lambda v: len(v) == 3 and min(v) > 0
    ),
}
MODEL = {
    "model.latent_dim": POSITIVE("16", "latent_dim"),
    "model.noise_factor": number(0, 1)("0.1", "noise_factor"),
    "model.optimizer.lr": number(0, strict=True)("1e-3", "lr"),
    "model.beta": number(0)("1.0", "beta"),
    "model.epsilon_std": number(0, strict=True)("1.0"),
    "model.objective": one_of(*choices.OBJECTIVES),
    "model.likelihood": one_of(*choices.LIKELIHOODS),
    "model.kl_warmup_epochs": whole(0, note="0: no warm-up")("100"),
    "model.free_bits": number(0)("0.5"),
    "model.num_samples": POSITIVE("5"),
    "model.eval_iwae_samples": POSITIVE("10"),
    "model.val_iwae_every_n_epochs": whole(0, note="0: never")("50"),
    "model.denoise": BOOL("false", "denoise"),
    "model.conditional": BOOL,
    "model.prior.name": one_of(*choices.PRIORS),
    "model.prior.components": POSITIVE("500"),
    "model.prior.pseudo_input_mean": number(0, 1)("0.05"),
    "model.prior.pseudo_input_std": number(0)("0.01"),
    **{f"model.{part}.gated": BOOL("true") for part in ("encoder", "decoder")},
    "model.encoder.logvar_range": Setting(Optional[list[float]], "null or [low, high] with low < high", "[-6,2]", pair()),
    **{f"model.{part}.init": one_of(*choices.INITS)("he") for part in ("encoder", "decoder")},
}
# What every command has: where things go, torch's CPU threads, whether an existing run may be replaced.
COMMAND = {**PATHS, "threads": OPTIONAL_POSITIVE, "overwrite": BOOL}
TRAIN = {
    **COMMAND,
    **MODEL,
    "trainer.max_epochs": POSITIVE("10", "epochs"),
    "seed": INTEGER("42"),
    "ckpt_path": OPTIONAL_PATH(CKPT),
    "test_after_fit": BOOL,
    "steps_per_call": POSITIVE("10"),
    "trainer.log_every_n_steps": POSITIVE("50"),
    "trainer.check_val_every_n_epoch": OPTIONAL_POSITIVE("1"),
    "trainer.num_sanity_val_steps": whole(-1)("2"),
    "trainer.max_steps": whole(-1, note="-1: no limit")("-1"),
    "trainer.gradient_clip_val": number(0, optional=True)("1.0"),
    "trainer.gradient_clip_algorithm": one_of("norm", "value"),
    "trainer.accumulate_grad_batches": POSITIVE("2"),
    **{f"trainer.limit_{split}_batches": LIMIT for split in ("train", "val", "test")},
    "trainer.accelerator": one_of("cpu", "gpu", "cuda", "mps", "auto"),
    **DATA,
}
DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # a module or class name
# What vaelab-eval and vaelab-generate share: a checkpoint to read, the device, the networks a user trusts.
INSPECT = {
    **COMMAND,
    "ckpt_path": STRING(CKPT),
    "device": Setting(str, "auto, cpu, cuda, cuda:<index> or mps", "auto", re.compile(r"auto|cpu|mps|cuda(:\d+)?").fullmatch),
    "allow_networks": Setting(
        list[str], "a list of dotted module or class names", "[mypkg.nets]", lambda v: all(map(DOTTED.fullmatch, v))
    ),
    "seed": INTEGER,
}
# null: the data prepared as the checkpoint's model was trained (it records how).
AS_TRAINED = f"null (as the checkpoint's model was trained), {', '.join(choices.BINARIZE[:-1])} or {choices.BINARIZE[-1]}"
INSPECT_DATA = {**DATA, "data.binarize": Setting(Optional[str], AS_TRAINED, "null", lambda v: v in choices.BINARIZE)}
EVAL = {
    **INSPECT,
    "num_importance_samples": OPTIONAL_POSITIVE("100"),
    "pairs_per_pass": POSITIVE("20000"),
    "batch_size": POSITIVE("1000"),
    "num_images": OPTIONAL_POSITIVE("1000"),
    "noise_levels": Setting(
        list[float], "a non-empty list of noise standard deviations >= 0", "[0,0.1,0.3]", lambda v: len(v) > 0 and min(v) >= 0
    ),
    "active_unit_threshold": number(0)("0.01"),
    "linear_probe.enabled": BOOL,
    "linear_probe.train_images": whole(2, note="all training images", optional=True)("10000"),
    "linear_probe.max_iter": POSITIVE("100"),
    "linear_probe.weight_decay": number(0)("1e-4"),
    "frechet.enabled": BOOL,
    "frechet.num_samples": whole(2, note="a covariance needs two images")("10000"),
    "classifier.epochs": POSITIVE("3"),
    "classifier.seed": INTEGER,
    "classifier.train_images": whole(2, note="the whole training split", optional=True)("null"),
    "classifier.cache_dir": Setting(Optional[str], "a folder or null", "null", lambda v: v != ""),
    **INSPECT_DATA,
}
GENERATE = {
    **INSPECT,
    "num_samples": POSITIVE("64"),
    "nrow": OPTIONAL_POSITIVE("8"),
    "temperature": number(0, strict=True)("0.8"),
    "interpolate": BOOL,
    "num_pairs": whole(1, 5000, "pairs of the 10,000 test images")("8"),
    "num_steps": whole(2, note="both ends of each row")("10"),
    # a class name or index (an integer as typed, e.g. label=7, becomes "7")
    "label": Setting(Optional[str], "a class name, an index or null", "Sandal", STRING.range),
    "batch_size": POSITIVE("256"),
    **INSPECT_DATA,
}
SETTINGS = {"train": TRAIN, "eval": EVAL, "generate": GENERATE}

# The settings of vaelab's own callbacks (conf/callbacks/<name>.yaml), checked wherever the callback is configured.
PICTURES = {"every_n_epochs": POSITIVE("1"), "seed": INTEGER}
CALLBACKS = {
    f"vaelab.pictures.{target}": {**own, **PICTURES}
    for target, own in {
        "grids.Reconstructions": {"num_images": POSITIVE("16")},
        "grids.NoisyReconstructions": {"num_images": POSITIVE("16"), "noise_factor": number(0)("0.1")},
        "grids.Interpolation": {
            "num_pairs": POSITIVE("8"),
            "steps": whole(2, note="the two ends")("10"),
            "method": one_of(*choices.INTERPOLATIONS),
        },
        "grids.Samples": {"num_samples": POSITIVE("64"), "ncols": POSITIVE("8"), "temperature": number(0, strict=True)("1.0")},
        "latent_maps.LatentMap": {
            "grid_size": whole(2)("20"),
            "quantile_range": Setting(list[float], "[low, high] with 0 < low < high < 1", "[0.05,0.95]", pair(0, 1)),
            "num_points": POSITIVE("2000"),
        },
        "latent_maps.Traversals": {
            "num_units": POSITIVE("8"),
            "range_std": number(0, strict=True)("3.0"),
            "steps": whole(2, note="both ends of the range")("11"),
            "kl_images": POSITIVE("1000"),
        },
        "notebook.NotebookPictures": {"grid_size": whole(2)("10"), "num_images": POSITIVE("4")},
    }.items()
} | {"vaelab.training.budget.TrainingBudget": {"min_steps": whole(1, note="null: no warning", optional=True)("2000")}}
# The places any logger or callback writes to: never an empty string.
PATH_KEYS = ("save_dir", "dirpath", "image_dir")


def structured(name: str, tree: dict[str, Any]) -> type:
    """A dataclass for `tree` ({key: type, (type, default) or a subtree}), every value MISSING unless given. It is
    kept in this module under its name (one class per name: Paths serves all three commands), so that a config
    typed by it pickles, as a joblib sweep sends it to its workers."""
    if name not in globals():
        fields = []
        for key, kind in tree.items():
            kind = structured(key.title().replace("_", ""), kind) if isinstance(kind, dict) else kind
            fields.append((key, *(kind if isinstance(kind, tuple) else (kind, MISSING))))
        globals()[name] = make_dataclass(name, fields, namespace={"__module__": __name__})
    return globals()[name]


def schema(name: str, table: dict[str, Setting], groups: dict[str, Any]) -> type:
    """A command's structured config: a typed field for each key outside the config groups (a dotted key in a
    nested dataclass) and for each headline key; the groups open (Any), with their defaults."""
    tree: dict[str, Any] = {}
    for path, setting in table.items():
        *parents, leaf = path.split(".")
        if parents and parents[0] in groups:
            if setting.headline:
                tree.setdefault(setting.headline, setting.kind)
            continue
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = setting.kind
    return structured(name, {**tree, **{group: (Any, default) for group, default in groups.items()}})


TRAIN_GROUPS = {"data": MISSING, "model": MISSING, "trainer": MISSING, "logger": None, "callbacks": None}
for command, groups in (("train", TRAIN_GROUPS), ("eval", {"data": MISSING}), ("generate", {"data": MISSING})):
    ConfigStore.instance().store(name=f"{command}_schema", node=schema(command.title(), SETTINGS[command], groups))


def _checks(cfg: DictConfig, command: str):
    """(path, setting) for every setting of `command`, then for vaelab-train's callbacks and the paths its loggers and
    callbacks write to."""
    yield from SETTINGS[command].items()
    for group in ("callbacks", "logger") if command == "train" else ():
        for name, node in (cfg.get(group) or {}).items():
            if not isinstance(node, DictConfig):
                continue
            for key, setting in CALLBACKS.get(node.get("_target_"), {}).items() if group == "callbacks" else ():
                yield f"callbacks.{name}.{key}", setting
            for key in PATH_KEYS:
                if key in node and not OmegaConf.is_interpolation(node, key):  # e.g. ${paths.output_dir}: checked there
                    yield f"{group}.{name}.{key}", OPTIONAL_PATH


def check(cfg: DictConfig, command: str) -> None:
    """Raise UserError for the first setting outside what it allows (in the order of the declarations), or a
    combination that does not go together."""
    for path, setting in _checks(cfg, command):
        parent_path, _, leaf = path.rpartition(".")
        parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
        if not setting.checked or not isinstance(parent, DictConfig) or leaf not in parent.keys():  # `in` misses ???
            continue  # a part that does not have this setting (e.g. another trainer)
        # Named as the user would type it: the headline key while the nested value still reads it (`${latent_dim}`).
        reads = setting.headline and OmegaConf.to_container(parent, resolve=False)[leaf] == "${" + setting.headline + "}"
        key = setting.headline if reads else path
        example = f"e.g. {key}={setting.example}"
        if OmegaConf.is_missing(parent, leaf):
            raise UserError(f"{key} is required, {example}")
        try:
            value = OmegaConf.select(cfg, path, throw_on_missing=True)
        except OmegaConfBaseException as err:  # an interpolation to a key that does not exist, a missing value
            raise UserError(
                f"{key} cannot be read ({str(err).strip().splitlines()[0]}); it must be {setting.allowed}, {example}"
            ) from None
        value = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
        if not setting.check(value):
            raise UserError(f"{key}={show(value)} is not allowed: {key} must be {setting.allowed}, {example}")
    if command == "train":
        combinations.check(cfg)
        hardware.check_loggers(cfg)


def type_message(full_key: str, err: OmegaConfBaseException) -> str:
    """A structured config's type error at compose time, in the words of check()."""
    path = re.sub(r"\[\d+\]$", "", full_key)
    declared = {p: s for table in SETTINGS.values() for p, s in table.items()}
    setting = {s.headline: s for s in declared.values() if s.headline}.get(path) or declared.get(path)
    if setting is None or not setting.checked:
        return f"{full_key}: {str(err).strip().splitlines()[0]}"
    # The last time the key is given: Hydra applies the overrides in order, so that is the value it refuses.
    given = [a.split("=", 1)[1] for a in sys.argv[1:] if "=" in a and a.split("=", 1)[0].lstrip("+~") == path]
    found = re.search(r"Value '(.*)' of type", str(err))
    value = given[-1] if given else found.group(1) if found else "?"
    return f"{path}={value} is not allowed: {path} must be {setting.allowed}, e.g. {path}={setting.example}"


errors.TYPE_MESSAGE[:] = [type_message]


CHECKPOINT_HINT = "pass ckpt_path=<run dir>/checkpoints/last.ckpt (or best-epochNNN.ckpt) from a vaelab-train run"


def check_checkpoint_file(value: str) -> None:
    """The checkpoint ckpt_path names is a file (what it holds is checked when it is read: vaelab.runs.checkpoints)."""
    path = Path(value)
    if path.is_dir():
        inside = path / "checkpoints" / "last.ckpt"
        better = f"did you mean ckpt_path={inside}?" if inside.exists() else CHECKPOINT_HINT
        raise UserError(f"ckpt_path={value}: {path} is a directory, not a .ckpt file; {better}")
    if not path.exists():
        raise UserError(f"checkpoint {value} not found; {CHECKPOINT_HINT}")
