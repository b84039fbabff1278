"""`python -m vaelab train|eval|generate [settings]`: the console scripts, for an environment without them on PATH."""

import sys

from vaelab.commands import cli

COMMANDS = {"train": cli.train, "eval": cli.evaluate, "generate": cli.generate}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(
            f"usage: python -m vaelab {{{'|'.join(COMMANDS)}}} [key=value ...]  (the same as vaelab-train, -eval, -generate)"
        )
    command = sys.argv.pop(1)
    sys.argv[0] = f"vaelab-{command}"
    COMMANDS[command]()
