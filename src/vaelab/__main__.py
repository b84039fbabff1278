"""`python -m vaelab train|eval|generate|resume ...`: the console scripts, for an environment without them on PATH."""

import sys

from vaelab.commands import cli

COMMANDS = {"train": cli.train, "eval": cli.evaluate, "generate": cli.generate, "resume": cli.resume}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m vaelab {{{'|'.join(COMMANDS)}}} ...  (the same as vaelab-train, -eval, -generate, -resume)")
    command = sys.argv.pop(1)
    sys.argv[0] = f"vaelab-{command}"
    COMMANDS[command]()
