"""Fixtures for every suite. Nothing here needs root or a daemon: the live
layer (tests/live/conftest.py) asks for those itself, and so does every test
marked ``live`` elsewhere."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.leftovers import make_run_directory, run_directory, stop_leftovers


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked live outside tests/live (one acting as other users, the
    benchmark smoke test) needs what the live layer needs."""
    if item.get_closest_marker("live") is not None:
        from tests.live.conftest import require_live_host

        require_live_host()


@pytest.fixture(scope="session", autouse=True)
def no_daemon_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After every other fixture has stopped its daemons: none may be left.

    A daemon still running from one of this run's temporary directories is
    ended (by its pid) and fails the run, naming it.
    """
    directories = [tmp_path_factory.getbasetemp(), run_directory()]
    yield
    leftovers = stop_leftovers(directories)
    if leftovers:
        pytest.fail(
            "daemons were left running from this run's directories (now stopped):\n"
            + "\n".join(leftover.describe() for leftover in leftovers),
            pytrace=False,
        )


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other users can traverse.

    pytest's own base directory is private to root, but MTA and POP server
    processes (postfix, dovecot, nobody) must reach sockets inside it.
    """
    directory = make_run_directory("popauth-test-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
