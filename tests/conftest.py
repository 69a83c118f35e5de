from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.shared_runtime import RuntimeUnreachable, shared_runtime


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once, with one line saying what to do, when the suite cannot run."""
    if os.geteuid() != 0:
        pytest.exit(
            "the tests start private Postfix/Dovecot instances and switch users: "
            "run them as root (sudo make test)",
            returncode=2,
        )
    try:
        shared_runtime()
    except RuntimeUnreachable as problem:
        pytest.exit(str(problem), returncode=2)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other users can traverse.

    pytest's own base directory is private to root, but MTA and POP server
    processes (postfix, dovecot, nobody) must reach sockets inside it.
    """
    directory = Path(tempfile.mkdtemp(prefix="popauth-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
