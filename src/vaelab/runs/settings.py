"""The settings of each command, checked before any work starts.

Types come from Hydra's structured configs: the dataclasses below are the first entry of each command's
defaults list, so `seed=abc` or `lr=fast` is refused while Hydra composes, before our code runs. The config
groups (data, model, trainer, ...) stay open, so a user's own configs can add keys; what their values must be
(a positive integer, a number in [0, 1], one of a few names), and the ranges of the typed keys, are in RULES,
checked by `check(cfg, command)`: one line naming the key as the user typed it, the value, what is allowed and
an example. Importing this module registers the schemas and vaelab's resolvers; only hydra and omegaconf
are imported.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vaelab import errors
from vaelab.errors import UserError, show
from vaelab.runs import hardware  # noqa: F401  registers the resolvers the configs use


@dataclass
class Paths:
    root_dir: str = MISSING
    data_dir: str = MISSING
    log_dir: str = MISSING
    output_dir: Optional[str] = MISSING  # null until a run starts (Hydra's runtime.output_dir): --cfg job --resolve


@dataclass
class Command:
    """What every command has: where things go, the data, and whether an existing run may be written over."""

    paths: Paths = MISSING
    data: Any = MISSING
    seed: int = MISSING
    overwrite: bool = MISSING


@dataclass
class Train(Command):
    latent_dim: int = MISSING
    epochs: int = MISSING
    noise_factor: float = MISSING
    denoise: bool = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    beta: float = MISSING
    threads: Optional[int] = MISSING
    ckpt_path: Optional[str] = MISSING
    resume_from: Optional[str] = MISSING
    test_after_fit: bool = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None


@dataclass
class Inspect(Command):
    """What vaelab-eval and vaelab-generate share: a checkpoint to read, the device, the networks a user trusts."""

    ckpt_path: str = MISSING
    device: str = MISSING
    allow_networks: list[str] = field(default_factory=list)
    batch_size: int = MISSING


@dataclass
class LinearProbe:
    enabled: bool = MISSING
    train_images: Optional[int] = MISSING
    max_iter: int = MISSING
    weight_decay: float = MISSING


@dataclass
class Frechet:
    enabled: bool = MISSING
    num_samples: int = MISSING


@dataclass
class ClassifierSettings:
    epochs: int = MISSING
    seed: int = MISSING
    train_images: Optional[int] = MISSING
    cache_dir: Optional[str] = MISSING


@dataclass
class Eval(Inspect):
    num_importance_samples: Optional[int] = MISSING
    pairs_per_pass: int = MISSING
    num_images: Optional[int] = MISSING
    noise_levels: list[float] = MISSING
    active_unit_threshold: float = MISSING
    linear_probe: LinearProbe = MISSING
    frechet: Frechet = MISSING
    classifier: ClassifierSettings = MISSING


@dataclass
class Generate(Inspect):
    num_samples: int = MISSING
    nrow: Optional[int] = MISSING
    temperature: float = MISSING
    interpolate: bool = MISSING
    num_pairs: int = MISSING
    num_steps: int = MISSING
    label: Optional[str] = None  # a class name or index (an integer as typed, e.g. label=7, becomes "7")


store = ConfigStore.instance()
for name, node in (("train_schema", Train), ("eval_schema", Eval), ("generate_schema", Generate)):
    store.store(name=name, node=node)


# --- range checks -------------------------------------------------------------------------------------------


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Rule:
    check: Callable[[Any], bool]
    allowed: str  # in words
    example: str  # a good value, as typed


POSITIVE_INT = Rule(lambda v: _int(v) and v > 0, "a positive integer", "1")
OPTIONAL_POSITIVE_INT = Rule(lambda v: v is None or (_int(v) and v > 0), "a positive integer or null", "null")
INTEGER = Rule(_int, "an integer", "0")
BOOL = Rule(lambda v: isinstance(v, bool), "true or false", "false")
STRING = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string", "...")


def at_least(low: float, example: str, strict: bool = False) -> Rule:
    sign = ">" if strict else ">="
    return Rule(lambda v: _number(v) and (v > low if strict else v >= low), f"a number {sign} {low:g}", example)


def one_of(*names: str) -> Rule:
    return Rule(lambda v: v in names, f"one of {', '.join(names)}", names[0])


def between(low: float, high: float, example: str) -> Rule:
    return Rule(lambda v: _number(v) and low <= v <= high, f"a number in [{low:g}, {high:g}]", example)


def like(rule: Rule, example: str) -> Rule:
    return Rule(rule.check, rule.allowed, example)


EVERY_N_EPOCHS = like(POSITIVE_INT, "1")
DEVICE = Rule(
    lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
    "auto, cpu, cuda, cuda:<index> or mps",
    "auto",
)
LIMIT = Rule(
    lambda v: v is None or (_int(v) and v >= 0) or (_number(v) and 0 <= v <= 1),
    "null, a number of batches (an integer >= 0) or a fraction in [0, 1]",
    "null",
)

# A path given as an empty string would mean the working directory: refused wherever vaelab reads or writes a path.
OPTIONAL_PATH = Rule(lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "a path or null", "null")
NETWORK_NAMES = Rule(
    lambda v: (
        isinstance(v, (list, ListConfig))
        and all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", n) for n in v)
    ),
    "a list of dotted module or class names",
    "[mypkg.nets]",
)

PRIORS = ("standard", "vamp", "mog")  # conf/model/prior/<name>.yaml (vaelab.model.priors)
LOGVAR_RANGE = Rule(
    lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v) and v[0] < v[1]),
    "null or [low, high] with low < high",
    "[-6,2]",
)

INSPECT_BINARIZE = Rule(
    lambda v: v in (None, "none", "dynamic", "static"),
    "null (as the checkpoint's model was trained), none, dynamic or static",
    "null",
)

# Where each value finally lives -> (the headline key of conf/train.yaml the groups read it through, or None; rule)
DATA_RULES: dict[str, tuple[str | None, Rule]] = {
    "data.dataset": (None, like(STRING, "CIFAR10")),
    "data.batch_size": ("batch_size", like(POSITIVE_INT, "128")),
    "data.eval_batch_size": (None, like(POSITIVE_INT, "1000")),
    "data.val_size": (None, Rule(lambda v: _int(v) and 0 < v < 60000, "an integer between 1 and 59999", "5000")),
    "data.split_seed": (None, INTEGER),
    "data.seed": ("seed", like(INTEGER, "42")),
    "data.download": (None, BOOL),
    "data.binarize": (None, one_of("none", "dynamic", "static")),
    # data=image_folder (vaelab.data.image_folder.ImageFolder); before data.image_shape, which follows channels and image_size
    "data.path": (None, like(STRING, "path/to/images")),
    "data.channels": (None, Rule(lambda v: _int(v) and v in (1, 3), "1 (grey) or 3 (RGB)", "3")),
    "data.image_size": (None, like(OPTIONAL_POSITIVE_INT, "32")),
    "data.crop": (None, like(BOOL, "true")),
    "data.val_fraction": (None, Rule(lambda v: _number(v) and 0 <= v < 1, "a fraction in [0, 1)", "0.1")),
    "data.test_fraction": (None, Rule(lambda v: _number(v) and 0 <= v < 1, "a fraction in [0, 1)", "0.1")),
    "data.workers": (None, like(OPTIONAL_POSITIVE_INT, "4")),
    "data.cache_dir": (None, like(OPTIONAL_PATH, "null")),
    "data.data_dir": (None, like(STRING, "data")),
    "data.system_dir": (None, like(OPTIONAL_PATH, "null")),
    "data.image_shape": (
        None,
        Rule(
            lambda v: isinstance(v, (list, ListConfig)) and len(v) == 3 and all(_int(d) and d > 0 for d in v),
            "three positive integers [channels, height, width]",
            "[1,28,28]",
        ),
    ),
}
RULES: dict[str, dict[str, tuple[str | None, Rule]]] = {
    "train": {
        "model.latent_dim": ("latent_dim", like(POSITIVE_INT, "16")),
        "trainer.max_epochs": ("epochs", like(POSITIVE_INT, "10")),
        "model.noise_factor": ("noise_factor", between(0, 1, "0.1")),
        "model.optimizer.lr": ("lr", at_least(0, "1e-3", strict=True)),
        "model.beta": ("beta", at_least(0, "1.0")),
        "model.epsilon_std": (None, at_least(0, "1.0", strict=True)),
        "model.objective": (None, one_of("elbo", "iwae", "notebook")),
        "model.likelihood": (None, one_of("bernoulli", "continuous_bernoulli", "discretized_logistic", "gaussian")),
        "model.kl_warmup_epochs": (None, Rule(lambda v: _int(v) and v >= 0, "an integer >= 0 (0: no warm-up)", "100")),
        "model.free_bits": (None, at_least(0, "0.5")),
        "model.num_samples": (None, like(POSITIVE_INT, "5")),
        "model.eval_iwae_samples": (None, like(POSITIVE_INT, "10")),
        "model.val_iwae_every_n_epochs": (None, Rule(lambda v: _int(v) and v >= 0, "an integer >= 0 (0: never)", "50")),
        "model.denoise": ("denoise", BOOL),
        "model.conditional": (None, BOOL),
        "model.prior.name": (None, one_of(*PRIORS)),
        "model.prior.components": (None, like(POSITIVE_INT, "500")),
        "model.prior.pseudo_input_mean": (None, between(0, 1, "0.05")),
        "model.prior.pseudo_input_std": (None, at_least(0, "0.01")),
        "model.encoder.gated": (None, like(BOOL, "true")),
        "model.decoder.gated": (None, like(BOOL, "true")),
        "model.encoder.logvar_range": (None, LOGVAR_RANGE),
        "model.encoder.init": (None, like(one_of("default", "he"), "he")),
        "model.decoder.init": (None, like(one_of("default", "he"), "he")),
        "seed": (None, like(INTEGER, "42")),
        "overwrite": (None, BOOL),
        "ckpt_path": (None, like(OPTIONAL_PATH, "outputs/<date>/<time>/checkpoints/last.ckpt")),
        "resume_from": (None, like(OPTIONAL_PATH, "outputs/<date>/<time>")),
        "threads": (None, OPTIONAL_POSITIVE_INT),
        "test_after_fit": (None, BOOL),
        "trainer.log_every_n_steps": (None, like(POSITIVE_INT, "50")),
        "trainer.num_sanity_val_steps": (None, Rule(lambda v: _int(v) and v >= -1, "an integer >= -1", "2")),
        "trainer.max_steps": (None, Rule(lambda v: _int(v) and v >= -1, "an integer >= -1 (-1: no limit)", "-1")),
        "trainer.gradient_clip_val": (None, Rule(lambda v: v is None or (_number(v) and v >= 0), "null or a number >= 0", "1.0")),
        "trainer.limit_train_batches": (None, LIMIT),
        "trainer.limit_val_batches": (None, LIMIT),
        "trainer.limit_test_batches": (None, LIMIT),
        "trainer.accelerator": (None, one_of("cpu", "gpu", "cuda", "mps", "auto")),
        **DATA_RULES,
    },
    "eval": {
        "ckpt_path": (None, like(STRING, "outputs/<date>/<time>/checkpoints/last.ckpt")),
        "device": (None, DEVICE),
        "allow_networks": (None, NETWORK_NAMES),
        "overwrite": (None, BOOL),
        "num_importance_samples": (None, like(OPTIONAL_POSITIVE_INT, "100")),
        "pairs_per_pass": (None, like(POSITIVE_INT, "20000")),
        "batch_size": (None, like(POSITIVE_INT, "1000")),
        "num_images": (None, like(OPTIONAL_POSITIVE_INT, "1000")),
        "noise_levels": (
            None,
            Rule(
                lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(_number(x) and x >= 0 for x in v),
                "a non-empty list of noise standard deviations >= 0",
                "[0,0.1,0.3]",
            ),
        ),
        "active_unit_threshold": (None, at_least(0, "0.01")),
        "seed": (None, INTEGER),
        "linear_probe.enabled": (None, BOOL),
        "linear_probe.train_images": (
            None,
            Rule(lambda v: v is None or (_int(v) and v >= 2), "an integer >= 2 or null (all training images)", "10000"),
        ),
        "linear_probe.max_iter": (None, like(POSITIVE_INT, "100")),
        "linear_probe.weight_decay": (None, at_least(0, "1e-4")),
        "frechet.enabled": (None, BOOL),
        "frechet.num_samples": (
            None,
            Rule(lambda v: _int(v) and v >= 2, "an integer >= 2 (a covariance needs two images)", "10000"),
        ),
        "classifier.epochs": (None, like(POSITIVE_INT, "3")),
        "classifier.seed": (None, INTEGER),
        "classifier.train_images": (
            None,
            Rule(lambda v: v is None or (_int(v) and v >= 2), "an integer >= 2 or null (the whole training split)", "null"),
        ),
        "classifier.cache_dir": (None, Rule(lambda v: v is None or (isinstance(v, str) and v != ""), "a folder or null", "null")),
        **DATA_RULES,
        "data.binarize": (None, INSPECT_BINARIZE),
    },
    "generate": {
        "ckpt_path": (None, like(STRING, "outputs/<date>/<time>/checkpoints/last.ckpt")),
        "device": (None, DEVICE),
        "allow_networks": (None, NETWORK_NAMES),
        "overwrite": (None, BOOL),
        "num_samples": (None, like(POSITIVE_INT, "64")),
        "nrow": (None, like(OPTIONAL_POSITIVE_INT, "8")),
        "temperature": (None, at_least(0, "0.8", strict=True)),
        "interpolate": (None, BOOL),
        "num_pairs": (
            None,
            Rule(lambda v: _int(v) and 0 < v <= 5000, "an integer between 1 and 5000 (pairs of the 10,000 test images)", "8"),
        ),
        "num_steps": (None, Rule(lambda v: _int(v) and v >= 2, "an integer >= 2 (both ends of each row)", "10")),
        "label": (
            None,
            Rule(lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "a class name, an index or null", "Sandal"),
        ),
        "batch_size": (None, like(POSITIVE_INT, "256")),
        "seed": (None, INTEGER),
        **DATA_RULES,
        "data.binarize": (None, INSPECT_BINARIZE),
    },
}

# The settings of vaelab's own callbacks (conf/callbacks/<name>.yaml), checked wherever the callback is configured.
CALLBACK_RULES: dict[str, dict[str, Rule]] = {
    "vaelab.pictures.grids.Reconstructions": {"num_images": like(POSITIVE_INT, "16")},
    "vaelab.pictures.grids.NoisyReconstructions": {
        "num_images": like(POSITIVE_INT, "16"),
        "noise_factor": at_least(0, "0.1"),
    },
    "vaelab.pictures.grids.Interpolation": {
        "num_pairs": like(POSITIVE_INT, "8"),
        "steps": Rule(lambda v: _int(v) and v >= 2, "an integer >= 2 (the two ends)", "10"),
        "method": one_of("linear", "spherical"),
    },
    "vaelab.pictures.grids.Samples": {
        "num_samples": like(POSITIVE_INT, "64"),
        "ncols": like(POSITIVE_INT, "8"),
        "temperature": at_least(0, "1.0", strict=True),
    },
    "vaelab.pictures.latent_maps.LatentMap": {
        "grid_size": Rule(lambda v: _int(v) and v >= 2, "an integer >= 2", "20"),
        "quantile_range": Rule(
            lambda v: isinstance(v, (list, ListConfig)) and len(v) == 2 and all(_number(x) for x in v) and 0 < v[0] < v[1] < 1,
            "[low, high] with 0 < low < high < 1",
            "[0.05,0.95]",
        ),
        "num_points": like(POSITIVE_INT, "2000"),
    },
    "vaelab.pictures.latent_maps.Traversals": {
        "num_units": like(POSITIVE_INT, "8"),
        "range_std": at_least(0, "3.0", strict=True),
        "steps": Rule(lambda v: _int(v) and v >= 2, "an integer >= 2 (both ends of the range)", "11"),
        "kl_images": like(POSITIVE_INT, "1000"),
    },
    "vaelab.pictures.notebook.NotebookPictures": {
        "grid_size": Rule(lambda v: _int(v) and v >= 2, "an integer >= 2", "10"),
        "num_images": like(POSITIVE_INT, "4"),
    },
}
PICTURE_RULES = {"every_n_epochs": EVERY_N_EPOCHS, "seed": INTEGER}
# The places any logger or callback writes to, and the paths every command builds on: never an empty string.
PATH_KEYS = ("save_dir", "dirpath", "image_dir")
PATHS_RULES = {f"paths.{key}": (None, like(STRING, "outputs")) for key in ("root_dir", "data_dir", "log_dir")}


def user_key(cfg: DictConfig, path: str, headline: str | None) -> str:
    """The key the user would type: the headline key while the nested value still reads it (`${headline}`)."""
    if headline is None:
        return path
    parent_path, _, leaf = path.rpartition(".")
    parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    if (
        isinstance(parent, DictConfig)
        and leaf in parent
        and OmegaConf.to_container(parent, resolve=False).get(leaf) == "${" + headline + "}"
    ):
        return headline
    return path


def refuse(key: str, value: Any, rule: Rule) -> UserError:
    return UserError(f"{key}={show(value)} is not allowed: {key} must be {rule.allowed}, e.g. {key}={rule.example}")


def _checks(cfg: DictConfig, command: str):
    """(path, headline, rule) for every setting of `command` that is in this config."""
    for path, (headline, rule) in {**PATHS_RULES, **RULES[command]}.items():
        yield path, headline, rule
    callbacks = cfg.get("callbacks") if command == "train" else None
    for name, node in (callbacks or {}).items():
        if isinstance(node, DictConfig) and node.get("_target_") in CALLBACK_RULES:
            for key, rule in {**CALLBACK_RULES[node._target_], **PICTURE_RULES}.items():
                yield f"callbacks.{name}.{key}", None, rule
    for group in ("logger", "callbacks") if command == "train" else ():
        for name, node in (cfg.get(group) or {}).items():
            for key in PATH_KEYS if isinstance(node, DictConfig) else ():
                if key in node and OmegaConf.is_interpolation(node, key):
                    continue  # e.g. ${paths.output_dir}: checked where it points (not known before Hydra's run starts)
                yield f"{group}.{name}.{key}", None, like(OPTIONAL_PATH, "null")


def check_combinations(cfg: DictConfig) -> None:
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
            f"({', '.join(PRIORS)}), e.g. model/prior=vamp"
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


# The loggers that need a package vaelab does not install by itself: the class -> (what it is called, the
# distributions that provide it, the pyproject extra that installs it).
LOGGER_EXTRAS = {
    "MLFlowLogger": ("MLflow", ("mlflow", "mlflow-skinny"), "mlflow"),
    "WandbLogger": ("Weights & Biases (wandb)", ("wandb",), "wandb"),
}


def check_loggers(cfg: DictConfig) -> None:
    """Every logger's package is installed (read from the installed distributions: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> bool:
        try:
            return bool(version(name))
        except PackageNotFoundError:
            return False

    for name, node in (cfg.get("logger") or {}).items():
        target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
        needs = LOGGER_EXTRAS.get(target.rpartition(".")[2])
        if needs and not any(installed(dist) for dist in needs[1]):
            raise UserError(
                f"logger.{name} ({target}) needs {needs[0]}, which is not installed: pip install 'vaelab[{needs[2]}]' "
                f"(or choose loggers without it, e.g. logger=tensorboard)"
            )


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


