"""The console scripts: `vaelab-train`, `vaelab-eval` and `vaelab-generate` (Hydra applications), and `vaelab-resume`.

Each enters `exit_cleanly` before anything heavy is imported (this module imports only vaelab.errors): the signal
policy is in place, and a bad setting, a Hydra composition error or a stop during start-up ends in one line.
"""

from __future__ import annotations

from vaelab.errors import UserError, exit_cleanly, held, quiet

RESUME_EXAMPLE = """examples:
  vaelab-resume outputs/2026-11-24/14-11-09             continue an interrupted run where it stopped
  vaelab-resume outputs/2026-11-24/14-11-09 epochs=20   ... or train a finished one further

It continues the run in place, from its newest checkpoint, with its own saved settings and the ones given (the
config groups it was built from, e.g. model=conv, cannot change)."""


def _run(prog: str, module: str, config_name: str) -> None:
    with exit_cleanly(prog):
        from importlib import import_module

        quiet()

        import hydra
        from omegaconf.errors import OmegaConfBaseException

        import vaelab.runs.settings  # noqa: F401  registers the schemas and resolvers the configs use
        from vaelab import CONF_DIR
        from vaelab.errors import message_for, one_line

        started = []

        def task(cfg):  # the command's module (torch, Lightning) is imported once the settings have passed
            from vaelab.runs.sweep import run_job

            started.append(True)
            return run_job(prog, cfg, lambda: command().hydra_task(cfg))

        def command():
            with held():  # a Ctrl-C inside torch's C++ import would abort the process
                return import_module(module)

        try:
            hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(task)()
        except (ValueError, OmegaConfBaseException) as err:  # Hydra's own flags used in a way it refuses
            if started or message_for(err) is not None:
                raise
            raise UserError(
                f"{one_line(err)}; `{prog} --hydra-help` lists Hydra's flags, `{prog} --cfg all --resolve` prints every "
                "setting resolved"
            ) from None


def train() -> None:
    _run("vaelab-train", "vaelab.commands.train", "train")


def evaluate() -> None:
    _run("vaelab-eval", "vaelab.commands.evaluate", "eval")


def generate() -> None:
    _run("vaelab-generate", "vaelab.commands.generate", "generate")


def resume() -> None:
    """`vaelab-resume RUN_DIR [key=value ...]`: the run's saved config, not conf/, is what the settings change, so
    Hydra's command line is not involved (the overrides are read by Hydra's parser: vaelab.runs.resume.resumed)."""
    with exit_cleanly("vaelab-resume"):
        import argparse

        class Parser(argparse.ArgumentParser):
            def error(self, message: str):  # one line, like every other refusal
                raise UserError(f"{message}; `vaelab-resume --help` shows how to use it")

        parser = Parser(
            prog="vaelab-resume",
            description="Continue a vaelab-train run in its own directory.",
            epilog=RESUME_EXAMPLE,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory, e.g. outputs/<date>/<time>")
        parser.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="settings to change, e.g. epochs=20")
        args, flags = parser.parse_known_args()
        if flags:
            raise UserError(
                f"{args.run_dir} cannot be combined with {flags[0]}: it continues one run, in its own directory, with "
                "its own saved config and the settings given (key=value)"
            )
        quiet()
        with held():  # as in _run
            from vaelab.commands.train import resume as continue_run

        continue_run(args.run_dir, args.overrides)
