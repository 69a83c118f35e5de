"""Sendmail answers, configured-versus-learned resolution, the warning, the reload."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import CapturingLogger

from popauth.config import settings_from_mapping
from popauth.localdelivery import LearnError, LocalDelivery, MtaNotFound
from popauth.localdelivery.commands import CommandResult, CommandRunner
from popauth.localdelivery.reload import LocalDeliveryReloader
from popauth.localdelivery.resolve import (
    LearnSettings,
    LocalDeliveryError,
    resolve_local_delivery,
)
from popauth.localdelivery.sendmail import learn_from_sendmail, parsed_mailer, split_answers
from popauth.relay.decision import RelayPolicy
from popauth.relay.mismatch import MailerMismatchWarner
from popauth.relay.recipients import Recipient, is_local_recipient
from tests.support.logs import capturing_logger
from tests.support.settled import write_settled

# What Sendmail 8.17 prints for "$=w", "$={VirtHost}", "/parse postmaster".
SENDMAIL_BT_OUTPUT = """\
ADDRESS TEST MODE (ruleset 3 NOT automatically invoked)
Enter <ruleset> <address>
> local.test
localhost
mx.local.test
[127.0.0.1]
> virt.test
> Cracked address = $g
Parsing envelope recipient address
parse            returns: $# local $: postmaster
mailer local, user postmaster
> """


def test_split_answers_and_parsed_mailer() -> None:
    answers = split_answers(SENDMAIL_BT_OUTPUT)
    assert answers[0] == ["local.test", "localhost", "mx.local.test", "[127.0.0.1]"]
    assert answers[1] == ["virt.test"]
    assert parsed_mailer(answers[2]) == "local"
    assert split_answers("banner\n> > > ") == [[], [], []]
    assert parsed_mailer(["mailer relay, host hub.example, user postmaster"]) == "relay"


class FakeSendmail(CommandRunner):
    """Answers for sendmail -bt; the real postconf for anything else."""

    def __init__(self, output: str, returncode: int = 0) -> None:
        super().__init__()
        self.output = output
        self.returncode = returncode
        self.calls: list[tuple[list[str], str]] = []

    def run(self, argv: Sequence[str], stdin: str = "") -> CommandResult:
        if argv[0].endswith("/postconf"):
            return super().run(argv, stdin)
        self.calls.append((list(argv), stdin))
        return CommandResult(self.returncode, self.output, "")


def fake_sendmail(output: str, returncode: int = 0) -> FakeSendmail:
    return FakeSendmail(output, returncode)


def test_learn_from_sendmail_asks_test_mode(tmp_path: Path) -> None:
    cf = tmp_path / "sendmail.cf"
    cf.write_text("# a cf\n")
    run = fake_sendmail(SENDMAIL_BT_OUTPUT)
    learned = learn_from_sendmail("/bin/true", str(cf), run)
    questions = "$=w\n$={VirtHost}\n/parse postmaster\n"
    assert run.calls == [(["/bin/true", "-bt", "-C", str(cf)], questions)]
    assert learned.domains == (
        ("local.test", "sendmail class w"),
        ("localhost", "sendmail class w"),
        ("mx.local.test", "sendmail class w"),
        ("[127.0.0.1]", "sendmail class w"),
        ("virt.test", "sendmail class {VirtHost}"),
    )
    assert learned.mailers == (("local", "sendmail ruleset parse (/parse postmaster)"),)
    rules = learned.rules()
    # Sendmail hands its local mailer a bare user name.
    assert is_local_recipient(Recipient("<info@virt.test>", "local", "root"), rules)
    assert is_local_recipient(Recipient("<root>", "local", "root"), rules)
    assert not is_local_recipient(Recipient("<a@virt.test>", "esmtp", "a@remote.example"), rules)


def test_sendmail_failures(tmp_path: Path) -> None:
    with pytest.raises(MtaNotFound, match="no Sendmail configuration"):
        learn_from_sendmail("/bin/true", str(tmp_path / "none.cf"), fake_sendmail(""))
    cf = tmp_path / "sendmail.cf"
    cf.write_text("")
    with pytest.raises(LearnError, match="cannot be run; set sendmail_command"):
        learn_from_sendmail(str(tmp_path / "no-sendmail"), str(cf), fake_sendmail(""))
    with pytest.raises(LearnError, match=r"-bt -C .* failed"):
        learn_from_sendmail("/bin/true", str(cf), fake_sendmail("banner\n> x\n", 0))
    without_mailer = SENDMAIL_BT_OUTPUT.replace("mailer local, user postmaster", "oops")
    with pytest.raises(LearnError, match="set local_mailers"):
        learn_from_sendmail("/bin/true", str(cf), fake_sendmail(without_mailer))


def events(sink: CapturingLogger, name: str) -> list[dict[str, Any]]:
    return [call.kwargs for call in sink.calls if call.kwargs.get("event") == name]


def settings(**raw: Any) -> LearnSettings:
    return settings_from_mapping(raw).local


@pytest.fixture
def no_postfix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Postfix configuration (MAIL_CONFIG points at nothing)."""
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path / "no-postfix"))
    return tmp_path


