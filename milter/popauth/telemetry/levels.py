"""The log format and level settings, apart from the structlog set-up that uses them.

Standard library only, so that loading the settings (as the client side of
``popauth`` does, with the system Python) needs no logging library.
"""

from __future__ import annotations

import enum
import logging


class LogFormat(enum.Enum):
    CONSOLE = "console"
    JSON = "json"


class LogLevel(enum.Enum):
    """The least severe events written; each is a :mod:`logging` level."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def number(self) -> int:
        level: int = getattr(logging, self.name)
        return level
