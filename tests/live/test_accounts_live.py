"""Operator features through real Postfix and Dovecot: accounts, POP-first phase-out, metrics."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from harness.dovecot import DovecotInstance, pop3_login
from harness.popauth import POPAUTH, PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.smtp import REMOTE, SmtpSession, rcpt_reply
from tests.live.conftest import USERS, PopauthFactory

pytestmark = pytest.mark.live


def relays(postfix: PostfixInstance, client: str) -> bool:
    code, _ = rcpt_reply(postfix.smtp_port, client, REMOTE)
    assert code in (250, 550), code
    return code == 250


def test_revoke_every_address_of_a_user(
    postfix: PostfixInstance, dovecot: DovecotInstance, start_popauth: PopauthFactory
) -> None:
    popauth = start_popauth()
    for client in ("127.0.0.2", "127.0.0.7"):
        assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], client)
    assert pop3_login(dovecot.pop3_port, "bob", USERS["bob"], "127.0.0.8")
    assert relays(postfix, "127.0.0.2")
    assert relays(postfix, "127.0.0.7")
    revoke = popauth.cli("revoke", "--user", "alice")
    assert revoke.returncode == 0, revoke
    assert "revoked=2" in revoke.stdout
    assert not relays(postfix, "127.0.0.2")
    assert not relays(postfix, "127.0.0.7")
    assert relays(postfix, "127.0.0.8")


def test_block_survives_restart_and_unblock_restores(
    postfix: PostfixInstance,
    dovecot: DovecotInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
) -> None:
    blocklist = popauth_dir / "blocked.json"
    blocklist.unlink(missing_ok=True)
    popauth = start_popauth(blocklist_path=str(blocklist))
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert relays(postfix, "127.0.0.2")
    block = popauth.cli("block", "alice")
    assert block.returncode == 0, block
    assert "revoked=1 blocked=new" in block.stdout
    assert not relays(postfix, "127.0.0.2")
    # Dovecot still lets alice read her mail; popauth refuses to whitelist her.
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert not relays(postfix, "127.0.0.2")
    assert popauth.events("login_refused_blocked")[-1]["user"] == "alice"
    assert popauth.stop() == 0
    restarted = start_popauth(blocklist_path=str(blocklist))
    assert "user=alice" in restarted.cli("blocked").stdout
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert not relays(postfix, "127.0.0.2")
    assert restarted.cli("unblock", "alice").returncode == 0
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert relays(postfix, "127.0.0.2")


def test_report_after_mixed_traffic(
    postfix: PostfixInstance, dovecot: DovecotInstance, start_popauth: PopauthFactory
) -> None:
    popauth = start_popauth(accounting="recipients")
    # alice relays twice by POP first, to two and one remote recipients.
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    for recipients in (["a@remote.example", "b@remote.example"], ["c@remote.example"]):
        with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
            assert session.mail()[0] == 250
            for recipient in recipients:
                assert session.rcpt(recipient)[0] == 250
            assert session.rcpt("bob@local.test")[0] == 250  # local: not relayed
            assert session.send_message(recipients)[0] == 250
    # Two transactions alice abandons after RCPT (RSET, then QUIT): never sent, not counted.
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.mail()[0] == 250
        assert session.rcpt("d@remote.example")[0] == 250
        assert session.rset()[0] == 250
        assert session.mail()[0] == 250
        assert session.rcpt("e@remote.example")[0] == 250
    # bob relays by SMTP AUTH only.
    with SmtpSession(postfix.smtp_port, "127.0.0.5") as session:
        session.login("bob", USERS["bob"])
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.send_message([REMOTE])[0] == 250
    # bob also checks mail and then writes only to a local address: no POP relaying.
    assert pop3_login(dovecot.pop3_port, "bob", USERS["bob"], "127.0.0.3")
    with SmtpSession(postfix.smtp_port, "127.0.0.3") as session:
        assert session.mail()[0] == 250
        assert session.rcpt("alice@local.test")[0] == 250
    table = popauth.cli("report")
    assert table.returncode == 0, table
    print(table.stdout)  # shown with -s; quoted in the closing note
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows[0][:3] == ["user", "pop_messages", "pop_recipients"]
    assert [row[0] for row in rows[1:]] == ["alice"]
    assert rows[1][1:3] == ["2", "3"]
    report = popauth.cli("report", "--format", "json")
    assert '"user": "alice"' in report.stdout
    assert "bob" not in report.stdout


def test_pop_first_off_explains_itself(
    postfix: PostfixInstance, dovecot: DovecotInstance, start_popauth: PopauthFactory
) -> None:
    start_popauth(pop_first="off")
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    code, text = rcpt_reply(postfix.smtp_port, "127.0.0.2", REMOTE)
    assert code == 550
    assert text.startswith("5.7.1 Relaying denied. POP before SMTP has been retired")
    code, text = rcpt_reply(postfix.smtp_port, "127.0.0.3", REMOTE)
    assert (code, "retired" in text) == (550, False)  # a stranger gets the usual text
    assert rcpt_reply(postfix.smtp_port, "127.0.0.2", "bob@local.test")[0] == 250
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        session.login("alice", USERS["alice"])
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE)[0] == 250


def test_pop_first_warn_relays_and_logs(
    postfix: PostfixInstance, dovecot: DovecotInstance, start_popauth: PopauthFactory
) -> None:
    popauth = start_popauth(pop_first="warn")
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert relays(postfix, "127.0.0.2")
    warning = popauth.events("pop_first_deprecated")[-1]
    assert (warning["user"], warning["client_ip"], warning["level"]) == (
        "alice",
        "127.0.0.2",
        "warning",
    )


def test_metrics_endpoint(
    postfix: PostfixInstance, dovecot: DovecotInstance, start_popauth: PopauthFactory
) -> None:
    port = free_port()
    popauth = start_popauth(metrics_listen=f"127.0.0.1:{port}")
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert relays(postfix, "127.0.0.2")
    assert not relays(postfix, "127.0.0.3")
    popauth.ask("garbage")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['popauth_decisions_total{reason="whitelisted",verdict="accept"}'] >= 1
    assert samples['popauth_decisions_total{reason="relay_denied",verdict="reject"}'] >= 1
    assert samples["popauth_whitelist_entries"] == 1
    assert samples['popauth_ingest_requests_total{result="ok",verb="LOGIN"}'] == 1
    assert samples['popauth_ingest_requests_total{result="syntax",verb="invalid"}'] == 1
    assert samples["popauth_decision_seconds_count"] >= 2
    assert "popauth_errors_total" in text


def test_pop_first_sender_own_binds_the_sender_to_the_entrys_users(
    postfix: PostfixInstance, dovecot: DovecotInstance, start_popauth: PopauthFactory
) -> None:
    """Two users behind one address, each sending as themselves; anyone else is refused."""
    popauth = start_popauth(pop_first_sender="own")
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert pop3_login(dovecot.pop3_port, "bob", USERS["bob"], "127.0.0.2")
    for user in ("alice", "bob"):
        with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
            assert session.mail(f"{user}@local.test")[0] == 250
            assert session.rcpt(REMOTE)[0] == 250, user
            assert session.send_message([REMOTE])[0] == 250
    # A stranger behind the same address, sending as someone else.
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.mail("carol@local.test")[0] == 250
        code, text = session.rcpt(REMOTE)
        assert code == 550
        assert text.startswith("5.7.1 Sender address is not yours: check your mail"), text
        assert session.rcpt("bob@local.test")[0] == 250  # local mail from anyone
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.mail("")[0] == 250  # MAIL FROM:<>
        code, text = session.rcpt(REMOTE)
        assert code == 550
        assert text.startswith("5.7.1 A null sender (<>) may not relay"), text
    reasons = [d["reason"] for d in popauth.events("relay_decision")]
    assert "sender_not_owned" in reasons
    assert "null_sender" in reasons
    explained = popauth.cli("explain", "127.0.0.2", REMOTE, "--sender", "carol@local.test")
    assert "reply: 550 5.7.1 Sender address is not yours" in explained.stdout, explained
    # One user's revoke leaves the other's relaying intact, as themselves only.
    assert popauth.cli("revoke", "--user", "bob").returncode == 0
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.mail("alice@local.test")[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.rset()[0] == 250
        assert session.mail("bob@local.test")[0] == 250
        assert session.rcpt(REMOTE)[0] == 550
    # SMTP AUTH is never asked whose sender it is.
    with SmtpSession(postfix.smtp_port, "127.0.0.3") as session:
        session.login("bob", USERS["bob"])
        assert session.mail("")[0] == 250
        assert session.rcpt(REMOTE)[0] == 250


def test_a_relay_budget_holds_a_pop_first_address_and_nothing_else(
    postfix: PostfixInstance, dovecot: DovecotInstance, start_popauth: PopauthFactory
) -> None:
    """Three relayed recipients per 3 s window: the fourth gets 451 4.7.1, logged
    once; local recipients and SMTP AUTH are never counted; the next window is whole."""
    port = free_port()
    popauth = start_popauth(
        pop_first_max_recipients=3, pop_first_budget_window=3, metrics_listen=f"127.0.0.1:{port}"
    )
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    remote = [f"friend{n}@remote.example" for n in range(5)]
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.mail("alice@local.test")[0] == 250
        for recipient in remote[:2]:
            assert session.rcpt(recipient)[0] == 250, recipient
        assert session.rcpt("bob@local.test")[0] == 250  # local: not counted
        assert session.rcpt(remote[2])[0] == 250
        code, text = session.rcpt(remote[3])
        assert (code, text) == (
            451,
            "4.7.1 Too many recipients for a POP/IMAP login: try again later,"
            " or turn on SMTP AUTH.",
        )
        assert session.rcpt(remote[4])[0] == 451
        assert session.rcpt("bob@local.test")[0] == 250  # local mail still goes
        assert session.send_message([])[0] == 250  # the accepted ones
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.mail("alice@local.test")[0] == 250
        assert session.rcpt(REMOTE)[0] == 451  # a new message, the same window
    # SMTP AUTH from the very address is neither counted nor refused.
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        session.login("bob", USERS["bob"])
        assert session.mail("bob@local.test")[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
    queried = popauth.cli("query", "127.0.0.2", "--format", "raw").stdout
    assert " budget_left=0 budget_max=3 budget_ends=" in queried, queried
    explained = popauth.cli("explain", "127.0.0.2", REMOTE).stdout
    assert "reply: 451 4.7.1 Too many recipients" in explained, explained
    (spent,) = popauth.events("relay_budget_spent")
    assert (spent["client_ip"], spent["users"], spent["max_recipients"]) == (
        "127.0.0.2",
        ["alice"],
        3,
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert "popauth_relay_budgets_spent_total 1.0" in text
    assert 'popauth_decisions_total{reason="budget_spent",verdict="tempfail"} 3.0' in text
    # After the window, a whole budget again.
    ends = int(queried.rsplit("budget_ends=", 1)[1].split()[0])
    time.sleep(max(0.0, ends + 1 - time.time()))
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.mail("alice@local.test")[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
    assert len(popauth.events("relay_budget_spent")) == 1


def _retire_in(seconds: int) -> tuple[float, str]:
    """A retirement time ``seconds`` ahead (whole seconds, as RFC 3339 says it)."""
    at = int(time.time()) + seconds
    return at, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()) + 0.2)


def test_a_campaign_retires_pop_first_at_its_time_and_spares_the_exempt(
    postfix: PostfixInstance, dovecot: DovecotInstance, start_popauth: PopauthFactory
) -> None:
    """warn, then retired at a time a few seconds ahead, with no reload; bob is exempt."""
    at, written = _retire_in(6)
    popauth = start_popauth(
        pop_first="warn", pop_first_retire_at=written, pop_first_exempt_users=["bob"]
    )
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert pop3_login(dovecot.pop3_port, "bob", USERS["bob"], "127.0.0.8")
    assert relays(postfix, "127.0.0.2")
    warning = popauth.events("pop_first_deprecated")[-1]
    assert (warning["user"], warning["retire_at"]) == ("alice", written)
    explained = popauth.cli("explain", "127.0.0.2", REMOTE)
    assert "pop_first_retire_at: retires at " in explained.stdout, explained
    assert time.time() < at, "the first part of the test took too long"
    _sleep_until(at)
    code, text = rcpt_reply(postfix.smtp_port, "127.0.0.2", REMOTE)
    assert code == 550
    assert text.startswith("5.7.1 Relaying denied. POP before SMTP has been retired: turn on"), text
    print(f"after the date, alice (POP first) gets: {code} {text}")
    assert relays(postfix, "127.0.0.8")  # bob is exempt
    assert rcpt_reply(postfix.smtp_port, "127.0.0.2", "bob@local.test")[0] == 250
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        session.login("alice", USERS["alice"])
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
    explained = popauth.cli("explain", "127.0.0.2", REMOTE)
    assert "verdict: reject (pop_first_retired)" in explained.stdout, explained
    # Within a second of the date it says "(now)", later "(N s ago)".
    assert re.search(
        r"retired at .* \((now|.* ago)\): POP-first relays only for exempt", explained.stdout
    ), explained
    assert popauth.events("local_delivery_reloaded") == []
    # bob's relays are still counted, as exempt.
    report = popauth.cli("report", "--format", "json")
    rows = {row["user"]: row for row in json.loads(report.stdout)}
    assert (rows["bob"]["exempt"], rows["bob"]["pop_messages"]) == ("yes", "1")


def _campaign_rows(popauth: PopauthServer) -> tuple[str, dict[str, dict[str, str]]]:
    """``popauth report --campaign``: the table as printed, and its CSV rows by user."""
    table = popauth.cli("report", "--campaign")
    assert table.returncode == 0, table
    spreadsheet = popauth.cli("report", "--campaign", "--format", "csv")
    assert spreadsheet.returncode == 0, spreadsheet
    rows = {row["user"]: row for row in csv.DictReader(io.StringIO(spreadsheet.stdout))}
    return table.stdout, rows


def test_report_campaign_follows_a_campaign_from_warn_through_its_retirement(
    postfix: PostfixInstance,
    dovecot: DovecotInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
) -> None:
    """alice relays by POP first, is sent a notice and is refused after the date;
    bob is exempt: never told, still relaying; the report shows both, before and after."""
    at, written = _retire_in(10)
    run = time.monotonic_ns()
    port = free_port()
    popauth = start_popauth(
        metrics_listen=f"127.0.0.1:{port}",
        pop_first="warn",
        pop_first_retire_at=written,
        pop_first_exempt_users=["bob"],
        pop_first_notices=True,
        pop_first_notice_sendmail=["/usr/sbin/sendmail", "-C", str(postfix.config_dir)],
        pop_first_notices_per_minute=600.0,
        pop_first_notice_path=str(popauth_dir / f"notices-{run}.json"),
        usage_path=str(popauth_dir / f"usage-{run}.json"),
    )
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert pop3_login(dovecot.pop3_port, "bob", USERS["bob"], "127.0.0.8")
    assert relays(postfix, "127.0.0.2")
    assert relays(postfix, "127.0.0.8")
    sent = popauth.wait_for_event("notice_sent")
    assert sent[0]["user"] == "alice"
    before, rows = _campaign_rows(popauth)
    print(f"\npopauth report --campaign, before the date:\n{before}")
    assert time.time() < at, "the first part of the test took too long"
    assert f"campaign: POP first retired at {written} (in " in before
    assert (rows["alice"]["notices"], rows["alice"]["exempt"]) == ("1", "no")
    assert rows["alice"]["notified"] != "-"
    assert rows["alice"]["refused_since_retirement"] == "0"
    # The exempt user keeps POP first: no notice says it ends.
    assert (rows["bob"]["exempt"], rows["bob"]["notices"], rows["bob"]["notified"]) == (
        "yes",
        "0",
        "-",
    )
    _sleep_until(at)
    for _ in range(2):
        assert not relays(postfix, "127.0.0.2")
    assert relays(postfix, "127.0.0.8")
    after, rows = _campaign_rows(popauth)
    print(f"popauth report --campaign, after the date:\n{after}")
    assert re.search(rf"campaign: POP first retired at {written} \((now|.* ago)\)", after), after
    assert int(rows["alice"]["refused_since_retirement"]) >= 1
    assert rows["alice"]["notices"] == "1"
    assert (rows["bob"]["exempt"], rows["bob"]["refused_since_retirement"]) == ("yes", "0")
    total = rows["total (2 users)"]
    assert (total["notified"], total["exempt"]) == ("1", "1")
    assert int(total["refused_since_retirement"]) >= 1
    weekly = after.split("weekly trend (users per ISO week):\n")[1].splitlines()
    assert weekly[0].split() == ["week", "pop_first", "smtp_auth", "graduated", "notified"]
    # This week: alice and bob by POP first, alice told.
    assert weekly[-1].split()[1:] == ["2", "0", "0", "1"]
    # The gauges, read at the scrape: both still on POP first this week, one exempt.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        scraped = response.read().decode()
    assert 'popauth_pop_first_users{days="7"} 2.0' in scraped, scraped
    assert 'popauth_pop_first_users{days="30"} 2.0' in scraped
    assert "popauth_pop_first_exempt_users 1.0" in scraped
    assert 'popauth_pop_first_notices_total{result="sent"} 1.0' in scraped


def test_report_retire_at_is_the_dry_run_of_a_retirement(
    postfix: PostfixInstance, dovecot: DovecotInstance, start_popauth: PopauthFactory
) -> None:
    popauth = start_popauth(pop_first="warn", pop_first_exempt_users=["bob"])
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert pop3_login(dovecot.pop3_port, "bob", USERS["bob"], "127.0.0.8")
    for _ in range(3):
        assert relays(postfix, "127.0.0.2")
    assert relays(postfix, "127.0.0.8")
    dry = popauth.cli("report", "--retire-at", "2030-03-01T00:00:00Z", "--days", "30")
    assert dry.returncode == 0, dry
    print(dry.stdout)
    assert "users who relayed by POP first in the last 30 days: 2" in dry.stdout
    assert "would be refused: 1 users, 3 of 4 POP-first messages (75.0%)" in dry.stdout
    refused, spared = dry.stdout.split("not affected: exempt (pop_first_exempt_users): 1")
    assert "alice" in refused.split("would be refused (")[1]
    assert "bob" in spared.split("not affected: relayed by SMTP AUTH")[0]


def _reinstate(popauth: PopauthServer, user: str) -> subprocess.CompletedProcess[str]:
    """``popauth pop-first reinstate USER`` against this server."""
    return subprocess.run(
        [POPAUTH, "pop-first", "reinstate", "--socket", str(popauth.ingest_path), user],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def test_graduation_refuses_pop_first_after_smtp_auth_and_reinstate_restores_it(
    postfix: PostfixInstance,
    dovecot: DovecotInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
) -> None:
    graduates = popauth_dir / "graduates.json"
    popauth = start_popauth(pop_first_graduate=True, graduates_path=str(graduates))
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert relays(postfix, "127.0.0.2")
    # alice's other mail program sends by SMTP AUTH, from elsewhere.
    with SmtpSession(postfix.smtp_port, "127.0.0.5") as session:
        session.login("alice", USERS["alice"])
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.send_message([REMOTE])[0] == 250
    assert popauth.events("pop_first_graduated")[-1]["user"] == "alice"
    code, text = rcpt_reply(postfix.smtp_port, "127.0.0.2", REMOTE)
    assert code == 550
    assert text.startswith("5.7.1 Relaying denied. Your mail program already uses SMTP AUTH"), text
    print(f"a graduate's POP-first client gets: {code} {text}")
    assert "pop_first_graduated" in popauth.cli("explain", "127.0.0.2", REMOTE).stdout
    report = popauth.cli("report", "--format", "json")
    (alice,) = [row for row in json.loads(report.stdout) if row["user"] == "alice"]
    assert alice["graduated"] != "-"
    # Written before it took effect: the file holds it.
    assert json.loads(graduates.read_text())["users"]["alice"]["reinstated_at"] == 0
    reinstate = _reinstate(popauth, "alice")
    assert reinstate.returncode == 0, reinstate
    assert reinstate.stdout.startswith("OK user=alice graduated="), reinstate
    assert relays(postfix, "127.0.0.2")
    again = _reinstate(popauth, "alice")
    assert (again.returncode, again.stdout.strip()) == (1, "NOTFOUND user=alice")
