"""Log lines for systemd's journal: a priority per line, no timestamp of our own.

When systemd connects a service's stderr to the journal it says so in
``JOURNAL_STREAM`` (the stream's device and inode). journald then reads a
``<N>`` prefix on each line as that line's syslog priority (sd-daemon(3)),
so ``journalctl -p warning`` shows popauth's warnings, and stamps every line
itself, so popauth's own timestamp would only repeat it. Standard library
only: ``popauth sessions`` uses it too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TextIO

# syslog priorities (sd-daemon.h SD_ERR ... SD_DEBUG) of popauth's levels.
PRIORITIES = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "info": 6, "debug": 7}


def is_journal(stream: TextIO, environment: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd named in JOURNAL_STREAM."""
    value = (os.environ if environment is None else environment).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def with_priority(level: str, text: str) -> str:
    """``text`` with the ``<N>`` prefix of ``level`` on each of its lines (a traceback too)."""
    prefix = f"<{PRIORITIES.get(level, 6)}>"
    return "\n".join(prefix + line for line in text.split("\n"))
