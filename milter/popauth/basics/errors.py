"""Every error popauth raises on purpose, by kind: one ``except`` per kind.

Each exception popauth defines derives from :class:`PopauthError` through
one of the kinds below, so that the command line says the same thing for
every error of a kind (``configuration error: ...``, ``cannot start: ...``)
without listing them. Where an exception also was a built-in one
(``ValueError``, ``OSError``, ``RuntimeError``) it still is, so that no
handler changes meaning.

The kinds, and where their members live:

- :class:`ConfigError`: the settings cannot be used (``popauth.config``,
  ``popauth.cli``, ``popauth.localdelivery``).
- :class:`StartupError`: a piece cannot start, so popauth does not run
  (``popauth.doors``, ``popauth.store``, ``popauth.companions.follow``).
- :class:`StateFileError` (here, with its kin): a state file cannot be read,
  or its directory is not safe; :class:`StateWriteError`: one could not be
  written.
- :class:`InputError`: input from outside (a request, a log line, a stored
  record) is refused; nothing changed.
- :class:`UnavailableError`: something popauth depends on (the store, the
  ingest endpoint, doveadm, an MTA's tools) did not answer or failed.
- :class:`StoppedError`: a running loop had to stop.
"""

from __future__ import annotations


class PopauthError(Exception):
    """An error popauth raised on purpose; the message says why."""


class ConfigError(PopauthError, ValueError):
    """A setting is unknown or has a bad value; the message names the key."""


class StartupError(PopauthError):
    """A piece of popauth cannot start: the process refuses to run."""


class StateFileError(PopauthError, ValueError):
    """A state file cannot be used; the message says why."""


class StateFileMissing(StateFileError):
    """The state file does not exist (yet): a first start, not damage."""


class StateDirectoryUnsafe(StateFileError):
    """Someone other than root and popauth's own user could replace our files there."""


class StateWriteError(PopauthError, OSError):
    """A state file could not be written; the old version is still in place."""


class InputError(PopauthError, ValueError):
    """Input from outside is refused; nothing changed."""


class UnavailableError(PopauthError):
    """Something popauth depends on did not answer, or failed."""


class StoppedError(PopauthError):
    """A running loop had to stop; the message says why."""
