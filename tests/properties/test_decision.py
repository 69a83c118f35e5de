"""Properties of the relay decision and the recipient classifier.

Above all: nothing makes the decision accept a relayed recipient for a
client that is unauthenticated, untrusted and not on the whitelist. The
oracle here says what "relayed" means without popauth's code: the MTA's
transport word is not a local one, or the domain the mail goes to is not a
local domain.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from hypothesis import assume, given
from hypothesis import strategies as st

from popauth.basics.addresses import NetworkSet
from popauth.relay.decision import (
    Budget,
    Campaign,
    Client,
    Decision,
    Listing,
    PopFirst,
    PopFirstSender,
    Reason,
    RelayBudget,
    RelayPolicy,
    Verdict,
    decide_recipient,
    decide_sender,
)
from popauth.relay.recipients import DomainSet, LocalDeliveryRules, Recipient, is_local_recipient
from tests.properties.strategies import client_addresses

LOCAL_DOMAINS = ("local.test", ".hosted.test")
LOCAL_MAILERS = frozenset({"local", "virtual"})

ADDRESS_CHARACTERS = st.sampled_from('abcxyz.@%!"\\<>[]:-_ +\n\x00éÖ\udcf6')
DOMAINS = st.sampled_from(
    ["local.test", "LOCAL.TEST.", "a.hosted.test", "hosted.test", "remote.example", "", "evil.test"]
)


@st.composite
def envelope_texts(draw: st.DrawFn) -> str:
    """Recipient texts: plain ones, routing tricks, and arbitrary garbage."""
    local = draw(st.text(ADDRESS_CHARACTERS, max_size=12))
    domain = draw(DOMAINS | st.text(ADDRESS_CHARACTERS, max_size=12))
    shape = draw(st.sampled_from(["<{l}@{d}>", "{l}@{d}", "<@relay:{l}@{d}>", "{l}", "<{l}>"]))
    return shape.format(l=local, d=domain)


@st.composite
def policies(draw: st.DrawFn) -> RelayPolicy:
    networks = draw(
        st.lists(
            st.sampled_from(["192.0.2.0/24", "10.0.0.0/8", "2001:db8::/32", "127.0.0.0/8"]),
            max_size=3,
        )
    )
    domains = draw(st.lists(st.sampled_from(LOCAL_DOMAINS), max_size=2))
    return RelayPolicy(
        trusted_networks=NetworkSet.of(ipaddress.ip_network(n) for n in networks),
        local_delivery=LocalDeliveryRules.configured(domains, LOCAL_MAILERS),
        pop_first=draw(st.sampled_from(list(PopFirst))),
        pop_first_budget=draw(st.none() | st.builds(RelayBudget, st.integers(1, 5), st.just(60.0))),
    )


def recipients() -> st.SearchStrategy[Recipient]:
    mailers = st.none() | st.sampled_from(
        ["local", "LOCAL", "virtual", "smtp", "relay", "lo\udccal"]
    )
    return st.builds(Recipient, envelope_texts(), mailers, st.none() | envelope_texts())


def oracle_domain(address: str) -> str | None:
    """The domain after the last '@', lower-cased, without '<>' and a root dot."""
    text = address.strip().strip("<>")
    if "@" not in text:
        return None
    return text.rsplit("@", 1)[1].rstrip(".").lower()


def oracle_is_local_domain(domain: str | None, policy: RelayPolicy) -> bool:
    if domain is None:
        return True  # a bare local part: the mailer decides
    (configured,) = policy.local_delivery.classes
    assert isinstance(configured.domains, DomainSet)
    return domain in configured.domains.names or any(
        domain.endswith(parent) for parent in configured.domains.parents
    )


def oracle_relayed(recipient: Recipient, policy: RelayPolicy) -> bool:
    if recipient.mailer is None or recipient.mailer.lower() not in LOCAL_MAILERS:
        return True
    addresses = [recipient.envelope] + ([recipient.resolved] if recipient.resolved else [])
    return not all(oracle_is_local_domain(oracle_domain(a), policy) for a in addresses)


@given(
    policies(),
    client_addresses() | st.none(),
    st.sampled_from([Listing.NOT_LISTED, Listing.UNAVAILABLE, Listing.NOT_CONSULTED]),
    recipients(),
    st.sampled_from(list(Budget)),
)
def test_no_relaying_for_an_unknown_client(
    policy: RelayPolicy,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    listing: Listing,
    recipient: Recipient,
    budget: Budget,
) -> None:
    """Whatever the relay budget says: a budget left grants nothing by itself."""
    assume(address is None or address not in policy.trusted_networks)
    client = Client(address, auth_user="", listing=listing, budget=budget)
    decision = decide_recipient(policy, client, recipient)
    if oracle_relayed(recipient, policy):
        assert decision.verdict is not Verdict.ACCEPT, (recipient, decision)
    if decision.verdict is Verdict.ACCEPT:
        assert decision.reason is Reason.LOCAL_RECIPIENT
    assert decide_sender(policy, client) is None


@given(policies(), client_addresses(), recipients())
def test_a_listed_client_relays_only_while_pop_first_is_on(
    policy: RelayPolicy,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    recipient: Recipient,
) -> None:
    assume(address not in policy.trusted_networks)
    decision = decide_recipient(policy, Client(address, listing=Listing.LISTED), recipient)
    if policy.pop_first is PopFirst.OFF and oracle_relayed(recipient, policy):
        assert decision.verdict is Verdict.REJECT
    if policy.pop_first is not PopFirst.OFF:
        assert decision.verdict is Verdict.ACCEPT


@given(
    st.tuples(policies(), st.sampled_from(list(PopFirstSender))).map(
        lambda drawn: dataclasses.replace(drawn[0], pop_first_sender=drawn[1])
    ),
    client_addresses(),
    st.sampled_from([Budget.SPENT, Budget.UNAVAILABLE]),
    st.tuples(
        st.lists(st.sampled_from(["joe", "ann", ""]), min_size=1, max_size=3),
        st.none() | st.sampled_from(["", "<>", "joe@local.test", "mallory@evil.test"]),
    ),
    recipients(),
)
def test_a_spent_budget_never_yields_accept_for_a_pop_first_grant(
    policy: RelayPolicy,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    budget: Budget,
    login: tuple[list[str], str | None],
    recipient: Recipient,
) -> None:
    """Whatever the sender rule, the entry's users and the sender say."""
    users, sender = login
    assume(address not in policy.trusted_networks)
    client = Client(address, "", Listing.LISTED, users[-1], tuple(users), sender, budget=budget)
    decision = decide_recipient(policy, client, recipient)
    assert decision.reason is not Reason.WHITELISTED, (client, recipient, decision)
    assert decide_sender(policy, client) is None
    if oracle_relayed(recipient, policy):
        assert decision.verdict is not Verdict.ACCEPT, (client, recipient, decision)
    if is_local_recipient(recipient, policy.local_delivery):
        # Local recipients are never the budget's to refuse.
        assert decision.reason is Reason.LOCAL_RECIPIENT
    if decision.reason in (Reason.BUDGET_SPENT, Reason.WHITELIST_UNAVAILABLE):
        # Refused for the budget alone: a temporary failure, to be retried.
        assert decision.verdict is Verdict.TEMPFAIL
        assert (decision.reason is Reason.BUDGET_SPENT) == (budget is Budget.SPENT)


