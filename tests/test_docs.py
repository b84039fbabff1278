"""The documentation (README.md and the MkDocs pages in docs/), in-process: the README's first screen, relative links
that resolve, and every `vaelab-train` line of a bash block composed as vaelab-train would compose it and put through
the settings check (a line marked `# refused: <message>` must be refused with that message)."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import REPO
from vaelab.errors import UserError, hydra_message
from vaelab.runs.settings import check

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL = {"bash", "sh", "shell"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
REFUSED = re.compile(r"#\s*refused:\s*(.*)$")
# The docs' placeholders and what stands in for them here (a new placeholder must be added: the test says so).
PLACEHOLDERS = {
    "<args>": "",
    "<dir>": "outputs/docs-example",
    "<run dir>": "outputs/docs-example",
    "<name>": "dense",
    "<likelihood>": "gaussian",
    "<class name>": "MNIST",
    "<c>": "1",
    "<h>": "28",
    "<w>": "28",
    "<host>": "localhost",
}
OPTION_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}  # Hydra's flags that print; they change nothing composed
PRINT_FLAGS = {"--help", "-h", "--hydra-help", "--resolve", "--info", "-i"}


def without_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def shell_blocks(page: Path) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang in SHELL]


def without_comment(line: str) -> str:
    """The command of a shell line: a `#` outside quotes, at the start of a word, begins a comment (as for shlex)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def train_lines() -> list[tuple[str, str]]:
    """(page, line) for each line of a bash block that starts with vaelab-train, `\\` continuations joined; a command
    shown on several pages is composed once."""
    found = {}
    for page in PAGES:
        for body in shell_blocks(page):
            for line in body.replace("\\\n", " ").splitlines():
                if line.startswith("vaelab-train ") or line == "vaelab-train":
                    key = (" ".join(without_comment(line).split()), bool(REFUSED.search(line)))
                    found.setdefault(key, (page.relative_to(REPO).as_posix(), line))
    return list(found.values())


def user_config_files(root: Path) -> None:
    """The docs' own example configs (a yaml block whose first line is `# <path>.yaml: ...`), written under root, so
    a documented `--config-dir` line composes against exactly what the docs show."""
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text()):
            named = re.match(r"# (\S+\.yaml):", body)
            if lang == "yaml" and named:
                (root / named[1]).parent.mkdir(parents=True, exist_ok=True)
                (root / named[1]).write_text(body)


def overrides_of(line: str, root: Path) -> tuple[list[str], bool]:
    """The overrides vaelab-train would compose from a documented line, and whether it is a multirun (-m)."""
    line = without_comment(line)
    for placeholder in set(re.findall(r"<[^<>]*>", line)):
        assert placeholder in PLACEHOLDERS, f"{placeholder} in {line!r}: add a stand-in to PLACEHOLDERS"
        line = line.replace(placeholder, PLACEHOLDERS[placeholder])
    words = [os.path.expandvars(word) for word in shlex.split(line)[1:]]  # the shell expands $HOME
    overrides, multirun = [], False
    while words:
        word = words.pop(0)
        if word in ("-m", "--multirun"):
            multirun = True
        elif word in ("--config-dir", "-cd"):
            overrides.append(f"hydra.searchpath=[file://{root / words.pop(0)}]")
        elif word in OPTION_WITH_VALUE:
            words.pop(0)
        elif word in PRINT_FLAGS or word == "...":  # `...`: the rest of the line as in the lines above it
            continue
        else:
            assert not word.startswith("-"), f"{word} in {line!r}: tell this test what the flag does"
            overrides.append(word)
    return overrides, multirun


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A multirun composed as its first job: each sweep (`a,b,c`, `range(...)`) at its first value. An interval
    (`interval(...)`, Optuna's search space) has no first value: the sweeper draws from it, so it is left out."""
    chosen = []
    for override, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if not parsed.is_sweep_override():
            chosen.append(override)
        elif parsed.is_discrete_sweep():
            chosen.append(f"{parsed.get_key_element()}={next(iter(parsed.sweep_string_iterator()))}")
    return chosen


def test_the_readme_is_short_and_its_first_screen_has_the_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    first = "\n".join(lines[:40])
    for command in ("make train", "make test", "pip install", "vaelab-train ", "tensorboard --logdir"):
        assert command in first, command
    assert re.search(r"!\[[^\]]*\]\(docs/images/[^)]+\.png\)", first), "a picture of the TensorBoard images"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_points_at_a_file(page):
    targets = [t for t in LINK.findall(without_code(page.read_text())) if not re.match(r"[a-z]+:|#", t)]
    assert targets or page.name not in ("README.md", "index.md"), "no links found: is the pattern wrong?"
    missing = [t for t in targets if not (page.parent / t.split("#")[0]).is_file()]
    assert not missing, missing


def test_the_pages_are_the_site():
    """mkdocs.yml's nav names every page of docs/ (index.md, the site's home page, among them) and no other."""
    nav = (REPO / "mkdocs.yml").read_text()
    assert {p.name for p in PAGES[1:]} == set(re.findall(r"^  - [^:]+: (\S+\.md)$", nav, re.M))
    assert "index.md" in nav


def test_the_documented_lines_are_found():
    lines = [line for _, line in train_lines()]
    assert len(lines) > 40 and any(" -m " in line for line in lines) and any("# refused:" in line for line in lines)


@pytest.mark.parametrize("page,line", train_lines(), ids=lambda value: re.sub(r"\s+", " ", value)[:80])
def test_every_documented_train_line_composes(page, line, compose, tmp_path, monkeypatch):
    user_config_files(tmp_path)
    overrides, multirun = overrides_of(line, tmp_path)
    if multirun:
        overrides = first_of_each_sweep(overrides)
    monkeypatch.setattr(sys, "argv", ["vaelab-train", *overrides])  # the error names a value as the user typed it
    refused = REFUSED.search(line)
    try:
        check(compose(overrides), "train")
    except UserError as err:
        message = str(err)
    except Exception as err:  # Hydra's composition errors: vaelab-train says them in one line
        message = hydra_message(err) or f"{type(err).__name__}: {err}"
    else:
        assert not refused, f"{page}: {line!r} is documented as refused but composes and passes the settings check"
        return
    assert refused, f"{page}: {line!r} is refused: {message}"
    assert message.startswith(refused[1].strip()), f"{page}: {line!r} is refused with another message: {message}"
