"""Learning local delivery from Postfix: parsing, and real postconf/postmap on a
private configuration directory (no Postfix daemon runs)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from popauth.localdelivery import LearnError, MtaNotFound
from popauth.localdelivery.commands import CommandResult, run_command
from popauth.localdelivery.postfix import (
    file_entries,
    learn_from_postfix,
    mailer_word,
    parse_postconf,
    parse_table_dump,
    split_list,
)


def test_split_list_keeps_braces_whole() -> None:
    assert split_list("a.test, b.test\tc.test ,, inline:{ x=1, y=2 } hash:/t") == [
        "a.test",
        "b.test",
        "c.test",
        "inline:{ x=1, y=2 }",
        "hash:/t",
    ]
    assert split_list("  ") == []


def test_file_entries_drop_comments() -> None:
    assert file_entries("# all of it\na.test b.test # two\n\nc.test,d.test\n") == [
        "a.test",
        "b.test",
        "c.test",
        "d.test",
    ]


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


def test_parse_postconf_and_table_dumps() -> None:
    assert parse_postconf("mydestination = a, b\nrelay_domains =\nx = y = z\n") == {
        "mydestination": "a, b",
        "relay_domains": "",
        "x": "y = z",
    }
    assert parse_table_dump("Example.ORG\tOK\nother.test  lmtp:unix:x\nbare\n") == {
        "example.org": "OK",
        "other.test": "lmtp:unix:x",
        "bare": "",
    }


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
    (directory / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in base.items()))
    (directory / "master.cf").write_text("")
    return directory


def postmap(directory: Path, table: str) -> None:
    subprocess.run(["postmap", "-c", str(directory), table], check=True)


def test_stock_layout_expands_myhostname(tmp_path: Path) -> None:
    learned = learn_from_postfix(str(write_main_cf(tmp_path)))
    assert learned.domains == {
        "mx.example.test": "postfix mydestination",
        "localhost.example.test": "postfix mydestination",
        "localhost": "postfix mydestination",
    }
    assert learned.mailers == {"local": "postfix local_transport (for mydestination)"}
    assert str(tmp_path) in learned.mta


def test_every_address_class_and_table_kind(tmp_path: Path) -> None:
    (tmp_path / "dest").write_text("dest.test OK\n.sub.test OK\nuser@mailbox.test OK\n")
    (tmp_path / "destfile").write_text("# more\nfile.test\nfile2.test, file3.test # x\n")
    (tmp_path / "vmd").write_text("vmd.test x\n")
    (tmp_path / "transport").write_text(
        "mx.example.test smtp:[inner.example]\nvmd.test :[keeps.class]\n"
        "boss@file.test uucp:x\nremote.example lmtp:should-not-count\n"
    )
    (tmp_path / "transport.re").write_text("/^postmaster@file2\\.test$/ maildrop:\n")
    write_main_cf(
        tmp_path,
        mydestination=f"$myhostname, hash:{tmp_path}/dest, {tmp_path}/destfile, !no.test",
        local_transport="local:$myhostname",
        virtual_mailbox_domains=f"texthash:{tmp_path}/vmd",
        virtual_transport="lmtp:unix:private/dovecot-lmtp",
        virtual_alias_domains="alias.test",
        relay_domains="backup.test",
        relay_transport="relay",
        transport_maps=f"hash:{tmp_path}/transport, regexp:{tmp_path}/transport.re",
    )
    postmap(tmp_path, f"hash:{tmp_path}/dest")
    postmap(tmp_path, f"hash:{tmp_path}/transport")
    learned = learn_from_postfix(str(tmp_path))
    assert set(learned.domains) == {
        "mx.example.test",
        "dest.test",
        ".sub.test",
        "file.test",
        "file2.test",
        "file3.test",
        "vmd.test",
        "alias.test",
        "backup.test",
        # relay_domains is in parent_domain_matches_subdomains by default.
        ".backup.test",
    }
    assert learned.domains["vmd.test"] == "postfix virtual_mailbox_domains"
    assert learned.mailers["local"] == "postfix local_transport (for mydestination)"
    assert learned.mailers["lmtp"] == "postfix virtual_transport (for virtual_mailbox_domains)"
    assert learned.mailers["relay"] == "postfix relay_transport (for relay_domains)"
    assert learned.mailers["error"].startswith("postfix virtual_alias_domains")
    assert learned.mailers["smtp"].startswith(f"postfix transport_maps hash:{tmp_path}/transport")
    assert learned.mailers["uucp"].endswith("(boss@file.test)")
    # A table that cannot be listed is asked for each local domain instead.
    assert learned.mailers["maildrop"] == (
        "postfix transport_maps (postmaster@file2.test -> file2.test)"
    )
    assert set(learned.mailers) == {"local", "lmtp", "relay", "error", "smtp", "uucp", "maildrop"}


def test_configured_domains_replace_the_lists_but_not_the_transports(tmp_path: Path) -> None:
    (tmp_path / "transport").write_text("mine.test lmtp:inet:127.0.0.1:24\n* smtp:\n")
    write_main_cf(
        tmp_path,
        virtual_mailbox_domains="mysql:/nowhere/cannot-be-read.cf",
        transport_maps=f"texthash:{tmp_path}/transport",
    )
    learned = learn_from_postfix(str(tmp_path), configured_domains=["mine.test"])
    assert learned.domains == {}
    assert set(learned.mailers) == {"local", "virtual", "lmtp"}


def test_wildcard_transport_applies_to_local_domains(tmp_path: Path) -> None:
    (tmp_path / "transport").write_text("* lmtp:unix:private/dovecot-lmtp\n")
    write_main_cf(tmp_path, transport_maps=f"texthash:{tmp_path}/transport")
    learned = learn_from_postfix(str(tmp_path))
    assert learned.mailers["lmtp"] == "postfix transport_maps (* -> mx.example.test)"


def test_a_domain_table_that_cannot_be_listed_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "domains.re").write_text("/^vmd\\.test$/ OK\n")
    write_main_cf(tmp_path, virtual_mailbox_domains=f"regexp:{tmp_path}/domains.re")
    with pytest.raises(LearnError) as raised:
        learn_from_postfix(str(tmp_path))
    message = str(raised.value)
    assert "virtual_mailbox_domains" in message
    assert f"regexp:{tmp_path}/domains.re" in message
    assert "regexp tables cannot be listed" in message
    assert "set local_domains" in message


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
    assert set(learn_from_postfix().domains) == {"from-env.test"}


def test_no_main_cf_means_no_postfix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path / "nothing"))
    with pytest.raises(MtaNotFound, match="no Postfix configuration"):
        learn_from_postfix()
    # A named directory that is not there is a plain error, not "no Postfix".
    with pytest.raises(LearnError, match=r"postconf .* failed") as raised:
        learn_from_postfix(str(tmp_path / "nothing"))
    assert not isinstance(raised.value, MtaNotFound)


def test_the_directory_named_is_the_one_reported(tmp_path: Path) -> None:
    # Postfix 3.10's postconf -c DIR can print its built-in config_directory.
    def stock_directory(argv: Sequence[str], stdin: str = "") -> CommandResult:
        result = run_command(argv, stdin)
        if "postconf" in argv[0]:
            lines = [line for line in result.stdout.splitlines() if "config_directory" not in line]
            stdout = "\n".join([*lines, "config_directory = /etc/postfix", ""])
            return CommandResult(result.returncode, stdout, result.stderr)
        return result

    learned = learn_from_postfix(str(write_main_cf(tmp_path)), run=stock_directory)
    assert learned.mta == f"postfix (config_directory {tmp_path})"


def test_postconf_failure_is_reported(tmp_path: Path) -> None:
    def broken(argv: Sequence[str], stdin: str = "") -> CommandResult:
        if "postconf" in argv[0]:
            return CommandResult(1, "", "postconf: fatal: bad things\n")
        return run_command(argv, stdin)

    with pytest.raises(LearnError, match=r"postconf .* failed: postconf: fatal: bad things"):
        learn_from_postfix(str(write_main_cf(tmp_path)), run=broken)
