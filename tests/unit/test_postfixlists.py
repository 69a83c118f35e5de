"""Postfix's list and transport(5) matching, in memory, against examples from its source."""

from __future__ import annotations

import pytest

from popauth.relay.postfixlists import (
    ListKind,
    ListPattern,
    PostfixList,
    RelevantDomains,
    TransportRoutes,
    is_valid_hostname,
    proper_parents,
)


def name(text: str) -> ListPattern:
    return ListPattern(not text.startswith("!"), text.lstrip("!"))


def table(*keys: str, positive: bool = True) -> ListPattern:
    return ListPattern(positive, "hash:/t", frozenset(keys))


def string_list(*patterns: ListPattern) -> PostfixList:
    return PostfixList(patterns, ListKind.STRING)


def domain_list(*patterns: ListPattern, parent: bool) -> PostfixList:
    return PostfixList(patterns, ListKind.DOMAIN, parent)


def test_proper_parents() -> None:
    assert list(proper_parents("a.b.c")) == ["b.c", "c"]
    assert list(proper_parents("c")) == []


@pytest.mark.parametrize(
    ("hostname", "valid"),
    [
        ("example.test", True),
        ("a_b.example", True),
        ("x-1.test", True),
        ("123", False),
        ("1.2.3.4", False),
        ("1.2.3.x", True),
        ("-a.test", False),
        ("a-.test", False),
        ("a..test", False),
        ("a.test.", False),
        ("", False),
        ("bücher.test", False),
        ("a*b.test", False),
        ("a" * 64 + ".test", False),
        ("a" * 63 + ".test", True),
        (("a" * 50 + ".") * 5 + "test", False),
    ],
)
def test_valid_hostname_as_postfix(hostname: str, valid: bool) -> None:
    assert is_valid_hostname(hostname) is valid


def test_a_string_list_matches_exact_names_only() -> None:
    compiled = string_list(name("example.test"), name(".hosted.test"), table("t.test", ".u.test"))
    assert compiled.matches("example.test")
    assert compiled.matches("t.test")
    for other in ("sub.example.test", "x.hosted.test", "hosted.test", "x.t.test", "x.u.test"):
        assert not compiled.matches(other), other


def test_the_first_matching_pattern_decides() -> None:
    compiled = domain_list(name("!customer.backup.test"), name("backup.test"), parent=True)
    assert compiled.matches("backup.test")
    assert compiled.matches("x.backup.test")
    assert not compiled.matches("customer.backup.test")
    # Parent matching applies to exclusions too.
    assert not compiled.matches("x.customer.backup.test")
    later = domain_list(name("backup.test"), name("!customer.backup.test"), parent=True)
    assert later.matches("customer.backup.test")


def test_parent_style_decides_what_a_domain_pattern_covers() -> None:
    parents = domain_list(name("example.test"), name(".dotted.test"), parent=True)
    assert parents.matches("a.b.example.test")
    assert not parents.matches("notexample.test")
    # ".name" is no pattern for a parent-style list.
    assert not parents.matches("a.dotted.test")
    dots = domain_list(name("example.test"), name(".dotted.test"), parent=False)
    assert dots.matches("example.test")
    assert not dots.matches("a.example.test")
    assert dots.matches("a.b.dotted.test")
    assert not dots.matches("dotted.test")


def test_tables_are_searched_by_name_then_parents_in_the_list_style() -> None:
    parents = domain_list(table("example.test", ".dotted.test"), parent=True)
    assert parents.matches("a.example.test")
    assert not parents.matches("a.dotted.test")
    dots = domain_list(table("example.test", ".dotted.test"), parent=False)
    assert not dots.matches("a.example.test")
    assert dots.matches("a.dotted.test")
    excluded = domain_list(
        table("customer.backup.test", positive=False), name("backup.test"), parent=True
    )
    assert not excluded.matches("x.customer.backup.test")
    assert excluded.matches("x.backup.test")


def test_an_exclusion_after_a_table_hit_does_not_count() -> None:
    compiled = domain_list(table("backup.test"), name("!customer.backup.test"), parent=True)
    assert compiled.matches("customer.backup.test")
    assert not compiled.contains_domain("customer.backup.test.")  # not a hostname


def test_transport_search_order() -> None:
    routes = TransportRoutes(
        {
            "user+ext@example.test": "full",
            "user@example.test": "bare",
            "example.test": "domain",
            "parent.test": "parent-style",
            ".parent.test": "dotted",
            "*": "wildcard",
        },
        parent_style=False,
        recipient_delimiter="+",
    )
    assert routes.transport_for("user+ext@example.test") == "full"
    assert routes.transport_for("user+other@example.test") == "bare"
    assert routes.transport_for("someone@example.test") == "domain"
    assert routes.transport_for("someone@a.parent.test") == "dotted"
    # The domain key itself, not its ".domain" form, for the domain.
    assert routes.transport_for("someone@parent.test") == "parent-style"
    assert routes.transport_for("someone@remote.example") == "wildcard"
    parent_style = TransportRoutes(routes.entries, parent_style=True)
    assert parent_style.transport_for("someone@a.parent.test") == "parent-style"
    # No delimiter: no extension is stripped.
    assert parent_style.transport_for("user+other@example.test") == "domain"


@pytest.mark.parametrize(
    ("local", "delimiters", "special", "route"),
    [
        ("user", "+", True, "user"),
        ("user+ext", "+", True, "user"),
        ("user-ext", "+-", True, "user"),
        ("postmaster+x", "+", True, None),
        ("mailer-daemon", "-", True, None),
        ("double-bounce", "-", True, None),
        ("owner-list", "-", True, None),
        ("list-request", "-", True, None),
        ("list-request", "-", False, "list"),
        ("+ext", "+", True, None),
        ("user+ext", "", True, None),
    ],
)
def test_extensions_are_stripped_as_split_addr_does(
    local: str, delimiters: str, special: bool, route: str | None
) -> None:
    routes = TransportRoutes(
        {"user@example.test": "user", "list@example.test": "list", "owner@example.test": "owner"},
        recipient_delimiter=delimiters,
        unsplit_local_parts=frozenset({"postmaster", "mailer-daemon", "double-bounce"}),
        owner_request_special=special,
    )
    assert routes.transport_for(f"{local}@example.test") == route


def test_relevant_transport_keys() -> None:
    relevant = RelevantDomains.of_lists(
        [
            string_list(name("example.test"), name("!excluded.test")),
            domain_list(name("backup.test"), parent=True),
            domain_list(name(".dotted.test"), table("listed.test"), parent=False),
        ]
    )
    wanted = [
        "*",
        "user@example.test",
        "example.test",
        "test",
        ".test",
        "x.backup.test",
        "backup.test",
        "user@a.backup.test",
        "a.dotted.test",
        ".dotted.test",
        "listed.test",
    ]
    for key in wanted:
        assert relevant.wants_key(key, parent_style=False) or relevant.wants_key(
            key, parent_style=True
        ), key
    unwanted = ["user@remote.example", "remote.example", ".example", "excluded.test", "@x.test"]
    for key in unwanted:
        assert not relevant.wants_key(key, parent_style=False), key
        assert not relevant.wants_key(key, parent_style=True), key
    # A ".domain" key is never looked up in parent style, a bare one only for itself.
    assert not relevant.wants_key("sub.example.test", parent_style=False)
    assert not relevant.wants_key(".example.test", parent_style=False)
    assert relevant.wants_key(".backup.test", parent_style=False)
