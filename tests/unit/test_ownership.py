"""The sender ownership rule and the file of extra addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from popauth.relay.ownership import (
    SenderFileError,
    SenderOwners,
    parse_sender_addresses,
    sender_address,
)
from popauth.relay.recipients import LocalDeliveryRules

LOCAL = LocalDeliveryRules.configured(["example.org", ".hosted.test"], ["local"])


def owned(owners: SenderOwners, users: tuple[str, ...], sender: str) -> bool:
    return owners.owners_include(users, sender, LOCAL)


@pytest.mark.parametrize(
    ("sender", "parsed"),
    [
        ("<joe@Example.ORG.>", ("joe", "example.org")),
        ("JOE@example.org", ("joe", "example.org")),
        ("<@relay.test:joe@example.org>", ("joe", "example.org")),
        ("<>", None),
        ("", None),
        ("joe", None),
        ("@example.org", None),
    ],
)
def test_sender_addresses(sender: str, parsed: tuple[str, str] | None) -> None:
    assert sender_address(sender) == parsed


def test_a_plain_login_owns_its_name_at_every_local_domain() -> None:
    owners = SenderOwners()
    assert owned(owners, ("joe",), "<joe@example.org>")
    assert owned(owners, ("Joe",), "<JOE@a.hosted.test>")
    assert not owned(owners, ("joe",), "<joe@remote.example>")
    assert not owned(owners, ("joe",), "<ann@example.org>")
    assert owned(owners, ("ann", "joe"), "<joe@example.org>")  # any user of the entry
    assert not owned(owners, ("joe",), "<>")


def test_an_address_login_owns_itself_only() -> None:
    owners = SenderOwners()
    assert owned(owners, ("joe@remote.example",), "<Joe@Remote.Example>")
    assert not owned(owners, ("joe@remote.example",), "<joe@example.org>")


def test_the_file_adds_addresses_and_domains() -> None:
    owners = parse_sender_addresses(
        "# aliases\n"
        "joe: joe.smith@example.org @Family.Example  # his family's domain\n"
        "\n"
        "JOE: j@other.example\n"
    )
    assert owned(owners, ("joe",), "<Joe.Smith@example.org>")
    assert owned(owners, ("Joe",), "<anyone@family.example>")
    assert owned(owners, ("joe",), "<j@other.example>")
    assert not owned(owners, ("ann",), "<j@other.example>")


@pytest.mark.parametrize(
    "text",
    ["joe joe@example.org", "joe:", ": joe@example.org", "joe: <joe@example.org>", "joe: nobody"],
)
def test_a_bad_line_is_refused_with_its_number(text: str) -> None:
    with pytest.raises(SenderFileError, match="line 2"):
        parse_sender_addresses("ann: ann@example.org\n" + text)


def test_the_file_setting_is_read_at_start_and_a_bad_one_refused(tmp_path: Path) -> None:
    from popauth.config import ConfigError, settings_from_mapping
    from popauth.localdelivery import LocalDelivery

    good = tmp_path / "senders"
    good.write_text("joe: @family.example\n")
    settings = settings_from_mapping(
        {"pop_first_sender": "own", "pop_first_sender_addresses": str(good)}
    )
    policy = settings.relay.policy(LocalDelivery.configured(["example.org"], ["local"]))
    assert policy.sender_owners.owners_include(("joe",), "<x@family.example>", LOCAL)
    bad = tmp_path / "bad"
    bad.write_text("joe joe@example.org\n")
    with pytest.raises(ConfigError, match=r"pop_first_sender_addresses.*line 1"):
        settings_from_mapping({"pop_first_sender_addresses": str(bad)})
    with pytest.raises(ConfigError, match="pop_first_sender_addresses"):
        settings_from_mapping({"pop_first_sender_addresses": str(tmp_path / "missing")})


def test_smtpd_sender_login_maps_is_searched_as_postfix_does() -> None:
    from popauth.relay.ownership import login_map_entries

    owners = SenderOwners(
        login_map=login_map_entries(
            [
                ("Shared@Example.org", "carol, Dave"),
                ("postmaster", "eve"),  # a bare local part: local domains only
                ("@partner.test", "carol"),
                ("shared@example.org", "mallory"),  # a later duplicate: the first wins
            ]
        )
    )
    assert owned(owners, ("dave",), "<shared@example.org>")
    assert not owned(owners, ("mallory",), "<shared@example.org>")
    assert owned(owners, ("eve",), "<postmaster@example.org>")
    assert not owned(owners, ("eve",), "<postmaster@remote.example>")
    assert owned(owners, ("carol",), "<anyone@partner.test>")
    assert not owned(owners, ("dave",), "<anyone@partner.test>")


def test_check_config_names_the_sender_tables_it_cannot_list() -> None:
    from popauth.localdelivery import LocalDelivery

    learned = LocalDelivery(
        LocalDelivery.configured(["example.org"], ["local"]).classes,
        "postfix",
        (),
        (("shared@example.org", frozenset({"carol"})),),
        ("pcre:/etc/postfix/senders.pcre",),
    )
    lines = learned.describe()
    assert "smtpd_sender_login_maps: 1 senders learned" in lines
    assert any(
        line.startswith("smtpd_sender_login_maps: pcre:/etc/postfix/senders.pcre cannot")
        for line in lines
    )
