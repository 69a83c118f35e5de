"""Learning local delivery from Postfix: parsing, and real postconf/postmap on a
private configuration directory (no Postfix daemon runs)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from popauth.localdelivery import LearnError, LocalDelivery, MtaNotFound
from popauth.localdelivery import postfix as postfix_learning
from popauth.localdelivery.commands import CommandResult, CommandRunner
from popauth.localdelivery.postfix import (
    file_entries,
    learn_from_postfix,
    mailer_word,
    parse_postconf,
    split_list,
    table_entry,
)
from popauth.relay.recipients import Recipient, is_local_recipient
from tests.support.settled import write_settled


def test_split_list_keeps_braces_whole() -> None:
    assert split_list("a.test, b.test\tc.test ,, inline:{ x=1, y=2 } hash:/t") == [
        "a.test",
        "b.test",
        "c.test",
        "inline:{ x=1, y=2 }",
        "hash:/t",
    ]
    assert split_list("  ") == []
    # A '#' token ends the list; other white space than Postfix's does not split.
    assert split_list("a.test #b.test c.test") == ["a.test"]
    assert split_list("a.test#b\x0cc.test") == ["a.test#b\x0cc.test"]


def test_file_entries_drop_comments() -> None:
    assert file_entries("# all of it\na.test b.test # two\n\nc.test,d.test\n") == [
        "a.test",
        "b.test",
        "c.test",
        "d.test",
    ]
    assert file_entries("a.test\n# c\n\n  b.test\n") == ["a.test", "b.test"]


@pytest.mark.parametrize(
    "text",
    [
        # Postfix 3.7 reads the second line; later versions join it to the first,
        # whose comment then hides it.
        "a.test # comment\n  !b.a.test\n",
        # A first line that continues nothing is skipped by later versions only.
        "  a.test\n",
    ],
)
def test_a_file_that_postfix_versions_read_differently_is_refused(text: str) -> None:
    with pytest.raises(LearnError, match="Postfix versions read this file differently"):
        file_entries(text, "/etc/postfix/domains")


@pytest.mark.parametrize(
    ("value", "word"),
    [
        ("lmtp:unix:private/dovecot-lmtp", "lmtp"),
        ("local:$myhostname", "local"),
        ("Virtual", "virtual"),
        ("smtp:[inner.example]:25", "smtp"),
        (":[inner.example]", None),
        ("", None),
        ("bad word:x", None),
    ],
)
def test_mailer_word_is_the_transport_name(value: str, word: str | None) -> None:
    assert mailer_word(value) == word


def test_parse_postconf_and_table_entries() -> None:
    assert parse_postconf("mydestination = a, b\nrelay_domains =\nx = y = z\n") == {
        "mydestination": "a, b",
        "relay_domains": "",
        "x": "y = z",
    }
    assert table_entry("Example.ORG\tOK") == ("Example.ORG", "OK")
    assert table_entry("other.test  lmtp:unix:x") == ("other.test", "lmtp:unix:x")
    assert table_entry("bare") == ("bare", "")
    assert table_entry("") is None


def write_main_cf(directory: Path, **settings: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    base = {
        "compatibility_level": "3.6",
        "myhostname": "mx.example.test",
        "mydomain": "example.test",
        "mydestination": "$myhostname, localhost.$mydomain, localhost",
        "relay_domains": "",
        **settings,
    }
    write_settled(directory / "main.cf", "".join(f"{k} = {v}\n" for k, v in base.items()))
    (directory / "master.cf").write_text("")
    return directory


def postmap(directory: Path, table: str) -> None:
    subprocess.run(["postmap", "-c", str(directory), table], check=True)


def local(learned: LocalDelivery, address: str, mailer: str) -> bool:
    return is_local_recipient(Recipient(f"<{address}>", mailer, address), learned.rules())


def test_stock_layout_expands_myhostname(tmp_path: Path) -> None:
    learned = learn_from_postfix(str(write_main_cf(tmp_path)))
    assert learned.domains == (
        ("mx.example.test", "postfix mydestination"),
        ("localhost.example.test", "postfix mydestination"),
        ("localhost", "postfix mydestination"),
    )
    assert learned.mailers == (("local", "postfix local_transport (for mydestination)"),)
    assert [c.heading for c in learned.classes] == ["local: mydestination (exact names only)"]
    assert str(tmp_path) in learned.source
    assert local(learned, "user@mx.example.test", "local")
    assert not local(learned, "user@sub.mx.example.test", "local")


def test_exclusions_hold_in_every_form(tmp_path: Path) -> None:
    """The open relay of a backup MX that excluded one customer, and its relatives."""
    write_settled(tmp_path / "excluded", "files.backup.test\n")
    write_settled(tmp_path / "excluded-table", "table.backup.test x\n")
    write_settled(tmp_path / "transport", "legacy@example.test smtp:[192.0.2.10]\n")
    write_main_cf(
        tmp_path,
        mydestination="$myhostname, example.test, !!twice.test, twice.test",
        relay_domains=(
            f"!customer.backup.test, !{tmp_path}/excluded, !texthash:{tmp_path}/excluded-table,"
            " backup.test"
        ),
        relay_transport="smtp",
        transport_maps=f"texthash:{tmp_path}/transport",
    )
    learned = learn_from_postfix(str(tmp_path))
    for excluded in ("customer", "x.customer", "files", "table", "x.table"):
        assert not local(learned, f"anyone@{excluded}.backup.test", "smtp"), excluded
    assert local(learned, "anyone@other.backup.test", "smtp")
    assert local(learned, "anyone@twice.test", "local")
    # smtp is relay_transport here, and the route's transport: for those only.
    assert local(learned, "legacy@example.test", "smtp")
    assert not local(learned, "other@example.test", "smtp")
    assert local(learned, "other@example.test", "local")
    shown = "\n".join(learned.describe())
    assert "!customer.backup.test" in shown
    assert "!files.backup.test" in shown
    assert "relay: relay_domains (a name matches its subdomains too)" in shown
    assert f"postfix transport_maps texthash:{tmp_path}/transport (legacy@example.test)" in shown


def test_parent_style_is_read_as_postfix_reads_it(tmp_path: Path) -> None:
    write_main_cf(
        tmp_path,
        relay_domains="backup.test, .dotted.test",
        parent_domain_matches_subdomains="!relay_domains, relay_domains",
    )
    learned = learn_from_postfix(str(tmp_path))
    assert local(learned, "a@backup.test", "relay")
    assert not local(learned, "a@x.backup.test", "relay")
    assert local(learned, "a@x.dotted.test", "relay")
    assert "(.name matches the subdomains of name)" in learned.classes[1].heading


def test_every_address_class_and_table_kind(tmp_path: Path) -> None:
    write_settled(tmp_path / "dest", "dest.test OK\n.sub.test OK\nuser@mailbox.test OK\n")
    write_settled(tmp_path / "destfile", "# more\nfile.test\nfile2.test, file3.test # x\n")
    write_settled(tmp_path / "vmd", "vmd.test x\nUpper.test x\n")
    write_settled(
        tmp_path / "transport",
        "mx.example.test smtp:[inner.example]\nvmd.test :[keeps.class]\n"
        "boss@file.test uucp:x\nremote.example lmtp:should-not-count\n"
        ".sub.backup.test lmtp:sub\n",
    )
    write_main_cf(
        tmp_path,
        mydestination=f"$myhostname, hash:{tmp_path}/dest, {tmp_path}/destfile, !no.test",
        local_transport="local:$myhostname",
        virtual_mailbox_domains=f"texthash:{tmp_path}/vmd",
        virtual_transport="lmtp:unix:private/dovecot-lmtp",
        virtual_alias_domains="alias.test",
        relay_domains="backup.test",
        relay_transport="relay",
        transport_maps=f"hash:{tmp_path}/transport",
    )
    postmap(tmp_path, f"hash:{tmp_path}/dest")
    postmap(tmp_path, f"hash:{tmp_path}/transport")
    learned = learn_from_postfix(str(tmp_path))
    assert [c.rule.name for c in learned.classes] == [
        "local",
        "virtual alias",
        "virtual mailbox",
        "relay",
    ]
    cases = [
        ("u@dest.test", "local", True),
        # mydestination is a string list: ".sub.test" in its table matches nothing.
        ("u@a.sub.test", "local", False),
        ("u@file3.test", "local", True),
        ("u@no.test", "local", False),
        ("boss@file.test", "uucp", True),
        ("boss@file.test", "local", False),
        ("u@mx.example.test", "smtp", True),
        ("u@mx.example.test", "local", False),
        ("u@vmd.test", "lmtp", True),
        # A texthash key in capitals is not what Postfix matches a domain list with.
        ("u@upper.test", "lmtp", False),
        ("u@alias.test", "error", True),
        ("u@alias.test", "local", False),
        ("u@backup.test", "relay", True),
        ("u@x.sub.backup.test", "lmtp", True),
        ("u@x.sub.backup.test", "relay", False),
        ("u@remote.example", "lmtp", False),
    ]
    for address, mailer, expected in cases:
        assert local(learned, address, mailer) is expected, (address, mailer)
    mailers = dict(learned.mailers)
    assert mailers["lmtp"] == "postfix virtual_transport (for virtual_mailbox_domains)"
    assert mailers["error"].startswith("postfix virtual_alias_domains")
    assert mailers["uucp"] == f"postfix transport_maps hash:{tmp_path}/transport (boss@file.test)"
    # Entries for domains of no class are not kept.
    assert "should-not-count" not in "\n".join(learned.describe())


def test_a_transport_table_that_cannot_be_listed_is_an_error(tmp_path: Path) -> None:
    write_settled(tmp_path / "transport.re", "/^postmaster@/ maildrop:\n")
    write_main_cf(tmp_path, transport_maps=f"regexp:{tmp_path}/transport.re")
    with pytest.raises(LearnError) as raised:
        learn_from_postfix(str(tmp_path))
    message = str(raised.value)
    assert message.startswith("transport_maps: cannot list the entries of regexp:")
    assert "set local_mailers" in message
    # With local_mailers configured, transport_maps is not read at all.
    learned = learn_from_postfix(str(tmp_path), with_transport_maps=False)
    assert learned.routes == ()


def test_only_the_routes_of_local_domains_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [f"user{n}@remote{n % 10}.example smtp:[gw]" for n in range(2000)]
    lines += [f"user{n}@mx.example.test lmtp:x" for n in range(5)]
    write_settled(tmp_path / "transport", "\n".join(lines) + "\n")
    write_main_cf(tmp_path, transport_maps=f"hash:{tmp_path}/transport")
    postmap(tmp_path, f"hash:{tmp_path}/transport")
    learned = learn_from_postfix(str(tmp_path))
    assert [(route.mailer, route.count) for route in learned.routes] == [("lmtp", 5)]
    monkeypatch.setattr(postfix_learning, "MAX_TRANSPORT_ROUTES", 4)
    with pytest.raises(LearnError, match=r"more than 4 entries .* set local_mailers"):
        learn_from_postfix(str(tmp_path))


def test_configured_domains_replace_the_lists_but_not_the_transports(tmp_path: Path) -> None:
    write_settled(tmp_path / "transport", "mine.test lmtp:inet:127.0.0.1:24\n* smtp:\n")
    write_main_cf(
        tmp_path,
        virtual_mailbox_domains="mysql:/nowhere/cannot-be-read.cf",
        transport_maps=f"texthash:{tmp_path}/transport",
    )
    learned = learn_from_postfix(str(tmp_path), configured_domains=["mine.test", "other.test"])
    assert [c.rule.name for c in learned.classes] == ["configured"]
    assert set(dict(learned.mailers)) == {"local", "virtual", "lmtp", "smtp"}
    assert local(learned, "u@mine.test", "lmtp")
    assert not local(learned, "u@mine.test", "local")
    # The wildcard routes every other address of the configured domains.
    assert local(learned, "u@other.test", "smtp")
    assert not local(learned, "u@other.test", "local")


def test_wildcard_transport_applies_to_local_domains(tmp_path: Path) -> None:
    write_settled(tmp_path / "transport", "* lmtp:unix:private/dovecot-lmtp\n")
    write_main_cf(tmp_path, transport_maps=f"texthash:{tmp_path}/transport")
    learned = learn_from_postfix(str(tmp_path))
    assert (
        dict(learned.mailers)["lmtp"] == f"postfix transport_maps texthash:{tmp_path}/transport (*)"
    )
    assert local(learned, "u@mx.example.test", "lmtp")
    assert not local(learned, "u@mx.example.test", "local")


def test_a_domain_table_that_cannot_be_listed_is_an_error(tmp_path: Path) -> None:
    write_settled(tmp_path / "domains.re", "/^vmd\\.test$/ OK\n")
    write_main_cf(tmp_path, virtual_mailbox_domains=f"regexp:{tmp_path}/domains.re")
    with pytest.raises(LearnError) as raised:
        learn_from_postfix(str(tmp_path))
    message = str(raised.value)
    assert "virtual_mailbox_domains" in message
    assert f"regexp:{tmp_path}/domains.re" in message
    assert "regexp tables cannot be listed" in message
    assert "set local_domains" in message


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("a.test, !", "no pattern after '!'"),
        ("a.test, !!", "no pattern after '!'"),
        ("{path}/loop", "includes itself"),
    ],
)
def test_lists_postfix_refuses_are_refused(tmp_path: Path, value: str, problem: str) -> None:
    write_settled(tmp_path / "loop", f"a.test\n{tmp_path}/loop\n")
    write_main_cf(tmp_path, relay_domains=value.format(path=tmp_path))
    with pytest.raises(LearnError, match=f"^relay_domains: .*{problem}.*set local_domains"):
        learn_from_postfix(str(tmp_path))


def test_missing_table_and_file_are_errors(tmp_path: Path) -> None:
    write_main_cf(tmp_path, relay_domains=f"hash:{tmp_path}/missing")
    with pytest.raises(LearnError, match="relay_domains: cannot list the entries"):
        learn_from_postfix(str(tmp_path))
    write_main_cf(tmp_path, relay_domains=f"{tmp_path}/missing-file")
    with pytest.raises(LearnError, match=r"cannot read .*missing-file"):
        learn_from_postfix(str(tmp_path))


def test_mail_config_is_honoured_without_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_main_cf(tmp_path, mydestination="from-env.test")
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    assert learn_from_postfix().domains == (("from-env.test", "postfix mydestination"),)


def test_no_main_cf_means_no_postfix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path / "nothing"))
    with pytest.raises(MtaNotFound, match="no Postfix configuration"):
        learn_from_postfix()
    # A named directory that is not there is a plain error, not "no Postfix".
    with pytest.raises(LearnError, match=r"postconf .* failed") as raised:
        learn_from_postfix(str(tmp_path / "nothing"))
    assert not isinstance(raised.value, MtaNotFound)


class BrokenPostconf(CommandRunner):
    def run(self, argv: Sequence[str], stdin: str = "") -> CommandResult:
        if "postconf" in argv[0]:
            return CommandResult(1, "", "postconf: fatal: bad things\n")
        return super().run(argv, stdin)


class StockDirectoryPostconf(CommandRunner):
    """Postfix 3.10's postconf -c DIR can print its built-in config_directory."""

    def run(self, argv: Sequence[str], stdin: str = "") -> CommandResult:
        result = super().run(argv, stdin)
        if "postconf" in argv[0]:
            lines = [line for line in result.stdout.splitlines() if "config_directory" not in line]
            stdout = "\n".join([*lines, "config_directory = /etc/postfix", ""])
            return CommandResult(result.returncode, stdout, result.stderr)
        return result


def test_the_directory_named_is_the_one_reported(tmp_path: Path) -> None:
    learned = learn_from_postfix(str(write_main_cf(tmp_path)), run=StockDirectoryPostconf())
    assert learned.source == f"postfix (config_directory {tmp_path})"


def test_postconf_failure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(LearnError, match=r"postconf .* failed: postconf: fatal: bad things"):
        learn_from_postfix(str(write_main_cf(tmp_path)), run=BrokenPostconf())
