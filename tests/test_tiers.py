"""The `shell` marker that conftest sets from the source: `make check` leaves out every test that starts a process,
whether it does so itself, through a helper of its module or of conftest, or through a fixture."""

from __future__ import annotations

import importlib

import pytest

from conftest import starts_a_process

EXAMPLE = """
import os
import subprocess

import pytest

from conftest import run_cli, train_run


def helper():
    return subprocess.run(["true"])


def through_the_helper():
    return helper()


def arithmetic(a):
    return a + 1  # mentions no process: subprocess is only named here, never called


def test_a_console_script():
    run_cli("--help")


def test_a_training_run(tmp_path):
    train_run(tmp_path / "run")


def test_a_helper_two_calls_away():
    through_the_helper()


def test_a_process_of_its_own():
    subprocess.Popen(["true"]).wait()


def test_a_fork():
    os.fork()


def test_a_fixture_named_at_run_time(request):
    request.getfixturevalue("trained_run")


def test_in_process():
    assert arithmetic(1) == 2


def test_a_name_that_only_looks_like_one():
    start = 0  # a variable, not conftest.start
    assert start == 0 and subprocess.CompletedProcess([], 0).returncode == 0
"""


@pytest.fixture
def example(tmp_path, monkeypatch):
    (tmp_path / "tiers_example.py").write_text(EXAMPLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("tiers_example")


@pytest.mark.parametrize(
    "name",
    [
        "test_a_console_script",
        "test_a_training_run",
        "test_a_helper_two_calls_away",
        "test_a_process_of_its_own",
        "test_a_fork",
        "test_a_fixture_named_at_run_time",
    ],
)
def test_a_test_that_starts_a_process_is_a_shell_test(example, name):
    assert starts_a_process(getattr(example, name))


@pytest.mark.parametrize("name", ["test_in_process", "test_a_name_that_only_looks_like_one", "arithmetic"])
def test_an_in_process_test_is_not(example, name):
    assert not starts_a_process(getattr(example, name))


def test_the_fixtures_that_train_from_the_shell_mark_their_users(request):
    """The hook also reads the source of every fixture a test uses: conftest's training runs start vaelab-train,
    composing a config does not (and this test, which uses neither, is not marked)."""
    import inspect

    import conftest

    for fixture in (conftest.trained_run, conftest.conditional_run, conftest.rgb_run):
        assert starts_a_process(inspect.unwrap(fixture))
    assert not starts_a_process(inspect.unwrap(conftest.compose))
    assert request.node.get_closest_marker("shell") is None
