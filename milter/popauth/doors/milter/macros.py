"""MTA macros as the bytes the MTA sent.

pymilter's ``getsymval`` decodes a macro as strict UTF-8 and raises
``UnicodeDecodeError`` for anything else, so an 8-bit ``{auth_authen}`` or
``{rcpt_addr}`` (Latin-1 from an old client, any bytes from Sendmail) failed
every attempt with a 451. Here libmilter's ``smfi_getsymval`` is called
directly and the bytes come back untouched; :func:`as_text` turns them into
a ``str`` that keeps every byte (UTF-8, anything else as surrogate escapes),
so decisions compare what the MTA gave and nothing is lost or guessed.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Protocol

from popauth.basics.errors import InputError


class MacroUnavailable(InputError, RuntimeError):
    """The milter context is gone (the connection closed) or is not libmilter's."""


class _Context(Protocol):
    def getsymval(self, name: str) -> str | None: ...


def as_text(raw: bytes) -> str:
    """Bytes from the MTA as text: UTF-8 where valid, other bytes as surrogates."""
    return raw.decode("utf-8", "surrogateescape")


def as_bytes(text: str) -> bytes:
    """The bytes :func:`as_text` was given."""
    return text.encode("utf-8", "surrogateescape")


class _LibMilter:
    """``smfi_getpriv``/``smfi_getsymval`` from the libmilter pymilter links to."""

    def __init__(self) -> None:
        import milter  # pymilter's C module; its dependencies include libmilter

        # PyDLL keeps the GIL, as pymilter's own getsymval does.
        library = ctypes.PyDLL(milter.__file__)
        self.getsymval = library.smfi_getsymval
        self.getsymval.restype = ctypes.c_char_p
        self.getsymval.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.getpriv = library.smfi_getpriv
        self.getpriv.restype = ctypes.c_void_p
        self.getpriv.argtypes = [ctypes.c_void_p]


@functools.cache
def _libmilter() -> _LibMilter:
    return _LibMilter()


# pymilter's context object: PyObject_HEAD, then the SMFICTX pointer.
_SMFICTX_OFFSET = object.__basicsize__


def _is_libmilter_context(context: object) -> bool:
    kind = type(context)
    return kind.__module__ == "milter" and kind.__name__ == "Context"


def macro_bytes(context: _Context | Any, name: str) -> bytes | None:
    """The value of macro ``name`` (e.g. ``"{rcpt_addr}"``) as bytes, or None if unset.

    A context that is not pymilter's C object (pymilter's ``TestCtx``, a
    test double) is asked through its ``getsymval`` and its text encoded back.
    """
    if not _is_libmilter_context(context):
        text = context.getsymval(name)
        return None if text is None else as_bytes(text)
    library = _libmilter()
    pointer = ctypes.c_void_p.from_address(id(context) + _SMFICTX_OFFSET).value
    # The same check pymilter makes before every call: the SMFICTX still
    # belongs to this context object (it is cleared when the connection closes).
    if not pointer or library.getpriv(pointer) != id(context):
        raise MacroUnavailable("the milter connection is closed")
    value: bytes | None = library.getsymval(pointer, name.encode("ascii"))
    return value


def macro_text(context: _Context | Any, name: str) -> str | None:
    """:func:`macro_bytes` as lossless text (see :func:`as_text`).

    pymilter's own ``getsymval`` is asked first: where it succeeds the bytes
    were valid UTF-8, which :func:`as_text` decodes to the same text, and it
    costs a fraction of the two foreign calls of :func:`macro_bytes`, which
    is left for the bytes it cannot decode.
    """
    try:
        return context.getsymval(name)
    except UnicodeDecodeError:
        pass
    raw = macro_bytes(context, name)
    return None if raw is None else as_text(raw)
