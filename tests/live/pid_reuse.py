"""``python3 pid_reuse.py PID SOCKET TAG MESSAGE``: fork until a child gets PID, which logs.

What any local account can do once a process has ended: fork until the
kernel hands its pid out again, and send a syslog line from that pid, so
that the kernel's credentials on the message (``SCM_CREDENTIALS``) name the
pid of the process that ended. Standard library only: it runs under the
system python3 as ``nobody`` inside the PID namespace of a live test, whose
small ``pid_max`` makes the pids come round quickly.
"""

from __future__ import annotations

import os
import socket
import sys

MAX_FORKS = 200_000


def send(socket_path: str, tag: str, pid: int, message: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        # <30>: daemon.info, as popa3d logs.
        sender.sendto(f"<30>{tag}[{pid}]: {message}".encode(), socket_path)


def main() -> int:
    target, socket_path, tag, message = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    if os.getpid() == target:
        send(socket_path, tag, target, message)
        return 0
    for forks in range(1, MAX_FORKS + 1):
        child = os.fork()
        if child == 0:
            if os.getpid() == target:
                send(socket_path, tag, target, message)
            os._exit(0)
        os.waitpid(child, 0)
        if child == target:
            print(f"pid {target} taken after {forks} forks")
            return 0
    print(f"pid {target} never came round in {MAX_FORKS} forks", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
