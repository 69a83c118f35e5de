"""An ingest endpoint that answers from a script, for client-side tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path


def scripted_endpoint(path: Path, answers: Sequence[bytes]) -> Callable[[], int]:
    """Listen on ``path``; connection N reads one line and gets ``answers[N]``.

    Returns a function that waits for the script to end and says how many
    connections were served.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    listener.settimeout(10)
    served: list[bytes] = []

    def serve() -> None:
        with listener:
            for answer in answers:
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    return
                with connection:
                    connection.settimeout(10)
                    request = b""
                    while not request.endswith(b"\n"):
                        chunk = connection.recv(512)
                        if not chunk:
                            break
                        request += chunk
                    served.append(request)
                    connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def connections() -> int:
        thread.join(15)
        return len(served)

    return connections
