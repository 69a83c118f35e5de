"""Smoke test: Sendmail built from contrib/sendmail.mc starts and fails closed.

The milter socket points to a path where nothing listens.  With F=T on the
filter, Sendmail must not relay without it: it still greets (220) and accepts
EHLO, but answers MAIL FROM with 451 4.3.2, so no recipient (remote or local)
can be given.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.sendmail import (
    CONTRIB_MC,
    SendmailInstance,
    wrap_contrib_mc,
)
from harness.smtp import SmtpSession

pytestmark = pytest.mark.live


@pytest.fixture
def sendmail_no_milter(sendmail_root: Path, tmp_path: Path) -> Iterator[SendmailInstance]:
    workdir = tmp_path / "sendmail"
    port = free_port()
    mc = wrap_contrib_mc(
        CONTRIB_MC.read_text(),
        workdir,
        port,
        # The directory exists, the socket does not: Sendmail checks the
        # directory's safety at start-up and the socket at each connection.
        milter_socket=f"unix:{workdir}/absent-milter.sock",
        local_domains="local.test",
    )
    with SendmailInstance(sendmail_root, workdir, port, mc) as mta:
        yield mta


def test_banner_and_fail_closed_without_milter(sendmail_no_milter: SendmailInstance) -> None:
    mta = sendmail_no_milter
    assert mta.banner.startswith("220 mx.local.test ESMTP Sendmail")
    with SmtpSession(mta.smtp_port, "127.0.0.2") as session:
        code, _ = session.ehlo
        assert code == 250
        assert session.mail("sender@client.example") == (451, "4.3.2 Please try again later")
        # Nothing may be accepted after that, remote or local.
        for rcpt in ("user@remote.example", "root@local.test"):
            rcpt_code, _ = session.rcpt(rcpt)
            assert rcpt_code // 100 in (4, 5), rcpt
