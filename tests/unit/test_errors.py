"""Every error popauth defines is of one kind: the command line catches kinds."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from popauth.basics import errors
from popauth.basics.errors import PopauthError

SOURCE = Path(errors.__file__).parents[1]
KINDS = {
    errors.ConfigError,
    errors.StartupError,
    errors.StateFileError,
    errors.StateWriteError,
    errors.InputError,
    errors.UnavailableError,
    errors.StoppedError,
}
# Direct children of PopauthError that are a kind of their own.
OWN_KIND = {"SetupError"}


def _defined_exceptions() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "__main__.py":  # runs the command
            continue
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module = importlib.import_module(name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == name:
                found.append(value)
    return found


def test_every_public_exception_is_of_one_kind() -> None:
    public = [e for e in _defined_exceptions() if not e.__name__.startswith("_")]
    assert len(public) > 25
    for exception in public:
        assert issubclass(exception, PopauthError), exception
        assert (
            exception in KINDS
            or exception is PopauthError
            or exception.__name__ in OWN_KIND
            or any(issubclass(exception, kind) for kind in KINDS)
        ), exception


def test_the_built_in_bases_stay() -> None:
    from popauth.doors.ingest.client import IngestUnreachable
    from popauth.store.base import StoreUnavailable

    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.StateFileError, ValueError)
    assert errors.StateWriteError(13, "cannot write x").errno == 13
    assert issubclass(IngestUnreachable, OSError)
    assert issubclass(StoreUnavailable, RuntimeError)