def test_configured_lists_are_used_as_they_are(no_postfix: Path) -> None:
    local = resolve_local_delivery(
        settings(local_domains=["Example.ORG"], local_mailers=["LMTP"], learn_from_mta="postfix")
    )
    assert local.domains == (("example.org", "configured: local_domains"),)
    assert local.mailers == (("lmtp", "configured: local_mailers"),)
    assert local.source == ""
    assert is_local_recipient(Recipient("<a@example.org>", "lmtp", None), local.rules())


def test_nothing_to_learn_and_nothing_configured_names_the_keys(no_postfix: Path) -> None:
    with pytest.raises(LocalDeliveryError) as raised:
        resolve_local_delivery(settings(sendmail_cf=str(no_postfix / "none.cf")))
    message = str(raised.value)
    assert message.startswith("local_domains and local_mailers not set")
    assert "no Postfix configuration" in message
    assert "no Sendmail configuration" in message
    with pytest.raises(LocalDeliveryError, match=r"^local_mailers not set.*learn_from_mta = .none"):
        resolve_local_delivery(settings(local_domains=["a.test"], learn_from_mta="none"))


def test_an_explicit_mta_must_be_there(no_postfix: Path) -> None:
    with pytest.raises(LocalDeliveryError, match=r"cannot learn .* no Postfix configuration"):
        resolve_local_delivery(settings(learn_from_mta="postfix"))
    with pytest.raises(LocalDeliveryError, match=r"cannot learn .* no Sendmail configuration"):
        resolve_local_delivery(
            settings(learn_from_mta="sendmail", sendmail_cf=str(no_postfix / "x.cf"))
        )


def test_configured_domains_with_learned_mailers(tmp_path: Path) -> None:
    write_settled(
        tmp_path / "main.cf",
        "compatibility_level = 3.6\nmydestination = pf.test\n"
        "virtual_mailbox_domains = vmd.test\nvirtual_transport = lmtp:unix:x\n",
    )
    local = resolve_local_delivery(
        settings(local_domains=["mine.test"], postfix_config_directory=str(tmp_path))
    )
    assert local.domains == (("mine.test", "configured: local_domains"),)
    assert dict(local.mailers) == {
        "local": "postfix local_transport (for mydestination)",
        "lmtp": "postfix virtual_transport (for virtual_mailbox_domains)",
    }
    assert "learned from: postfix" in local.describe()[0]
    learned_all = resolve_local_delivery(settings(postfix_config_directory=str(tmp_path)))
    assert dict(learned_all.domains) == {
        "pf.test": "postfix mydestination",
        "vmd.test": "postfix virtual_mailbox_domains",
    }


def test_learned_domains_with_configured_mailers(tmp_path: Path) -> None:
    """Each class keeps its domains; the configured words are every class's mailers."""
    write_settled(
        tmp_path / "main.cf",
        "compatibility_level = 3.6\nmydestination = pf.test\n"
        "relay_domains = !no.backup.test, backup.test\n"
        # Not read: local_mailers says which words count.
        "transport_maps = regexp:/nowhere/transport.re\n",
    )
    local = resolve_local_delivery(
        settings(local_mailers=["lmtp"], postfix_config_directory=str(tmp_path))
    )
    rules = local.rules()
    assert is_local_recipient(Recipient("<a@pf.test>", "lmtp", None), rules)
    assert is_local_recipient(Recipient("<a@x.backup.test>", "lmtp", None), rules)
    assert not is_local_recipient(Recipient("<a@no.backup.test>", "lmtp", None), rules)
    assert not is_local_recipient(Recipient("<a@pf.test>", "local", None), rules)
    assert local.mailers == (("lmtp", "configured: local_mailers"),)