@given(
    policies(),
    client_addresses(),
    st.sampled_from([Budget.NOT_COUNTED, Budget.LEFT]),
    recipients(),
)
def test_a_budget_left_relays_as_no_budget_does(
    policy: RelayPolicy,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    budget: Budget,
    recipient: Recipient,
) -> None:
    client = Client(address, listing=Listing.LISTED, sender="", login_users=("joe",))
    assert decide_recipient(policy, client._replace(budget=budget), recipient) == (
        decide_recipient(policy, client, recipient)
    )


@given(policies(), client_addresses() | st.none(), st.text(min_size=1), recipients())
def test_smtp_auth_always_relays(
    policy: RelayPolicy,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    user: str,
    recipient: Recipient,
) -> None:
    decision = decide_recipient(policy, Client(address, auth_user=user), recipient)
    assert (decision.verdict, decision.reason) == (Verdict.ACCEPT, Reason.SMTP_AUTH)


@given(recipients(), st.lists(st.sampled_from(LOCAL_DOMAINS), max_size=2))
def test_a_local_recipient_has_a_local_mailer_and_no_routing(
    recipient: Recipient, domains: list[str]
) -> None:
    if not is_local_recipient(recipient, LocalDeliveryRules.configured(domains, LOCAL_MAILERS)):
        return
    assert recipient.mailer is not None and recipient.mailer.lower() in LOCAL_MAILERS
    for address in filter(None, [recipient.envelope, recipient.resolved]):
        local_part = address.strip().strip("<>").rsplit("@", 1)[0]
        assert not set(local_part) & set('@%!"\\'), address
        assert not address.strip().startswith("<@")


USERS = st.sampled_from(["joe", "Joe", "ann", "joe@remote.example", "ann@LOCAL.test", ""])
SENDERS = st.builds(
    "{}{}@{}{}".format,
    st.sampled_from(["", "<"]),
    st.sampled_from(["joe", "JOE", "ann", "max", "jo e"]),
    DOMAINS,
    st.sampled_from(["", ">"]),
) | st.sampled_from(["", "<>", "joe", "<joe>", "@x:joe@local.test", "joe@", "@local.test"])


