"""The SMTP client of the tests and benchmarks, from a chosen loopback address.

Two faces over the same dialogue:

- :class:`SmtpSession`, on smtplib, for scenario tests: every command's
  reply code and text; addresses go out exactly as given (odd forms, UTF-8
  with :meth:`SmtpSession.raw`), SMTP AUTH through smtplib's login.
- raw sockets (:func:`open_mail_transaction`, :func:`read_reply`,
  :func:`rcpt_code`) for benchmarks and the soak: reply codes only, no
  smtplib overhead, no retry, one connection per call.
"""

from __future__ import annotations

import base64
import smtplib
import socket
from types import TracebackType
from typing import BinaryIO

# A recipient outside every local domain: any RCPT to it is relaying.
REMOTE = "someone@remote.example"
SENDER = "sender@example.org"
HELO_NAME = "client.example"


class SmtpError(RuntimeError):
    """The server broke the dialogue a raw-socket client expected."""


# -- raw sockets ------------------------------------------------------------


def read_reply(reader: BinaryIO) -> int:
    """Read one (possibly multi-line) SMTP reply from ``reader``; its code."""
    while True:
        line = reader.readline()
        if len(line) < 4:
            raise SmtpError(f"short SMTP reply {line!r}")
        if line[3:4] != b"-":
            return int(line[:3])


def open_mail_transaction(sock: socket.socket) -> BinaryIO:
    """Banner, EHLO and MAIL FROM on a fresh connection; the reader for what follows."""
    reader = sock.makefile("rb")
    if read_reply(reader) != 220:
        raise SmtpError("no 220 banner")
    sock.sendall(f"EHLO {HELO_NAME}\r\n".encode())
    if read_reply(reader) != 250:
        raise SmtpError("EHLO refused")
    sock.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
    code = read_reply(reader)
    if code != 250:
        raise SmtpError(f"MAIL got {code}")
    return reader


def rcpt_code(port: int, source_ip: str, recipient: str, server: str = "127.0.0.1") -> int:
    """A fresh connection up to one RCPT (raw, no retry); the RCPT reply code."""
    with socket.create_connection((server, port), 10, (source_ip, 0)) as sock:
        reader = open_mail_transaction(sock)
        sock.sendall(f"RCPT TO:<{recipient}>\r\n".encode())
        code = read_reply(reader)
        sock.sendall(b"QUIT\r\n")
        reader.close()
    return code


# -- sessions ---------------------------------------------------------------


class SmtpSession:
    """One SMTP session from a chosen loopback address (127.0.0.x), EHLO sent."""

    def __init__(self, port: int, source_ip: str, server: str = "127.0.0.1") -> None:
        self.client = smtplib.SMTP(server, port, source_address=(source_ip, 0), timeout=30)
        self.ehlo = self.client.ehlo(HELO_NAME)

    def mail(self, sender: str = SENDER) -> tuple[int, str]:
        return self._command(f"MAIL FROM:<{sender}>")

    def rcpt(self, recipient: str) -> tuple[int, str]:
        """RCPT TO with the address exactly as given (angle brackets added)."""
        return self._command(f"RCPT TO:<{recipient}>")

    def rset(self) -> tuple[int, str]:
        return self._command("RSET")

    def login(self, user: str, password: str) -> None:
        self.client.login(user, password)

    def raw(self, line: str) -> tuple[int, str]:
        """Any command line, sent as UTF-8 (smtplib's docmd and login are ASCII only)."""
        self.client.send(line.encode("utf-8") + b"\r\n")
        code, text = self.client.getreply()
        return code, text.decode("utf-8", "replace")

    def auth_plain(self, user: str, password: str) -> tuple[int, str]:
        """AUTH PLAIN with UTF-8 credentials; the reply."""
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        return self.raw(f"AUTH PLAIN {token}")

    def send_message(self, recipients: list[str]) -> tuple[int, str]:
        """DATA for the accepted recipients; returns the reply to the final dot."""
        code, text = self._command("DATA")
        if code != 354:
            return code, text
        self.client.send(b"Subject: popauth live test\r\n\r\nHello.\r\n.\r\n")
        code, raw = self.client.getreply()
        return code, raw.decode("utf-8", "replace")

    def _command(self, line: str) -> tuple[int, str]:
        code, raw = self.client.docmd(line)
        return code, raw.decode("utf-8", "replace")

    def close(self) -> None:
        try:
            self.client.quit()
        except smtplib.SMTPException:
            self.client.close()

    def __enter__(self) -> SmtpSession:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def rcpt_reply(
    port: int, source_ip: str, recipient: str, server: str = "127.0.0.1"
) -> tuple[int, str]:
    """The reply to one RCPT in a fresh session (MAIL must succeed first)."""
    with SmtpSession(port, source_ip, server) as session:
        code, text = session.mail()
        if code != 250:
            return code, text
        return session.rcpt(recipient)
