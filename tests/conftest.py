from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


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