def test_a_postfix_that_delivers_nothing_here_is_refused(tmp_path: Path) -> None:
    write_settled(tmp_path / "main.cf", "compatibility_level = 3.6\nmydestination =\n")
    with pytest.raises(LocalDeliveryError, match=r"delivers no domain here.*set local_domains"):
        resolve_local_delivery(settings(postfix_config_directory=str(tmp_path)))


def test_sendmail_is_asked_when_there_is_no_postfix(no_postfix: Path) -> None:
    cf = no_postfix / "sendmail.cf"
    cf.write_text("")
    run = fake_sendmail(SENDMAIL_BT_OUTPUT)
    local = resolve_local_delivery(settings(sendmail_cf=str(cf), sendmail_command="/bin/true"), run)
    assert ("virt.test", "sendmail class {VirtHost}") in local.domains
    assert local.source.startswith("sendmail")


def policy_of(local: LocalDelivery) -> RelayPolicy:
    return settings_from_mapping({}).relay.policy(local)


def test_mismatch_warning_once_per_mailer_and_domain() -> None:
    log, sink = capturing_logger()
    warner = MailerMismatchWarner(log)
    policy = policy_of(LocalDelivery.configured(["local.test", "other.test"], ["local"]))
    for _ in range(3):
        warner.check(policy, Recipient("<a@local.test>", "lmtp", "a@local.test"))
        warner.check(policy, Recipient("<b@LOCAL.test>", "lmtp", "b@local.test"))
    warner.check(policy, Recipient("<a@other.test>", "lmtp", "a@other.test"))
    warner.check(policy, Recipient("<a@local.test>", "relay", None))
    # Never: a local mailer, a remote domain, a disguised relay, a remote resolution.
    warner.check(policy, Recipient("<a@local.test>", "local", "a@local.test"))
    warner.check(policy, Recipient("<a@remote.example>", "smtp", "a@remote.example"))
    warner.check(policy, Recipient("<a%remote.example@local.test>", "smtp", "a@remote.example"))
    warner.check(policy, Recipient("<a@local.test>", "esmtp", "x@remote.example"))
    warner.check(policy, Recipient("<postmaster>", "smtp", None))
    warnings = events(sink, "local_domain_with_foreign_mailer")
    assert [(w["rcpt_mailer"], w["domain"]) for w in warnings] == [
        ("lmtp", "local.test"),
        ("lmtp", "other.test"),
        ("relay", "local.test"),
    ]
    assert all(w["setting"] == "local_mailers" for w in warnings)
    assert "add it to local_mailers" in warnings[0]["hint"]


class Holder:
    def __init__(self, policy: RelayPolicy) -> None:
        self.policy = policy

    def replace_policy(self, policy: RelayPolicy) -> None:
        self.policy = policy


def test_reload_swaps_the_policy_or_keeps_the_old_one(tmp_path: Path) -> None:
    main_cf = tmp_path / "main.cf"
    write_settled(main_cf, "compatibility_level = 3.6\nmydestination = one.test\n")
    learn = settings(postfix_config_directory=str(tmp_path))
    first = policy_of(resolve_local_delivery(learn))
    holder = Holder(first)
    log, sink = capturing_logger()
    reload = LocalDeliveryReloader(learn, holder, policy_of, log).reload
    write_settled(main_cf, "compatibility_level = 3.6\nmydestination = one.test, two.test\n")
    assert reload()
    two = Recipient("<a@two.test>", "local", "a@two.test")
    assert is_local_recipient(two, holder.policy.local_delivery)
    reloaded = events(sink, "local_delivery_reloaded")[-1]
    assert "two.test (postfix mydestination)" in reloaded["local_domains"]
    # A configuration that cannot be read changes nothing.
    kept = holder.policy
    write_settled(main_cf, f"compatibility_level = 3.6\nmydestination = hash:{tmp_path}/gone\n")
    assert not reload()
    assert holder.policy is kept
    assert "gone" in events(sink, "local_delivery_not_reloaded")[-1]["error"]
    os.unlink(main_cf)
    assert not reload()
    assert holder.policy is kept