def check(cfg: DictConfig, command: str) -> None:
    """Raise UserError for the first setting outside what it allows (in the order of RULES), or a combination
    that does not go together."""
    for path, headline, rule in _checks(cfg, command):
        parent_path, _, leaf = path.rpartition(".")
        parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent.keys():  # `in` alone misses ??? values
            continue  # a part that does not have this setting (e.g. another trainer)
        key = user_key(cfg, path, headline)
        if OmegaConf.is_missing(parent, leaf):
            raise UserError(f"{key} is required, e.g. {key}={rule.example}")
        try:
            value = OmegaConf.select(cfg, path, throw_on_missing=True)
        except OmegaConfBaseException as err:  # an interpolation to a key that does not exist, a missing value
            raise UserError(
                f"{key} cannot be read ({str(err).strip().splitlines()[0]}); it must be {rule.allowed}, e.g. {key}={rule.example}"
            ) from None
        if isinstance(value, ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.check(value):
            raise refuse(key, value, rule)
    if command == "train":
        check_combinations(cfg)
        check_loggers(cfg)


def type_message(full_key: str, err: OmegaConfBaseException) -> str:
    """A structured config's type error at compose time, in the words of check()."""
    path = re.sub(r"\[\d+\]$", "", full_key)
    rules = {p: r for command in RULES.values() for p, r in command.items()}
    by_headline = {h: (p, r) for p, (h, r) in rules.items() if h}
    if path in by_headline:
        rule = by_headline[path][1]
    elif path in rules:
        rule = rules[path][1]
    else:
        return f"{full_key}: {str(err).strip().splitlines()[0]}"
    # The last time the key is given: Hydra applies the overrides in order, so that is the value it refuses.
    given = [a.split("=", 1)[1] for a in sys.argv[1:] if "=" in a and a.split("=", 1)[0].lstrip("+~") == path]
    typed = given[-1] if given else None
    found = re.search(r"Value '(.*)' of type", str(err))
    value = typed if typed is not None else found.group(1) if found else "?"
    return f"{path}={value} is not allowed: {path} must be {rule.allowed}, e.g. {path}={rule.example}"


errors.TYPE_MESSAGE[:] = [type_message]
