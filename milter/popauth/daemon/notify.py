"""The systemd readiness protocol (sd_notify), in the standard library only.

Under ``Type=notify`` systemd passes a datagram socket in ``NOTIFY_SOCKET``:
a path, or an abstract name written with a leading ``@``. popauth sends
``READY=1`` once every socket listens and ``STOPPING=1`` when it begins to
stop. Without ``NOTIFY_SOCKET`` (not started by systemd) nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from popauth.basics.errors import UnavailableError


class NotifyError(UnavailableError, OSError):
    """The notification socket could not be reached."""


def notify_address(environment: Mapping[str, str]) -> str | None:
    """The socket address systemd passed, in the form ``connect()`` takes."""
    address = environment.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


def notify(state: str, environment: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``); False when there is no one to tell."""
    address = notify_address(os.environ if environment is None else environment)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as channel:
        try:
            channel.connect(address)
            channel.sendall(state.encode())
        except OSError as error:
            shown = address.replace("\0", "@", 1)
            raise NotifyError(f"cannot notify {shown}: {error.strerror or error}") from None
    return True
