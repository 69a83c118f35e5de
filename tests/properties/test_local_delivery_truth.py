"""popauth's idea of "delivered here" against Postfix's own, over generated layouts.

For each generated main.cf (the four address-class lists with names,
``.names``, ``!`` exclusions, ``hash:``, ``texthash:`` and ``inline:`` tables
whose values vary, and files; parent_domain_matches_subdomains;
the class transports, some of them the default transport's word; a
transport_maps table with per-address, per-domain, ``.domain`` and ``*``
routes), popauth learns with the real postconf and postmap, and Postfix's
trivial-rewrite (tests.support.trivial_rewrite) resolves each probe address
as smtpd does for a RCPT. The recipient popauth is then shown is the one a
milter would see: ``{rcpt_mailer}`` and ``{rcpt_addr}`` from that answer.
popauth must call it local exactly when Postfix's reject_unauth_destination
would let a stranger's mail to it through: never more (an open relay),
never less (refused inbound mail). And only with the mailer Postfix uses
for that very address: the same recipient with any other ``{rcpt_mailer}``
is refused, so a transport_maps route to ``smtp`` for one address makes
``smtp`` local for that address only.
"""

from __future__ import annotations

import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from popauth.localdelivery.postfix import learn_from_postfix
from popauth.relay.recipients import Recipient, is_local_recipient
from tests.support.settled import write_settled
from tests.support.trivial_rewrite import Resolution, TrivialRewrite

BASES = ("example.test", "backup.test", "hosted.test")
NAMES = tuple(f"{prefix}{base}" for base in BASES for prefix in ("", "a.", "b.a.", "customer."))
LOCAL_PARTS = ("user", "legacy", "user+ext", "postmaster")
TRANSPORT_VALUES = (
    "smtp:[192.0.2.10]",
    "lmtp:unix:private/x",
    "local",
    "relay",
    ":[192.0.2.1]",
    "error:gone",
)
TABLE_VALUES = ("OK", "REJECT", "DUNNO")
MAILERS = ("smtp", "relay", "local", "virtual", "lmtp", "error")
PARENT_STYLES = (
    None,
    "",
    "relay_domains",
    "transport_maps",
    "relay_domains, transport_maps",
    "!relay_domains, relay_domains, transport_maps",
)


@dataclass
class Layout:
    main_cf: dict[str, str]
    # File name -> text; "hash" ones are made into .db with postmap.
    files: dict[str, str] = field(default_factory=dict)
    hashed: list[str] = field(default_factory=list)


def name_patterns() -> st.SearchStrategy[str]:
    names = st.sampled_from(NAMES)
    return st.builds(
        lambda bang, dot, name: ("!" if bang else "") + ("." if dot else "") + name,
        st.booleans(),
        st.integers(0, 3).map(lambda n: n == 0),
        names,
    )


