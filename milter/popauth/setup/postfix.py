"""``popauth setup postfix``: hand Postfix's relay decision to popauth, fail closed.

The changes, as ``postconf -e`` lines for main.cf (comments, other settings
and master.cf's ``-o`` overrides stay as they are):

- ``smtpd_relay_restrictions``: the site's own rejections first, then a
  table that answers OK for every client (popauth decides), then
  ``reject_unauth_destination`` (Postfix refuses a list ending in a bare
  permit);
- ``smtpd_milters``: the milters already there, then popauth's socket as
  Postfix names it (inside the queue directory for a chrooted smtpd);
- ``milter_default_action = tempfail`` (or, beside other milters that rely
  on another default, a per-milter ``default_action=tempfail``);
- SMTP AUTH through Dovecot, when Dovecot's listener is there.

With ``--door policy`` popauth's policy door judges instead of the milter:
``smtpd_relay_restrictions`` gets the site's rejections, then
``permit_auth_destination`` (Postfix knows what it delivers here), then
``check_policy_service`` on popauth's ``policy_socket``, then
``reject_unauth_destination``; popauth's milter leaves ``smtpd_milters``,
and ``smtpd_policy_service_default_action`` must stay a 4xx (fail closed).

It refuses when the configuration lets clients relay that popauth would
refuse (``permit_mynetworks`` with networks popauth does not trust, an
access table or policy service that may answer OK) or would refuse what
popauth allows (``reject_unauth_destination`` in recipient restrictions).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from pathlib import Path

from popauth.basics.addresses import NetworkSet
from popauth.basics.errors import UnavailableError
from popauth.config import Settings
from popauth.localdelivery.postfix import split_list
from popauth.setup import FileChange, Plan, run

RELAY_TABLE_NAME = "popauth-relay.cidr"
RELAY_TABLE = """\
# popauth: let every client past Postfix's own relay check, because popauth
# (with milter_default_action = tempfail) makes the relay decision. Never use
# this table without the popauth milter. Written by popauth setup postfix.
0.0.0.0/0   OK
::/0        OK
"""
PARAMETERS = (
    "config_directory",
    "queue_directory",
    "smtpd_relay_restrictions",
    "smtpd_recipient_restrictions",
    "smtpd_milters",
    "milter_default_action",
    "mynetworks",
    "smtpd_sasl_auth_enable",
    "smtpd_sasl_type",
    "smtpd_sasl_path",
    "smtpd_policy_service_default_action",
)
# What Postfix answers when the policy door cannot be reached (its default).
POLICY_DEFAULT_ACTION = "451 4.3.5 Server configuration problem"
SASL = (
    ("smtpd_sasl_auth_enable", "yes"),
    ("smtpd_sasl_type", "dovecot"),
    ("smtpd_sasl_path", "private/auth"),
)
# Restrictions that never let a client relay: kept, in front of popauth's table.
_STRICT_PREFIXES = ("reject_", "defer_", "warn_if_reject", "sleep")
_STRICT_WORDS = frozenset({"reject", "defer", "defer_if_permit", "defer_if_reject"})
# What popauth's own decision already covers (SMTP AUTH, the final check).
_COVERED = frozenset(
    {
        "permit_sasl_authenticated",
        "reject_unauth_destination",
        "defer_unauth_destination",
        "permit_auth_destination",
    }
)

Postconf = Callable[[Sequence[str]], dict[str, str]]


def read_postconf(command: Sequence[str]) -> Callable[[Sequence[str]], dict[str, str]]:
    """``postconf -x`` of some names, as a mapping (values with $names expanded)."""

    def read(arguments: Sequence[str]) -> dict[str, str]:
        done = run([*command, *arguments])
        if done.returncode != 0:
            raise PostfixUnreadable(done.stderr.strip() or f"{command[0]} failed")
        values: dict[str, str] = {}
        for line in done.stdout.splitlines():
            name, equals, value = line.partition(" = ")
            if equals:
                values[name.strip()] = value.strip()
            elif line.endswith(" ="):
                values[line[:-2].strip()] = ""
        return values

    return read


class PostfixUnreadable(UnavailableError):
    """postconf could not be run or read."""


def milter_entry(socket_spec: str, queue_directory: str, chrooted: bool) -> tuple[str, str]:
    """How smtpd_milters names popauth's socket, or "" and why it cannot."""
    kind, _, rest = socket_spec.partition(":")
    if kind in ("unix", "local"):
        path = Path(rest)
        queue = Path(queue_directory)
        if path.is_relative_to(queue):
            # Relative to the queue directory: right for a chrooted smtpd and an unchrooted one.
            return f"unix:{path.relative_to(queue)}", ""
        if chrooted:
            return "", (
                f"popauth's milter_socket {socket_spec} is outside Postfix's queue directory"
                f" ({queue_directory}) and smtpd runs chrooted there, so it cannot reach it:"
                f' set milter_socket = "unix:{queue_directory}/popauth/milter.sock"'
            )
        return f"unix:{path}", ""
    port, _, host = rest.partition("@")
    return f"{kind}:{host or '127.0.0.1'}:{port}", ""


