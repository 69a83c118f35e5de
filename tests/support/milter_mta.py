"""The MTA side of the milter protocol (miltertest), for tests that drive popauth serve."""

from __future__ import annotations

import socket
from typing import Any

from miltertest import MilterConnection
from miltertest import constants as mc

from harness.popauth import PopauthServer

CONTINUE, ACCEPT, REPLY = mc.SMFIR_CONTINUE, mc.SMFIR_ACCEPT, mc.SMFIR_REPLYCODE
RELAYING_DENIED = "5.7.1 Relaying denied."
# miltertest cannot decode an option reply carrying macro lists, so this MTA
# side does not offer SETSYMLIST; test_symbol_lists covers that part raw.
ACTIONS = mc.SMFI_V6_ACTS & ~mc.SMFIF_SETSYMLIST


class Mta:
    """One SMTP session as the MTA reports it to the milter."""

    def __init__(self, server: PopauthServer) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(server.milter_path))
        self.milter = MilterConnection(self.sock)
        self.actions, self.protocol = self.milter.optneg_mta(actions=ACTIONS)

    def connect(self, address: str, family: str = mc.SMFIA_INET) -> tuple[str, dict[str, Any]]:
        arguments = {"hostname": "client.example", "family": family, "port": 4321}
        if self.protocol & mc.SMFIP_NR_CONN:
            # The milter said it would not answer CONNECT: it goes on.
            self.milter._send(mc.SMFIC_CONNECT, address=address, **arguments)
            return CONTINUE, {}
        return self.milter.send_ar(  # type: ignore[no-any-return]
            mc.SMFIC_CONNECT, address=address, **arguments
        )

    def mail(self, auth: str | None = None) -> tuple[str, dict[str, Any]]:
        if auth is not None:
            self.milter.send_macro(mc.SMFIC_MAIL, **{"{auth_authen}": auth})
        return self.milter.send_ar(mc.SMFIC_MAIL, args=["<sender@example.org>"])  # type: ignore[no-any-return]

    def rcpt(
        self, address: str, mailer: str | None, resolved: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        macros = {}
        if mailer is not None:
            macros["{rcpt_mailer}"] = mailer
            macros["{rcpt_addr}"] = resolved if resolved is not None else address
        if macros:
            self.milter.send_macro(mc.SMFIC_RCPT, **macros)
        return self.milter.send_ar(mc.SMFIC_RCPT, args=[f"<{address}>"])  # type: ignore[no-any-return]

    def abort(self) -> None:
        self.milter._send(mc.SMFIC_ABORT)

    def close(self) -> None:
        self.sock.close()


def is_relay_denied(reply: tuple[str, dict[str, Any]]) -> bool:
    code, fields = reply
    return (
        code == REPLY
        and fields["smtpcode"] == "550"
        and str(fields["text"]).startswith(RELAYING_DENIED)
    )