@st.composite
def domain_lists(draw: st.DrawFn, parameter: str, layout: Layout) -> str:
    items: list[str] = []
    for index in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["name", "name", "table", "file"]))
        bang = "!" if draw(st.integers(0, 3)) == 0 else ""
        if kind == "name":
            items.append(draw(name_patterns()))
            continue
        # Unique: a texthash table with a duplicate key fails every lookup.
        entries = draw(
            st.lists(name_patterns().map(lambda p: p.lstrip("!")), max_size=4, unique=True)
        )
        file_name = f"{parameter}-{index}"
        if kind == "file":
            layout.files[file_name] = "".join(f"{entry}\n" for entry in entries)
            items.append(f"{bang}{{dir}}/{file_name}")
            continue
        # Upper case keys: Postfix matches them only where it folds the table.
        keys = [entry.upper() if draw(st.integers(0, 4)) == 0 else entry for entry in entries]
        # The value is ignored: REJECT in a domain list still lists the domain.
        values = draw(
            st.lists(st.sampled_from(TABLE_VALUES), min_size=len(keys), max_size=len(keys))
        )
        table_type = draw(st.sampled_from(["texthash", "hash", "inline"]))
        if table_type == "inline" and not keys:
            table_type = "texthash"  # Postfix refuses an empty inline:{}
        if table_type == "inline":
            pairs = ", ".join(f"{key}={value}" for key, value in zip(keys, values, strict=True))
            items.append(f"{bang}inline:{{{{{pairs}}}}}")
            continue
        lines = (f"{key} {value}\n" for key, value in zip(keys, values, strict=True))
        layout.files[file_name] = "".join(lines)
        if table_type == "hash":
            layout.hashed.append(file_name)
        items.append(f"{bang}{table_type}:{{dir}}/{file_name}")
    return ", ".join(items)


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    layout = Layout(
        main_cf={
            "compatibility_level": "3.6",
            "myhostname": "mx.example.test",
            "mydomain": "example.test",
            "inet_interfaces": "127.0.0.1",
            "local_transport": draw(st.sampled_from(["local", "local:$myhostname"])),
            "virtual_transport": draw(st.sampled_from(["virtual", "lmtp:unix:private/x"])),
            "relay_transport": draw(st.sampled_from(["relay", "smtp"])),
            "default_transport": draw(st.sampled_from(["smtp", "relay"])),
            "recipient_delimiter": draw(st.sampled_from(["", "+"])),
        }
    )
    for parameter in (
        "mydestination",
        "virtual_alias_domains",
        "virtual_mailbox_domains",
        "relay_domains",
    ):
        layout.main_cf[parameter] = draw(domain_lists(parameter, layout))
    parent_style = draw(st.sampled_from(PARENT_STYLES))
    if parent_style is not None:
        layout.main_cf["parent_domain_matches_subdomains"] = parent_style
    keys = st.one_of(
        st.builds(
            lambda local, name: f"{local}@{name}",
            st.sampled_from(LOCAL_PARTS),
            st.sampled_from(NAMES),
        ),
        name_patterns().map(lambda p: p.lstrip("!")),
        st.just("*"),
    )
    routes = draw(
        st.lists(
            st.tuples(keys, st.sampled_from(TRANSPORT_VALUES)),
            max_size=5,
            unique_by=lambda route: route[0],
        )
    )
    if routes:
        layout.files["transport"] = "".join(f"{key} {value}\n" for key, value in routes)
        table_type = draw(st.sampled_from(["texthash", "hash"]))
        if table_type == "hash":
            layout.hashed.append("transport")
        layout.main_cf["transport_maps"] = f"{table_type}:{{dir}}/transport"
    return layout


def write_layout(layout: Layout, directory: Path) -> None:
    for file_name, text in layout.files.items():
        write_settled(directory / file_name, text)
    main = "".join(
        f"{key} = {value.format(dir=directory)}\n" for key, value in layout.main_cf.items()
    )
    write_settled(directory / "main.cf", main)
    (directory / "master.cf").write_text("")
    for file_name in layout.hashed:
        table = f"hash:{directory / file_name}"
        subprocess.run(["postmap", "-c", str(directory), table], check=True, timeout=20)


def probes() -> st.SearchStrategy[list[str]]:
    domains = st.sampled_from(NAMES) | st.sampled_from(["x.customer.backup.test", "remote.example"])
    address = st.builds(
        lambda local, domain: f"{local}@{domain}", st.sampled_from(LOCAL_PARTS), domains
    )
    return st.lists(address, min_size=6, max_size=10, unique=True)


@settings(max_examples=40)
@given(layouts(), probes())
def test_popauth_calls_local_what_postfix_delivers_here(
    layout: Layout, addresses: list[str]
) -> None:
    with tempfile.TemporaryDirectory(prefix="popauth-truth-") as name:
        directory = Path(name)
        write_layout(layout, directory)
        rules = learn_from_postfix(str(directory)).rules()
        postfix = TrivialRewrite(directory)
        with ThreadPoolExecutor(4) as pool:
            answers: list[Resolution] = list(pool.map(postfix.resolve, addresses))
        for address, answer in zip(addresses, answers, strict=True):
            if answer.failed:
                continue  # smtpd answers 451 itself; no milter sees the RCPT
            # The mailer Postfix sends, and every other word: only Postfix's own
            # transport for that very address counts, and only in an inbound class.
            for mailer in {answer.transport, *MAILERS}:
                recipient = Recipient(f"<{address}>", mailer, answer.recipient)
                expected = answer.inbound and mailer == answer.transport
                assert is_local_recipient(recipient, rules) is expected, (
                    address,
                    mailer,
                    answer,
                    (directory / "main.cf").read_text(),
                )