def _same_milter(entry: str, ours: str, queue_directory: str) -> bool:
    name = entry.strip("{} ").split(",")[0].strip()
    forms = {ours}
    if ours.startswith("unix:") and not ours.startswith("unix:/"):
        relative = ours[len("unix:") :]
        forms |= {f"unix:/{relative}", f"unix:{queue_directory}/{relative}"}
    forms |= {form.replace("unix:", "local:", 1) for form in forms}
    return name in forms


def _networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
    """mynetworks as networks; None when it names a table or file (not checkable here)."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for item in split_list(text):
        literal = item.replace("[", "").replace("]", "")
        try:
            network = ipaddress.ip_network(literal, strict=False)
        except ValueError:
            return None
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
            mapped = network.network_address.ipv4_mapped
            if mapped is not None:
                network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False)
        networks.append(network)
    return networks


def _untrusted(mynetworks: str, trusted: NetworkSet) -> list[str] | None:
    """The networks of mynetworks that popauth's trusted networks do not cover."""
    networks = _networks(mynetworks)
    if networks is None:
        return None
    return [
        str(network)
        for network in networks
        if not (
            any(network.subnet_of(other) for other in trusted.v4)
            if isinstance(network, ipaddress.IPv4Network)
            else any(network.subnet_of(other) for other in trusted.v6)
        )
    ]


