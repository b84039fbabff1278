"""vaelab.errors' signal policy in-process: a stop held while the command's module is imported."""

import os
import signal

import pytest

from vaelab import errors


@pytest.fixture
def policy():
    """The policy's handler on SIGINT, as exit_cleanly installs it; the handler and the record restored after."""
    before = signal.signal(signal.SIGINT, errors._stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        errors._RECEIVED.clear()


def test_a_first_stop_inside_held_is_raised_when_the_block_ends(policy):
    reached = []
    with pytest.raises(errors.Interrupted, match="stopped by SIGINT") as stop:
        with errors.held():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the stop")  # not raised here: the block goes on
    assert reached == ["after the stop"] and stop.value.exit_code == 130


def test_a_second_stop_inside_held_raises_at_once(policy):
    reached = []
    with pytest.raises(errors.Interrupted, match="stopped by SIGINT"):
        with errors.held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the second stop")
    assert reached == []


def test_held_without_a_stop_raises_nothing(policy):
    with errors.held():
        pass
    assert not errors._HELD
