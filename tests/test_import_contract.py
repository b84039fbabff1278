"""The package's import contract, read from the source (every import, function-level ones included):

- the core (model, data, pictures, evaluation, training) never imports the run plumbing (runs) or the commands;
- vaelab.model is plain PyTorch: no Lightning, no Hydra, no OmegaConf;
- vaelab-eval and vaelab-generate never import Lightning;
- no import circles anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vaelab

PACKAGE = Path(vaelab.__file__).parent
CORE = ("model", "data", "pictures", "evaluation", "training")
PLUMBING = ("runs", "commands")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from vaelab.runs import settings`
    return found


MODULES = {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def vaelab_imports(name: str) -> set[str]:
    return {target for target in MODULES[name] if target in MODULES and target != name}


def test_the_contract_reads_the_whole_package():
    assert {"vaelab.model.vae", "vaelab.training.module", "vaelab.runs.settings", "vaelab.commands.cli"} <= set(MODULES)
    assert "vaelab.model.likelihoods" in vaelab_imports("vaelab.model.vae")  # the reader sees real imports


@pytest.mark.parametrize("concern", CORE)
def test_the_core_never_imports_the_run_plumbing_or_the_commands(concern):
    for name in (m for m in MODULES if m.startswith(f"vaelab.{concern}")):
        bad = sorted(t for t in MODULES[name] if t.startswith(tuple(f"vaelab.{p}" for p in PLUMBING)))
        assert not bad, f"{name} imports {bad}"


def test_the_model_is_plain_pytorch():
    for name in (m for m in MODULES if m.startswith("vaelab.model")):
        bad = sorted(t for t in MODULES[name] if t.split(".")[0] in ("pytorch_lightning", "lightning", "hydra", "omegaconf"))
        assert not bad, f"{name} imports {bad}"


def test_no_import_circles():
    graph = {name: vaelab_imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, "import circle: " + " -> ".join([*path[path.index(target) :], target])
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize(
    "statement",
    [
        "import vaelab.model",
        "import vaelab.model.vae, vaelab.model.latent, vaelab.model.networks",
        "import vaelab.commands.evaluate",
        "import vaelab.commands.generate",
    ],
)
def test_what_needs_no_lightning_imports_none(statement):
    """In a fresh interpreter, as `python -c "import vaelab.model, sys; assert 'pytorch_lightning' not in sys.modules"`."""
    check = f"{statement}; import sys; assert 'pytorch_lightning' not in sys.modules and 'lightning_fabric' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)


def test_the_settings_and_their_vocabularies_import_no_torch():
    """The settings are checked at start-up, before torch loads: vaelab.runs.settings imports no torch, and the one
    vocabulary per choice (vaelab.choices), which the model and data modules read, imports nothing at all."""
    assert MODULES["vaelab.choices"] == set()
    check = "import vaelab.runs.settings, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)
