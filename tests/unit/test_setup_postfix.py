"""``popauth setup postfix``'s pure parts: where each door goes in the relay restrictions."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from popauth.basics.addresses import NetworkSet
from popauth.setup.postfix import policy_entry, relay_restrictions

TRUSTED = NetworkSet.of([ipaddress.ip_network("127.0.0.0/8")])
POLICY = "check_policy_service unix:popauth/policy.sock"
TABLE = "check_client_access cidr:/etc/postfix/popauth-relay.cidr"


def test_the_policy_door_comes_after_local_mail_and_before_the_final_refusal() -> None:
    relay, refusals = relay_restrictions(
        "permit_mynetworks, permit_sasl_authenticated, reject_non_fqdn_recipient,"
        " defer_unauth_destination",
        POLICY,
        "127.0.0.0/8",
        TRUSTED,
        ours=frozenset({TABLE}),
        before=["permit_auth_destination"],
    )
    assert refusals == []
    assert relay == [
        "reject_non_fqdn_recipient",
        "permit_auth_destination",
        POLICY,
        "reject_unauth_destination",
    ]


def test_switching_doors_drops_the_other_doors_check() -> None:
    relay, refusals = relay_restrictions(
        f"{TABLE}, reject_unauth_destination", POLICY, "", TRUSTED, ours=frozenset({TABLE})
    )
    assert refusals == []
    assert relay == [POLICY, "reject_unauth_destination"]
    relay, refusals = relay_restrictions(
        f"permit_auth_destination, {POLICY}, reject_unauth_destination",
        TABLE,
        "",
        TRUSTED,
        ours=frozenset({POLICY}),
    )
    assert refusals == []
    assert relay == [TABLE, "reject_unauth_destination"]


def test_another_policy_service_is_refused() -> None:
    _, refusals = relay_restrictions(
        "check_policy_service inet:127.0.0.1:10023, reject_unauth_destination",
        POLICY,
        "",
        TRUSTED,
        ours=frozenset({TABLE}),
    )
    assert len(refusals) == 1
    assert "check_policy_service inet:127.0.0.1:10023" in refusals[0]


def test_the_policy_socket_as_smtpd_names_it() -> None:
    queue = "/var/spool/postfix"
    inside = Path("/var/spool/postfix/popauth/policy.sock")
    assert policy_entry(inside, queue, chrooted=True) == ("unix:popauth/policy.sock", "")
    outside = Path("/run/popauth/policy.sock")
    assert policy_entry(outside, queue, chrooted=False) == ("unix:/run/popauth/policy.sock", "")
    entry, why_not = policy_entry(outside, queue, chrooted=True)
    assert entry == "" and "outside Postfix's queue directory" in why_not
    entry, why_not = policy_entry(None, queue, chrooted=True)
    assert entry == "" and "no policy_socket" in why_not
