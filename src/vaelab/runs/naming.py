"""Sweep jobs named by the settings that vary: `0_latent_dim=2`, not `0_epochs=1,latent_dim=2,threads=1,...`.

A job's directory (hydra.sweep.subdir), and so its TensorBoard run, HPARAMS trial id and MLflow run name, is built
from hydra.job.override_dirname: the job's overrides less hydra.job.config.override_dirname.exclude_keys. At the start
of a multirun, SweepNaming adds every fixed setting of the command line to those keys. A setting varies when its last
value, from the sweeper's params (hydra.sweeper.params: Optuna's search space, or the basic sweeper's) and then the
command line, is a sweep (`latent_dim=2,16`, `range(...)`, `choice(...)`, `interval(...)`): Hydra's own test,
Override.is_sweep_override(). Each job recomposes its config from the sweep's Hydra overrides, whichever launcher
runs it (in this process, a joblib worker, a SLURM job), so the keys travel as one more of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"
SUBDIR = "hydra.sweep.subdir"


def split_keys(params: Mapping[str, Any] | None, overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """(varying, fixed): the keys of the settings swept and of those given one value (as override_dirname compares
    them), in the order given: the sweeper's params first, then the command line's overrides, whose word is the last."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [f"{key}={value}" for key, value in (params or {}).items()] + list(overrides)
    sweeps: dict[str, bool] = {}
    for override in OverridesParser.create().parse_overrides(given):
        sweeps.pop(override.key_or_group, None)  # the last word, in its own place
        sweeps[override.key_or_group] = override.is_sweep_override()
    return [key for key, sweep in sweeps.items() if sweep], [key for key, sweep in sweeps.items() if not sweep]


def _quoted(key: str) -> str:
    return "'" + key.replace("\\", "\\\\").replace("'", "\\'") + "'"


class SweepNaming(Callback):
    """Hydra callback: before a multirun's first job, the fixed settings join override_dirname's exclude_keys, so each
    job is named by the settings that vary; with none varying, the jobs are named by their number alone."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = OmegaConf.select(config, "hydra.sweeper.params")
        params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else None
        task, hydra = (OmegaConf.to_container(config.hydra.overrides[kind], resolve=False) for kind in ("task", "hydra"))
        varying, fixed = split_keys(params, task)
        excluded = list(OmegaConf.select(config, EXCLUDE_KEYS) or [])
        keys = excluded + [key for key in fixed if key not in excluded]
        added = [f"{EXCLUDE_KEYS}=[{','.join(map(_quoted, keys))}]"]
        if not set(varying) - set(keys) and not any(o.startswith(f"{SUBDIR}=") for o in hydra):
            added.append(SUBDIR + "=${hydra.job.num}")  # `0`, not `0_`
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.job.config.override_dirname.exclude_keys = keys  # as each job will have it (multirun.yaml)
            config.hydra.overrides.hydra.extend(added)  # what each job's config is recomposed from