def oracle_owned(users: tuple[str, ...], sender: str, policy: RelayPolicy) -> bool:
    """The documented rule, written out without popauth's code."""
    text = sender.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if text.startswith("@") and ":" in text:
        text = text.split(":", 1)[1]
    if "@" not in text or text.startswith("@") or text.endswith("@"):
        return False
    local, domain = text.rsplit("@", 1)
    for user in users:
        if "@" in user:
            if user.lower().rstrip(".") == f"{local}@{domain}".lower().rstrip("."):
                return True
        elif (
            user
            and user.lower() == local.lower()
            and oracle_is_local_domain(domain.rstrip(".").lower(), policy)
        ):
            return True
    return False


@given(
    policies(),
    client_addresses(),
    st.lists(USERS, min_size=1, max_size=3).map(tuple),
    SENDERS,
    recipients(),
)
def test_own_relays_by_pop_first_only_a_sender_of_the_entrys_users(
    drawn: RelayPolicy,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    users: tuple[str, ...],
    sender: str,
    recipient: Recipient,
) -> None:
    assume(address not in drawn.trusted_networks)
    policy = dataclasses.replace(drawn, pop_first_sender=PopFirstSender.OWN)
    client = Client(address, "", Listing.LISTED, users[-1], users, sender)
    decision = decide_recipient(policy, client, recipient)
    owned = oracle_owned(users, sender, policy)
    if oracle_relayed(recipient, policy) and not owned:
        assert decision.verdict is Verdict.REJECT, (users, sender, recipient, decision)
    if sender.strip() in ("", "<>") and oracle_relayed(recipient, policy):
        assert decision.reason in (Reason.NULL_SENDER, Reason.POP_FIRST_RETIRED)
    if owned and policy.pop_first is not PopFirst.OFF:
        assert decision == Decision(Verdict.ACCEPT, Reason.WHITELISTED)
    # "warn" and "any" relay whatever the sender, as before.
    for mode in (PopFirstSender.WARN, PopFirstSender.ANY):
        relaxed = dataclasses.replace(policy, pop_first_sender=mode)
        if policy.pop_first is not PopFirst.OFF:
            assert decide_recipient(relaxed, client, recipient).verdict is Verdict.ACCEPT


@given(policies(), client_addresses() | st.none(), st.text(min_size=1), SENDERS, recipients())
def test_smtp_auth_is_never_asked_for_its_sender(
    drawn: RelayPolicy,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    user: str,
    sender: str,
    recipient: Recipient,
) -> None:
    policy = dataclasses.replace(drawn, pop_first_sender=PopFirstSender.OWN)
    client = Client(address, auth_user=user, sender=sender)
    assert decide_recipient(policy, client, recipient).reason is Reason.SMTP_AUTH


# --- the phase-out campaign -------------------------------------------------

MOMENTS = st.sampled_from([0.0, 999.0, 1000.0, 1001.0, 5000.0])


@st.composite
def campaign_cases(
    draw: st.DrawFn,
) -> tuple[RelayPolicy, ipaddress.IPv4Address | ipaddress.IPv6Address, Client]:
    """A policy in some campaign, and a whitelisted client at some moment of it."""
    drawn = draw(policies())
    address = draw(client_addresses())
    assume(address not in drawn.trusted_networks)
    users = draw(st.lists(USERS, min_size=1, max_size=3, unique=True).map(tuple))
    campaign = Campaign(
        retire_at=draw(st.none() | MOMENTS),
        exempt_users=frozenset(draw(st.lists(USERS | st.just("max"), max_size=3))),
        graduate=draw(st.booleans()),
    )
    policy = dataclasses.replace(
        drawn,
        pop_first=draw(st.sampled_from([PopFirst.ON, PopFirst.WARN])),
        pop_first_sender=draw(st.sampled_from(list(PopFirstSender))),
        campaign=campaign,
    )
    graduated = frozenset(draw(st.lists(st.sampled_from(users), max_size=3)))
    client = Client(
        address,
        "",
        Listing.LISTED,
        users[-1],
        users,
        draw(st.none() | SENDERS),
        now=draw(MOMENTS),
        graduated_users=graduated,
    )
    return policy, address, client


def _deciding_users(policy: RelayPolicy, client: Client) -> tuple[str, ...]:
    """Whose grant it may be: every user of the entry, or with "own" the sender's owners."""
    if policy.pop_first_sender is not PopFirstSender.OWN:
        return client.login_users
    if client.sender is None:
        return ()
    return tuple(u for u in client.login_users if oracle_owned((u,), client.sender, policy))


