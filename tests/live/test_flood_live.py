"""A real Dovecot login relays through a real Postfix while ``nobody``
floods the ingest socket with 500 silent and 500 slow clients.

The socket is opened to everyone (mode 0666) so that the flood can reach it
at all; the hook runs as dovecot, a reporter.
"""

from __future__ import annotations

import pytest

from harness.dovecot import DovecotInstance, imap_login, pop3_login
from harness.postfix import PostfixInstance
from harness.smtp import REMOTE, SmtpSession
from tests.live.conftest import USERS, PopauthFactory
from tests.support.peers import silent_clients_as

pytestmark = pytest.mark.live

FLOOD = 500


def test_logins_relay_while_nobody_floods_the_ingest_socket(
    postfix: PostfixInstance, dovecot: DovecotInstance, start_popauth: PopauthFactory
) -> None:
    popauth = start_popauth(ingest_socket_mode="0666")
    earlier_log = len(dovecot.log_text())
    with (
        silent_clients_as("nobody", popauth.ingest_path, FLOOD) as silent,
        silent_clients_as("nobody", popauth.ingest_path, FLOOD, slow=True) as slow,
    ):
        assert silent + slow > 0
        assert dovecot.imap_port is not None
        logins = [(pop3_login, dovecot.pop3_port), (imap_login, dovecot.imap_port)] * 2
        for n, (login, port) in enumerate(logins):
            client = f"127.0.0.{n + 2}"
            assert login(port, "alice", USERS["alice"], client)
            with SmtpSession(postfix.smtp_port, client) as session:
                assert session.mail()[0] == 250
                assert session.rcpt(REMOTE)[0] == 250, (client, login.__name__)
    recorded = popauth.events("login")
    assert [event["client_ip"] for event in recorded] == [f"127.0.0.{n}" for n in range(2, 6)]
    # The hook never had to give up on the endpoint.
    assert "could not record login" not in dovecot.log_text()[earlier_log:]