def relay_restrictions(
    current: str,
    our_check: str,
    mynetworks: str,
    trusted: NetworkSet,
    *,
    ours: frozenset[str] = frozenset(),
    before: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """The new smtpd_relay_restrictions, and the reasons to refuse.

    ``ours``: popauth's checks for the other door, dropped when switching;
    ``before``: restrictions that go right before ``our_check``.
    """
    items = split_list(current)
    kept: list[str] = []
    refusals: list[str] = []
    index = 0
    while index < len(items):
        item = items[index]
        index += 1
        if item.startswith("check_") and index < len(items):
            table = items[index]
            index += 1
            if f"{item} {table}" == our_check or f"{item} {table}" in ours:
                continue
            refusals.append(
                f"smtpd_relay_restrictions has {item} {table}, which may let clients relay that"
                " popauth would refuse: put those clients in popauth's trusted_networks (or"
                " remove the check) and run setup again"
            )
            continue
        if item in _COVERED:
            continue
        if item == "permit_mynetworks":
            untrusted = _untrusted(mynetworks, trusted)
            if untrusted is None:
                refusals.append(
                    f"smtpd_relay_restrictions has permit_mynetworks and mynetworks ({mynetworks})"
                    " names a table or file: list those networks in popauth's trusted_networks"
                    " and mynetworks as addresses, or drop permit_mynetworks"
                )
            elif untrusted:
                refusals.append(
                    "smtpd_relay_restrictions has permit_mynetworks, and mynetworks has"
                    f" {', '.join(untrusted)}, which popauth's trusted_networks does not: those"
                    " clients relay now and would be refused; add them to trusted_networks"
                )
            continue
        if item in _STRICT_WORDS or item.startswith(_STRICT_PREFIXES):
            kept.append(item)
            continue
        refusals.append(
            f"smtpd_relay_restrictions has {item}, which lets clients relay without popauth"
            " (or which popauth setup does not know): remove it, or set up Postfix by hand"
            " (/usr/share/doc/popauth/examples/postfix/main.cf)"
        )
    return [*kept, *before, our_check, "reject_unauth_destination"], refusals


def smtpd_services(fields: dict[str, str]) -> dict[str, bool]:
    """master.cf's smtpd services (name/type) and whether each runs chrooted."""
    services: dict[str, bool] = {}
    for key, value in fields.items():
        service, _, field_name = key.rpartition("/")
        if field_name == "command" and value.split()[0] == "smtpd":
            chroot = fields.get(f"{service}/chroot", "y")
            # "-": the default, which is "n" since Postfix 3.0.
            services[service] = chroot == "y"
    return services


def policy_entry(socket: Path | None, queue_directory: str, chrooted: bool) -> tuple[str, str]:
    """How check_policy_service names popauth's policy socket, or "" and why it cannot."""
    suggestion = f'set policy_socket = "{queue_directory}/popauth/policy.sock"'
    if socket is None:
        return "", f"the policy door is off (no policy_socket): {suggestion}"
    queue = Path(queue_directory)
    if socket.is_relative_to(queue):
        # Relative to the queue directory: right for a chrooted smtpd and an unchrooted one.
        return f"unix:{socket.relative_to(queue)}", ""
    if chrooted:
        return "", (
            f"popauth's policy_socket {socket} is outside Postfix's queue directory"
            f" ({queue_directory}) and smtpd runs chrooted there, so it cannot reach it:"
            f" {suggestion}"
        )
    return f"unix:{socket}", ""


def plan_postfix(  # noqa: PLR0915 - one reading of main.cf, setting by setting
    settings: Settings,
    *,
    config_directory: str = "",
    postconf: Sequence[str] = ("postconf",),
    systemd: bool = True,
    postfix_running: bool = True,
    door: str = "milter",
) -> Plan:
    """What ``popauth setup postfix`` would change in the Postfix of ``config_directory``.

    ``door``: "milter", or "policy" for popauth's policy door.
    """
    command = [*postconf, *(["-c", config_directory] if config_directory else [])]
    read = read_postconf(command)
    values = read(["-x", *PARAMETERS])
    directory = values["config_directory"]
    queue = values["queue_directory"]
    services = smtpd_services(read(["-F"]))
    chrooted = any(services.values())
    plan = Plan("postfix", backups=[Path(directory) / "main.cf"], postconf_command=tuple(command))
    ours, why_not = milter_entry(settings.milter.socket, queue, chrooted)
    policy, policy_why_not = policy_entry(settings.policy.socket, queue, chrooted)
    table_check = f"check_client_access cidr:{directory}/{RELAY_TABLE_NAME}"
    policy_check = f"check_policy_service {policy}"
    if door == "policy":
        if policy_why_not:
            plan.refusals.append(policy_why_not)
            return plan
        our_check, other_doors, before = policy_check, {table_check}, ["permit_auth_destination"]
    else:
        if why_not:
            plan.refusals.append(why_not)
            return plan
        our_check, other_doors, before = table_check, {policy_check}, []

    relay, refusals = relay_restrictions(
        values["smtpd_relay_restrictions"],
        our_check,
        values["mynetworks"],
        settings.relay.trusted_networks,
        ours=frozenset(other_doors),
        before=before,
    )
    plan.refusals += refusals
    recipient = split_list(values["smtpd_recipient_restrictions"])
    for word in ("reject_unauth_destination", "defer_unauth_destination"):
        if word in recipient and our_check not in " ".join(recipient).split(word)[0]:
            plan.refusals.append(
                f"smtpd_recipient_restrictions has {word}: Postfix would refuse the relaying"
                " popauth allows. Move the relay rules to smtpd_relay_restrictions and drop"
                f" {word} from smtpd_recipient_restrictions"
            )
    if split_list(values["smtpd_relay_restrictions"]) != split_list(", ".join(relay)):
        plan.postconf.append(("smtpd_relay_restrictions", ", ".join(relay)))

    milters = split_list(values["smtpd_milters"])
    others = [entry for entry in milters if not ours or not _same_milter(entry, ours, queue)]
    if door == "policy":
        _plan_policy_door(plan, values=values, milters=milters, others=others)
    else:
        _plan_milter_door(plan, values=values, read=read, ours=ours, milters=milters, others=others)
    if values["smtpd_sasl_auth_enable"] == "yes":
        plan.notes.append(
            f"SMTP AUTH is on (smtpd_sasl_type = {values['smtpd_sasl_type']}); those users relay"
        )
    elif (Path(queue) / "private" / "auth").exists():
        plan.postconf += list(SASL)
    else:
        plan.notes.append(
            "SMTP AUTH is off: `popauth setup dovecot` adds Dovecot's SASL listener and turns it on"
        )

    table = Path(directory) / RELAY_TABLE_NAME
    if door != "policy" and (
        not table.exists() or table.read_text(errors="replace") != RELAY_TABLE
    ):
        plan.files.append(FileChange(table, RELAY_TABLE))

    overrides = read(["-P"]) if services else {}
    for key, value in sorted(overrides.items()):
        service, _, name = key.rpartition("/")
        if service not in services:
            continue
        if (
            name == "smtpd_milters"
            and door != "policy"
            and not any(_same_milter(item, ours, queue) for item in split_list(value))
        ):
            plan.notes.append(
                f"master.cf: {service} has -o smtpd_milters={value}: popauth is not asked there"
            )
        elif name in ("smtpd_relay_restrictions", "smtpd_recipient_restrictions"):
            plan.notes.append(f"master.cf: {service} has its own -o {name}={value} (kept)")

    plan.check = ("postfix", "-c", directory, "check")
    if systemd:
        # popauth listens before Postfix asks it; a failed start changes nothing.
        plan.before.append(("systemctl", "enable", "--now", "popauth.service"))
    if postfix_running:
        plan.commands.append(("postfix", "-c", directory, "reload"))
    if not plan.postconf and not plan.files:
        plan.before.clear()
        plan.commands.clear()
        plan.check = None
        if systemd and run(["systemctl", "is-active", "popauth.service"]).returncode != 0:
            plan.before.append(("systemctl", "enable", "--now", "popauth.service"))
    return plan


def _plan_milter_door(
    plan: Plan,
    *,
    values: dict[str, str],
    read: Postconf,
    ours: str,
    milters: list[str],
    others: list[str],
) -> None:
    """smtpd_milters with popauth's milter, failing closed."""
    # Written down even where it is the default: Postfix 3.10 changed that default.
    explicit = "milter_default_action" in read(["-n", "milter_default_action"])
    tempfail = values["milter_default_action"] == "tempfail" and explicit
    if not others and not tempfail:
        plan.postconf.append(("milter_default_action", "tempfail"))
        tempfail = True
    entry = ours if tempfail else f"{{ {ours}, default_action=tempfail }}"
    if [*others, entry] != milters:
        plan.postconf.append(("smtpd_milters", ", ".join([*others, entry])))
        # Locally submitted mail (sendmail(1), pickup) has no client address:
        # popauth must not judge it, so a non_smtpd_milters that refers to
        # smtpd_milters keeps the list it means today.
        unexpanded = read(["non_smtpd_milters"]).get("non_smtpd_milters", "")
        if "smtpd_milters" in unexpanded:
            plan.postconf.insert(len(plan.postconf) - 1, ("non_smtpd_milters", ", ".join(others)))
    if others and not tempfail:
        plan.notes.append(
            f"milter_default_action is {values['milter_default_action']} for the other milters;"
            " popauth's entry has its own default_action=tempfail (fail closed)"
        )


def _plan_policy_door(
    plan: Plan, *, values: dict[str, str], milters: list[str], others: list[str]
) -> None:
    """No popauth milter (the policy door judges), and a policy service that fails closed."""
    if others != milters:
        # The milter would judge every recipient a second time.
        plan.postconf.append(("smtpd_milters", ", ".join(others)))
    default_action = values.get("smtpd_policy_service_default_action", "")
    if not default_action.startswith("4"):
        # An unreachable policy door must defer, never let a recipient through.
        plan.postconf.append(("smtpd_policy_service_default_action", POLICY_DEFAULT_ACTION))
