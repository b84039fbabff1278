"""The redesign's budgets, read from the source: lines of the package, the run plumbing's share of them (runs/,
commands/, errors.py, and at 4c48284 the flat modules that held the same concerns), modules over 400 lines,
functions over 50 lines, import circles (tests/test_import_contract.py checks those).

    python benchmarks/code_budget.py [src/vaelab]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# The plumbing: what the issue counts as run plumbing (errors, schema, rundir, checkpoints, guards, sweep,
# hardware, cli before the redesign; runs/, commands/ and errors.py after it).
FLAT_PLUMBING = {
    "errors",
    "schema",
    "rundir",
    "checkpoints",
    "guards",
    "sweep",
    "hardware",
    "cli",
    "train",
    "evaluate",
    "generate",
}


def is_plumbing(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return parts[0] in ("runs", "commands") or path.stem in FLAT_PLUMBING and len(parts) == 1


def long_functions(tree: ast.AST, limit: int = 50) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append((node.name, length))
    return found


def main(root: Path) -> None:
    total = plumbing = 0
    big_modules, big_functions = [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        total += lines
        plumbing += lines if is_plumbing(path, root) else 0
        name = str(path.relative_to(root))
        if lines > 400:
            big_modules.append((name, lines))
        big_functions += [(f"{name}:{fn}", n) for fn, n in long_functions(ast.parse(text))]
    print(f"package lines: {total}")
    print(f"plumbing lines: {plumbing} ({100 * plumbing / total:.0f}%)")
    print(f"modules over 400 lines: {len(big_modules)} {big_modules}")
    print(f"functions over 50 lines: {len(big_functions)} {sorted(big_functions, key=lambda kv: -kv[1])}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "src" / "vaelab"))
