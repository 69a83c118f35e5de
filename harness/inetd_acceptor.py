"""A minimal inetd for live tests: ``python3 inetd_acceptor.py PORT -- SERVER ARGS...``.

Listens on 127.0.0.1:PORT and runs SERVER for each connection with the
connection as its standard input and output, as inetd does for popa3d and
solid-pop3d. Standard library only: it runs under the system python3 inside
the private mount namespace of a live test.
"""

from __future__ import annotations

import os
import signal
import socket
import sys


def main() -> None:
    port = int(sys.argv[1])
    command = sys.argv[sys.argv.index("--") + 1 :]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    while True:
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            os.dup2(connection.fileno(), 0)
            os.dup2(connection.fileno(), 1)
            connection.close()
            os.execv(command[0], command)
        connection.close()


if __name__ == "__main__":
    main()
