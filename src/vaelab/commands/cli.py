"""The console scripts `vaelab-train`, `vaelab-eval` and `vaelab-generate`.

Each enters `exit_cleanly` before anything heavy is imported (this module imports only vaelab.errors), so a
bad setting, a Hydra composition error or a Ctrl-C during start-up ends in one line, like any other error.
"""

from __future__ import annotations

import sys

from vaelab.errors import UserError, exit_cleanly, quiet_threads


def _quiet() -> None:
    import logging

    logging.captureWarnings(True)  # library warnings go to the run's log (and stdout); stderr is for errors
    quiet_threads()


def _run(prog: str, module: str, config_name: str) -> None:
    with exit_cleanly(prog):
        from importlib import import_module

        _quiet()

        import hydra
        from omegaconf.errors import OmegaConfBaseException

        import vaelab.runs.settings  # noqa: F401  registers the schemas and resolvers the configs use
        from vaelab import CONF_DIR
        from vaelab.errors import message_for, one_line

        started = []

        def task(cfg):  # the command's module (torch, Lightning) is imported once the settings have passed
            started.append(True)
            with exit_cleanly(prog):  # here too: Hydra adds a line of its own for a task that raises
                command = import_module(module)
            return command.hydra_task(cfg)

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
    """`resume_from=<run dir> [settings]` is its own plain path (vaelab.commands.train.resume): the run's saved config, not
    conf/, is what the settings change, so Hydra's command line is not involved."""
    args = sys.argv[1:]
    given = [a for a in args if a.split("=", 1)[0] == "resume_from"]
    value = given[-1].split("=", 1)[1].strip("'\"") if given else ""
    if value in ("", "null"):
        return _run("vaelab-train", "vaelab.commands.train", "train")
    with exit_cleanly("vaelab-train"):
        flags = [a for a in args if a.startswith("-")]
        if flags:
            raise UserError(
                f"resume_from={value} cannot be combined with {flags[0]}: it continues one run, in its own "
                f"directory, with its own saved config and the settings given (key=value)"
            )
        conflict = next((a for a in args if a.split("=", 1)[0] in ("hydra.run.dir", "ckpt_path")), None)
        if conflict:
            raise UserError(
                f"resume_from={value} cannot be combined with {conflict}: it continues that run in its own "
                f"directory from its own newest checkpoint"
            )
        _quiet()
        from vaelab.commands.train import resume

        resume(value, [a for a in args if a.split("=", 1)[0] != "resume_from"])


def evaluate() -> None:
    _run("vaelab-eval", "vaelab.commands.evaluate", "eval")


def generate() -> None:
    _run("vaelab-generate", "vaelab.commands.generate", "generate")
