"""``python3 pop3_client.py SOURCE_IP PORT USER PASSWORD``: one POP3 login; prints ok or failed.

Standard library only: it runs under the system python3 inside a network
namespace of a live test (nsenter), where the server listens.
"""

from __future__ import annotations

import poplib
import socket
import sys
import time


def main() -> int:
    source, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

    class Bound(poplib.POP3):
        def _create_socket(self, timeout: float) -> socket.socket:
            return socket.create_connection(
                (self.host, self.port), timeout, source_address=(source, 0)
            )

    deadline = time.monotonic() + 10
    while True:  # the server may still be starting
        try:
            client = Bound("127.0.0.1", port, timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    client.user(user)
    try:
        client.pass_(password)
    except poplib.error_proto:
        print("failed")
        client.close()
        return 0
    client.quit()
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