@given(
    campaign_cases(),
    st.sampled_from([Listing.NOT_LISTED, Listing.UNAVAILABLE, Listing.NOT_CONSULTED]),
    recipients(),
)
def test_no_campaign_setting_lets_a_stranger_relay(
    case: tuple[RelayPolicy, ipaddress.IPv4Address | ipaddress.IPv6Address, Client],
    listing: Listing,
    recipient: Recipient,
) -> None:
    policy, _, listed = case
    # The same facts, all of them exempt, but not on the whitelist.
    stranger = listed._replace(listing=listing)
    exempting = dataclasses.replace(
        policy,
        campaign=dataclasses.replace(policy.campaign, exempt_users=frozenset(listed.login_users)),
    )
    for each in (policy, exempting):
        decision = decide_recipient(each, stranger, recipient)
        if oracle_relayed(recipient, each):
            assert decision.verdict is not Verdict.ACCEPT, (recipient, decision)
        assert decide_sender(each, stranger) is None


@given(campaign_cases(), recipients(), st.data())
def test_an_exempt_user_is_never_refused_for_retirement(
    case: tuple[RelayPolicy, ipaddress.IPv4Address | ipaddress.IPv6Address, Client],
    recipient: Recipient,
    data: st.DataObject,
) -> None:
    drawn, _, client = case
    if not _deciding_users(drawn, client):
        # "own" and a sender none of them owns: that refusal is not the campaign's.
        drawn = dataclasses.replace(drawn, pop_first_sender=PopFirstSender.ANY)
    deciding = _deciding_users(drawn, client)
    candidates = [u for u in deciding if u not in client.graduated_users]
    if drawn.campaign.graduate and not candidates:
        # All of them graduated: that refusal is not the retirement's either.
        drawn = dataclasses.replace(
            drawn, campaign=dataclasses.replace(drawn.campaign, graduate=False)
        )
    if not drawn.campaign.graduate:
        candidates = list(deciding)
    exempt = drawn.campaign.exempt_users | {data.draw(st.sampled_from(candidates))}
    policy = dataclasses.replace(
        drawn, campaign=dataclasses.replace(drawn.campaign, exempt_users=exempt)
    )
    decision = decide_recipient(policy, client, recipient)
    assert decision.reason is not Reason.POP_FIRST_RETIRED, (client, decision)
    assert decision == Decision(Verdict.ACCEPT, Reason.WHITELISTED)


@given(campaign_cases(), recipients())
def test_a_graduated_user_is_never_granted_by_pop_first(
    case: tuple[RelayPolicy, ipaddress.IPv4Address | ipaddress.IPv6Address, Client],
    recipient: Recipient,
) -> None:
    drawn, _, client = case
    policy = dataclasses.replace(drawn, campaign=dataclasses.replace(drawn.campaign, graduate=True))
    deciding = _deciding_users(policy, client)
    assume(all(user in client.graduated_users for user in deciding))
    decision = decide_recipient(policy, client, recipient)
    assert decision.reason is not Reason.WHITELISTED, (client, decision)
    assert decide_sender(policy, client) is None
    if oracle_relayed(recipient, policy):
        assert decision.verdict is Verdict.REJECT


@given(campaign_cases(), recipients())
def test_before_the_date_and_without_graduation_the_campaign_changes_nothing(
    case: tuple[RelayPolicy, ipaddress.IPv4Address | ipaddress.IPv6Address, Client],
    recipient: Recipient,
) -> None:
    policy, _, client = case
    assume(not policy.campaign.graduate and not policy.campaign.retired(client.now))
    without = dataclasses.replace(policy, campaign=Campaign())
    assert decide_recipient(policy, client, recipient) == decide_recipient(
        without, client, recipient
    )


@given(campaign_cases(), recipients())
def test_after_the_date_only_exempt_users_relay_by_pop_first(
    case: tuple[RelayPolicy, ipaddress.IPv4Address | ipaddress.IPv6Address, Client],
    recipient: Recipient,
) -> None:
    policy, _, client = case
    # Made retired rather than filtered (assume() threw away most cases).
    campaign = policy.campaign
    if campaign.retire_at is None:
        campaign = dataclasses.replace(campaign, retire_at=0.0)
        policy = dataclasses.replace(policy, campaign=campaign)
    if campaign.retire_at is not None and not campaign.retired(client.now):
        client = client._replace(now=campaign.retire_at)
    assert policy.campaign.retired(client.now)
    decision = decide_recipient(policy, client, recipient)
    if decision.reason is Reason.WHITELISTED:
        assert any(u in policy.campaign.exempt_users for u in _deciding_users(policy, client))
