"""Sweep jobs named by the settings that vary (vaelab.runs.naming.SweepNaming), in-process: the multirun config composed
as `vaelab-train -m` composes it, the callback, then each job's config recomposed by Hydra's own load_sweep_config from
the overrides its sweeper makes (what the basic and joblib launchers, and Optuna's trials through them, all do). A real
sweep's directories: tests/commands/test_loggers.py."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import DATA_DIR, REPO


@pytest.fixture
def sweep_jobs(tmp_path):
    """sweep_jobs(task overrides, jobs' overrides or None for the basic sweeper's) -> [(override_dirname, subdir)]."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    import vaelab.runs.settings  # noqa: F401  the schemas and resolvers, as vaelab-train registers them
    from vaelab.runs.naming import SweepNaming

    def jobs(task: list[str], made: list[list[str]] | None = None) -> list[tuple[str, str]]:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            hydra = GlobalHydra.instance().hydra
            paths = [f"paths.root_dir={tmp_path}", f"paths.data_dir={DATA_DIR}"]
            cfg = hydra.compose_config(
                "train", overrides=[*paths, *task], run_mode=RunMode.MULTIRUN, with_log_configuration=False
            )
            SweepNaming().on_multirun_start(cfg)
            if made is None:
                [made] = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides([*paths, *task]), None)
            named = []
            for num, overrides in enumerate(made):
                job = hydra.config_loader.load_sweep_config(cfg, list(overrides))
                job.hydra.job.num = num
                named.append((job.hydra.job.override_dirname, OmegaConf.select(job, "hydra.sweep.subdir")))
            return named

    return jobs


FIXED = ["epochs=1", "threads=1", "trainer.limit_train_batches=50", "~callbacks.progress_bar", "+callbacks.extra.verbose=false"]


def test_basic_and_joblib_jobs_are_named_by_the_settings_that_vary(sweep_jobs):
    """Two settings swept (a one-value range is a sweep too) among fixed ones: the names hold the swept ones only,
    sorted as override_dirname sorts them."""
    assert sweep_jobs(["latent_dim=2,16", *FIXED, "noise_factor=range(0.1,0.3,0.2)", "model=dense"]) == [
        ("latent_dim=2,noise_factor=0.1", "0_latent_dim=2,noise_factor=0.1"),
        ("latent_dim=16,noise_factor=0.1", "1_latent_dim=16,noise_factor=0.1"),
    ]


def test_a_sweep_with_nothing_varying_names_its_jobs_by_number(sweep_jobs):
    assert sweep_jobs(FIXED) == [("", "0")]
    assert sweep_jobs([*FIXED, "hydra.sweep.subdir=job${hydra.job.num}"]) == [("", "job0")]  # a subdir given is kept


def test_optuna_trials_are_named_by_the_searched_settings(sweep_jobs):
    """hparams_search=optuna searches latent_dim, lr and beta (its hydra.sweeper.params); a value given on the command
    line fixes one, a sweep given there replaces the search's. Each trial's overrides, as the Optuna sweeper makes
    them: every searched setting's drawn value, then every fixed one."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    task = ["hparams_search=optuna", *FIXED, "latent_dim=256", "lr=choice(1e-3,1e6)"]
    params = ["latent_dim=choice(2, 4)", "lr=tag(log, interval(1e-4, 3e-2))", "beta=interval(0.25, 2.0)"]
    _, fixed = create_params_from_overrides([*params, *task[1:]])  # a value given fixes a setting (Optuna's rule)
    trial = [f"{key}={value}" for key, value in {"lr": 0.001, "beta": 0.5, **fixed}.items()]
    assert sweep_jobs(task, [trial]) == [("beta=0.5,lr=0.001", "0_beta=0.5,lr=0.001")]


def test_the_varying_keys_are_hydras_sweeps_and_the_last_word_wins():
    from vaelab.runs.naming import split_keys

    assert split_keys(None, ["epochs=1", "latent_dim=2,16", "~callbacks.progress_bar", "+a.b=1", "model=glob(*)"]) == (
        ["latent_dim", "model"],
        ["epochs", "callbacks.progress_bar", "a.b"],
    )
    params = {"latent_dim": "choice(2, 4)", "lr": "tag(log, interval(1e-4, 3e-2))", "beta": "interval(0.25, 2.0)"}
    assert split_keys(params, ["latent_dim=256", "beta=interval(0.5,1)"]) == (["lr", "beta"], ["latent_dim"])
