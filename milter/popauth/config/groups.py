"""The typed settings groups: every key's field, type, converter and default, once.

Each key of the flat TOML file is a typed field of one group
(``settings.store.ttl``, ``settings.milter.socket``). Adding a setting is one
line in the group it belongs to::

    ttl: int = setting("ttl", 900, integer(1, 7 * 86_400))

that is: the flat TOML key, the default (already typed) and the converter
from the raw TOML value (:mod:`popauth.config.converters`). Then document
the key with its default in ``docs/configuration.rst``; a test checks that
they agree. A new group is a frozen dataclass of such fields plus one line
in :class:`Settings`.

Inside the groups, "off" or "none" is always None (the file says ``""``),
and user and group names are already their ids.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from popauth.basics.addresses import NetworkSet, WhitelistKeying, parse_network
from popauth.basics.errors import ConfigError
from popauth.basics.posixids import ROOT, SystemGroup, SystemUser
from popauth.basics.usernames import is_valid_user_name
from popauth.config.converters import (
    Converter,
    ListenAddress,
    any_text,
    boolean,
    choice,
    directory,
    domains,
    existing_file,
    file_path,
    follow_log,
    follow_regex,
    group,
    groups,
    host_port,
    integer,
    key_prefix,
    listen_address,
    mailers,
    matching,
    milter_spec,
    mode,
    networks,
    nonempty,
    number,
    optional,
    programs,
    protocols,
    redis_url,
    renew_interval,
    rfc3339_time,
    sentinel_service,
    smtp_text,
    socket_path,
    socketmap_name,
    socketmap_value,
    split_host_port,
    string_list,
    then,
    users,
    visible,
)
from popauth.doors.ingest import wire
from popauth.localdelivery import DOMAIN_NAME, LearnFrom, LocalDelivery
from popauth.notices.template import DEFAULT_SMTP_AUTH_INSTRUCTIONS, TemplateError, read_template
from popauth.relay.accounting import Accounting
from popauth.relay.decision import (
    Campaign,
    PopFirst,
    PopFirstSender,
    Provenance,
    RelayBudget,
    RelayPolicy,
)
from popauth.relay.ownership import SenderOwners, parse_sender_addresses
from popauth.relay.replies import (
    DEFAULT_BUDGET_SPENT,
    DEFAULT_NULL_SENDER,
    DEFAULT_POP_FIRST_GRADUATED,
    DEFAULT_SENDER_NOT_OWNED,
)
from popauth.store import MAX_USERS_PER_ADDRESS, StoreKind
from popauth.telemetry.levels import LogFormat, LogLevel

T = TypeVar("T")

KEY = "popauth.key"
CONVERT = "popauth.convert"
# How a value is written back as TOML (``check-config --show``), when not plainly.
SHOWN = "popauth.shown"

# Where the state files live by default (systemd: StateDirectory=popauth).
STATE_DIRECTORY = Path("/var/lib/popauth")
# popauth follow's own (systemd: StateDirectory=popauth-follow): it runs as
# another user, who cannot enter popauth's.
FOLLOW_STATE_DIRECTORY = Path("/var/lib/popauth-follow")
DEFAULT_INGEST_SOCKET = wire.DEFAULT_SOCKET
DEFAULT_MILTER_SOCKET = "unix:/run/popauth/milter.sock"
DEFAULT_POP_FIRST_RETIRED_MESSAGE = (
    "POP before SMTP has been retired: turn on SMTP AUTH in your mail program."
)
DEFAULT_REJECT_MESSAGE = (
    "Turn on SMTP AUTH in your mail program, or check your mail (POP/IMAP) just before sending."
)
# The relay budget's default: docs/configuration.rst says how it was chosen.
DEFAULT_POP_FIRST_MAX_RECIPIENTS: int | None = 1000
# Trusted networks wider than these cover a large part of the Internet: an IPv4
# /8 is 1/256 of all addresses, and no single provider holds an IPv6 network
# wider than a /16 (the largest allocations are about /19).
WIDEST_TRUSTED_PREFIX = {4: 8, 6: 16}

# Keys whose absence means "learn from the MTA": no default value to write down.
LEARNED_UNLESS_SET = ("local_domains", "local_mailers")


class FollowFormat(enum.StrEnum):
    """The login lines of which POP/IMAP server ``popauth follow`` reads."""

    COURIER = "courier"
    CYRUS = "cyrus"
    DOVECOT = "dovecot"
    POPA3D = "popa3d"
    SOLID_POP3D = "solid-pop3d"
    QPOPPER = "qpopper"
    UW = "uw"
    REGEX = "regex"


FOLLOW_FORMATS = tuple(member.value for member in FollowFormat)


class FollowTrust(enum.StrEnum):
    """How far ``popauth follow`` trusts its log's lines."""

    # Lines in popauth's rsyslog template, the sender checked by the kernel's credentials.
    RSYSLOG = "rsyslog"
    # Every line of the log is the server's.
    FILE = "file"


def setting(
    key: str, default: T, convert: Converter[T], *, shown: Callable[[T], Any] | None = None
) -> T:
    """A field of a settings group: its flat TOML key, typed default and converter."""
    # A dataclasses.Field in disguise: dataclass() sees the Field, mypy the default.
    made: T = field(default=default, metadata={KEY: key, CONVERT: convert, SHOWN: shown})
    return made


def learned_unless_set(key: str, convert: Converter[T]) -> T | None:
    """A setting without a default: absent (None), its value is learned elsewhere."""
    return setting(key, None, convert)


def optional_setting(key: str, default: T | None, convert: Converter[T]) -> T | None:
    """A setting that ``""`` turns off (None); any other value goes to ``convert``."""
    return setting(key, default, optional(convert))


def _octal(value: int) -> str:
    return f"{value:04o}"


def mode_setting(key: str, default: int) -> int:
    """A permission mode, written as the file writes it: ``"0660"``."""
    return setting(key, default, mode, shown=_octal)


# --- the groups ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MilterSettings:
    """The milter door: where libmilter listens for the MTA."""

    # libmilter's spec: unix:/path, local:/path, inet:PORT@HOST, inet6:PORT@HOST.
    socket: str = setting("milter_socket", DEFAULT_MILTER_SOCKET, milter_spec)
    name: str = setting("milter_name", "popauth", visible)
    # Seconds libmilter waits for the MTA before dropping a connection.
    timeout: int = setting("milter_timeout", 600, integer(1, 86_400))
    socket_mode: int = mode_setting("milter_socket_mode", 0o660)
    # None: the socket keeps the group the process gave it.
    socket_group: SystemGroup | None = optional_setting("milter_socket_group", None, group)


@dataclass(frozen=True, slots=True)
class IngestSettings:
    """The ingest door, where login hooks and the CLI talk to popauth."""

    socket: Path = setting("ingest_socket", Path(DEFAULT_INGEST_SOCKET), socket_path)
    socket_mode: int = mode_setting("ingest_socket_mode", 0o660)
    socket_group: SystemGroup | None = optional_setting("ingest_socket_group", None, group)
    # More groups that may connect, each by a POSIX ACL entry (popauth follow).
    socket_acl_groups: tuple[SystemGroup, ...] = setting("ingest_socket_acl_groups", (), groups)
    # Reporters: who may report logins (LOGIN), e.g. the POP server's hook.
    allowed_users: tuple[SystemUser, ...] = setting("ingest_allowed_users", (), users)
    allowed_groups: tuple[SystemGroup, ...] = setting("ingest_allowed_groups", (), groups)
    # Operators: who may read (QUERY, LIST, REPORT, BLOCKED, STATS) and revoke.
    operator_users: tuple[SystemUser, ...] = setting("ingest_operator_users", (), users)
    operator_groups: tuple[SystemGroup, ...] = setting("ingest_operator_groups", (), groups)
    # Administrators: everything, BLOCK/UNBLOCK too; root and popauth's user always.
    admin_users: tuple[SystemUser, ...] = setting("ingest_admin_users", (), users)
    admin_groups: tuple[SystemGroup, ...] = setting("ingest_admin_groups", (), groups)
    # Seconds a client may take for one request line before it is dropped.
    timeout: float = setting("ingest_timeout", 5.0, number(0.1, 300))
    max_clients: int = setting("ingest_max_clients", 256, integer(1, 100_000))
    # Connections one uid without an ingest role may hold at once.
    clients_per_uid: int = setting("ingest_clients_per_uid", 8, integer(1, 100_000))
    # Seconds a new ingest connection may stay silent before it is closed.
    first_byte_timeout: float = setting("ingest_first_byte_timeout", 1.0, number(0.1, 300))


@dataclass(frozen=True, slots=True)
class SocketmapSettings:
    """The socketmap door (a Postfix/Sendmail lookup table); off without a socket."""

    socket: Path | None = optional_setting("socketmap_socket", None, socket_path)
    socket_mode: int = mode_setting("socketmap_socket_mode", 0o660)
    socket_group: SystemGroup | None = optional_setting("socketmap_socket_group", None, group)
    # The map name the MTA sends (socketmap:unix:/path:NAME, Kname socket ...).
    name: str = setting("socketmap_name", "popauth", socketmap_name)
    # The value answered for a whitelisted client ("OK" permits in Postfix).
    ok_value: str = setting("socketmap_ok_value", "OK", socketmap_value)
    # Seconds to complete a request; seconds an idle connection is kept.
    timeout: float = setting("socketmap_timeout", 5.0, number(0.1, 300))
    idle_timeout: float = setting("socketmap_idle_timeout", 300.0, number(1, 86_400))
    max_clients: int = setting("socketmap_max_clients", 512, integer(1, 100_000))
    # Connections one uid outside the socket's group may hold at once; 0: any
    # (off by default: an MTA reaching the socket by its mode must not be held).
    clients_per_uid: int = setting("socketmap_clients_per_uid", 0, integer(0, 100_000))


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """The Postfix policy door (``check_policy_service``); off without a socket."""

    socket: Path | None = optional_setting("policy_socket", None, socket_path)
    socket_mode: int = mode_setting("policy_socket_mode", 0o660)
    socket_group: SystemGroup | None = optional_setting("policy_socket_group", None, group)
    # Seconds to complete a request; seconds an idle connection is kept
    # (Postfix closes its end after smtpd_policy_service_max_idle, 300 s).
    timeout: float = setting("policy_timeout", 5.0, number(0.1, 300))
    idle_timeout: float = setting("policy_idle_timeout", 330.0, number(1, 86_400))
    max_clients: int = setting("policy_max_clients", 512, integer(1, 100_000))
    # Connections one uid outside the socket's group may hold at once; 0: any
    # (off by default: an MTA reaching the socket by its mode must not be held).
    clients_per_uid: int = setting("policy_clients_per_uid", 0, integer(0, 100_000))


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """``popauth sessions`` on the Dovecot host: renewing the entries of open sessions."""

    # Seconds between renewals; 0 = a quarter of ttl. Must be less than ttl.
    renew_interval: float = setting("session_renew_interval", 0.0, renew_interval)
    # The doveadm that lists sessions, and Dovecot's configuration for it
    # (None = doveadm's default); which Dovecot protocols' sessions count.
    doveadm: str = setting("session_doveadm", "doveadm", matching(".+", "must not be empty"))
    dovecot_config: Path | None = optional_setting("session_dovecot_config", None, file_path)
    protocols: tuple[str, ...] = setting("session_protocols", ("imap", "pop3"), protocols)


@dataclass(frozen=True, slots=True)
class FollowSettings:
    """``popauth follow``: logins read from a POP/IMAP server's log."""

    # The log it reads ("-" = standard input; None = none), the login format
    # of the POP/IMAP server that writes it, and how far it is trusted.
    log: str | None = optional_setting("follow_log", None, follow_log)
    format: FollowFormat | None = optional_setting("follow_format", None, choice(FollowFormat))
    # follow_format = "regex": a pattern with named groups ip and user,
    # matched against the whole message after the program tag.
    regex: str | None = optional_setting("follow_regex", None, follow_regex)
    # Program tags that count; () = the format's own.
    programs: tuple[str, ...] = setting("follow_programs", (), programs)
    trust: FollowTrust = setting("follow_trust", FollowTrust.RSYSLOG, choice(FollowTrust))
    trusted_users: tuple[SystemUser, ...] = setting(
        "follow_trusted_users", (ROOT,), nonempty(users)
    )
    state_path: Path | None = optional_setting(
        "follow_state_path", FOLLOW_STATE_DIRECTORY / "follow.json", file_path
    )
    # Logins logged longer ago than this are not reported (seconds).
    max_age: int = setting("follow_max_age", 60, integer(1, 86_400))
    poll_interval: float = setting("follow_poll_interval", 0.1, number(0.01, 10))
    # Whether a mail account can run a program or write a file on this host
    # (a shell, cron, a .forward pipe, FTP): Courier's log is then forgeable.
    mail_users_run_programs: bool = setting("follow_mail_users_run_programs", True, boolean)
    # popa3d: seconds a session line waits for its success line (popa3d's
    # own idle timeout, POP_TIMEOUT, is 10 minutes).
    session_timeout: int = setting("follow_session_timeout", 600, integer(1, 86_400))
    # popa3d: the uids of mail accounts, whose own success lines count
    # (Debian's normal users; never system accounts or nobody).
    mail_uid_min: int = setting("follow_mail_uid_min", 1000, integer(1, 4_294_967_294))
    mail_uid_max: int = setting("follow_mail_uid_max", 59_999, integer(1, 4_294_967_294))

    def __post_init__(self) -> None:
        if self.format is FollowFormat.REGEX and not (self.regex and self.programs):
            raise ConfigError(
                "bad value for 'follow_format': \"regex\" needs follow_regex and follow_programs"
            )
        if self.mail_uid_min > self.mail_uid_max:
            raise ConfigError("bad value for 'follow_mail_uid_max': less than follow_mail_uid_min")

    @property
    def mail_uids(self) -> range:
        return range(self.mail_uid_min, self.mail_uid_max + 1)

    @property
    def trusted_uids(self) -> frozenset[int]:
        return frozenset(user.uid for user in self.trusted_users)


_tls_file = optional(existing_file)


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The whitelist: how long an entry lasts, how entries are keyed, where they live."""

    ttl: int = setting("ttl", 900, integer(1, 7 * 86_400))
    max_entries: int = setting("max_entries", 100_000, integer(1, 100_000_000))
    # Users one entry (address) holds at once; one more pushes out the one
    # expiring soonest. 1 = the entry is only its last login's.
    max_users_per_address: int = setting(
        "max_users_per_address", MAX_USERS_PER_ADDRESS, integer(1, 10_000)
    )
    ipv6_prefix: int = setting("ipv6_prefix", 128, integer(0, 128))
    kind: StoreKind = setting("store", StoreKind.MEMORY, choice(StoreKind))
    # The embedded store's snapshot; None disables it.
    snapshot_path: Path | None = optional_setting(
        "snapshot_path", STATE_DIRECTORY / "whitelist.json", file_path
    )
    snapshot_interval: int = setting("snapshot_interval", 60, integer(1, 86_400))
    redis_url: str = setting("redis_url", "redis://127.0.0.1:6379/0", redis_url)
    # Seconds a Redis connect or reply may take before the caller fails closed.
    redis_timeout: float = setting("redis_timeout", 0.5, number(0.01, 30))
    redis_key_prefix: str = setting("redis_key_prefix", "popauth:", key_prefix)
    # Redis Sentinel: "HOST:PORT" of each sentinel; empty = talk to redis_url directly.
    redis_sentinels: tuple[str, ...] = setting("redis_sentinels", (), string_list(host_port))
    # The master's name in the sentinels' configuration ("sentinel monitor NAME ...").
    redis_sentinel_service: str = setting("redis_sentinel_service", "popauth", sentinel_service)
    # The sentinels' own credentials and TLS (the master's come from redis_url).
    redis_sentinel_username: str | None = optional_setting(
        "redis_sentinel_username", None, any_text
    )
    redis_sentinel_password: str | None = optional_setting(
        "redis_sentinel_password", None, any_text
    )
    redis_sentinel_tls: bool = setting("redis_sentinel_tls", False, boolean)
    redis_sentinel_tls_ca_file: str | None = setting("redis_sentinel_tls_ca_file", None, _tls_file)
    redis_sentinel_tls_cert_file: str | None = setting(
        "redis_sentinel_tls_cert_file", None, _tls_file
    )
    redis_sentinel_tls_key_file: str | None = setting(
        "redis_sentinel_tls_key_file", None, _tls_file
    )
    # Replicas that must hold a login, block, unblock or revoke before it is
    # acknowledged (WAIT); 0 = none.
    redis_wait_replicas: int = setting("redis_wait_replicas", 0, integer(0, 16))
    # Seconds a change waits for those replicas before it is refused (a login)
    # or answered as not confirmed (a block or revoke).
    redis_wait_timeout: float = setting("redis_wait_timeout", 0.1, number(0.001, 30))

    def __post_init__(self) -> None:
        """Redis settings that only fail when read together."""
        if self.redis_sentinels and self.redis_url.startswith("unix://"):
            raise ConfigError(
                "bad value for 'redis_sentinels': sentinels name TCP masters, "
                "so redis_url must not be unix://"
            )
        tls_files = (
            self.redis_sentinel_tls_ca_file,
            self.redis_sentinel_tls_cert_file,
            self.redis_sentinel_tls_key_file,
        )
        if any(tls_files) and not self.redis_sentinel_tls:
            raise ConfigError("redis_sentinel_tls_*_file needs redis_sentinel_tls = true")
        if bool(self.redis_sentinel_tls_cert_file) != bool(self.redis_sentinel_tls_key_file):
            raise ConfigError(
                "redis_sentinel_tls_cert_file and redis_sentinel_tls_key_file go together"
            )
        if self.redis_wait_replicas and self.redis_wait_timeout >= self.redis_timeout:
            raise ConfigError(
                "bad value for 'redis_wait_timeout': must be shorter than redis_timeout"
            )

    def sentinel_addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(split_host_port(address) for address in self.redis_sentinels)

    @property
    def keying(self) -> WhitelistKeying:
        return WhitelistKeying(self.ipv6_prefix)


def read_sender_addresses(path: Path | None) -> SenderOwners:
    """The users' extra addresses in ``path`` (none without one).

    Raises ValueError, saying why, when the file cannot be read or a line is bad.
    """
    if path is None:
        return SenderOwners()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    return parse_sender_addresses(text)


def _sender_addresses_file(value: Any) -> Path:
    """A file of extra addresses, read once here so that a bad one stops popauth at start."""
    path = file_path(value)
    read_sender_addresses(path)
    return path


def _recipient_budget(value: Any) -> int | None:
    """A relay budget of at least one recipient, or "" (None): off, as for every other key."""
    if value == "":
        return None
    if value == 0 and not isinstance(value, bool):
        raise ValueError('must be at least 1; "" turns the relay budget off')
    return integer(1, 10_000_000)(value)


def exempt_user_name(value: Any) -> str:
    if not isinstance(value, str) or not is_valid_user_name(value):
        raise ValueError("must be user names: 1 to 256 visible characters, no blanks")
    return value


def read_exempt_users(path: Path | None) -> frozenset[str]:
    """The user names in ``path``, one a line; ``#`` starts a comment.

    Raises ValueError, saying which line, when the file cannot be read or a name is bad.
    """
    if path is None:
        return frozenset()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    names = set()
    for line_number, line in enumerate(text.splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if not is_valid_user_name(name):
            raise ValueError(f"{path} line {line_number}: not one user name: {name[:60]!r}")
        names.add(name)
    return frozenset(names)


def _exempt_users_file(value: Any) -> Path:
    """A file of exempt users, read once here so that a bad one stops popauth at start."""
    path = file_path(value)
    read_exempt_users(path)
    return path


def _isoformat(value: datetime.datetime | None) -> str:
    return "" if value is None else value.isoformat()


def _optional_time(value: Any) -> datetime.datetime | None:
    """``""`` (no date), or an RFC 3339 time (a TOML date-time is no string)."""
    return None if value == "" else rfc3339_time(value)


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Who may relay, and what a refused client is told."""

    trusted_networks: NetworkSet = setting(
        "trusted_networks",
        NetworkSet.of([parse_network("127.0.0.0/8"), parse_network("::1/128")]),
        networks,
    )
    # A trusted network wider than WIDEST_TRUSTED_PREFIX makes an open relay by
    # configuration; it is refused unless this says it is meant.
    allow_wide_trusted_networks: bool = setting("allow_wide_trusted_networks", False, boolean)
    reject_message: str = setting("reject_message", DEFAULT_REJECT_MESSAGE, smtp_text)
    pop_first: PopFirst = setting("pop_first", PopFirst.ON, choice(PopFirst))
    pop_first_retired_message: str = setting(
        "pop_first_retired_message", DEFAULT_POP_FIRST_RETIRED_MESSAGE, smtp_text
    )
    # When POP-first is retired (RFC 3339); None: no date. Before it, it
    # relays as with "warn", from it on it is refused as with "off" (but for
    # pop_first_exempt_users); the notices say it.
    pop_first_retire_at: datetime.datetime | None = setting(
        "pop_first_retire_at", None, _optional_time, shown=_isoformat
    )
    # Whether a POP-first client may send as anyone ("any"), only as one of
    # the users who logged in from its address ("own"), or as anyone while
    # what "own" would refuse is logged ("warn", the default: measure first).
    pop_first_sender: PopFirstSender = setting(
        "pop_first_sender", PopFirstSender.WARN, choice(PopFirstSender)
    )
    # The texts after "550 5.7.1" of the two refusals of "own".
    pop_first_sender_message: str = setting(
        "pop_first_sender_message", DEFAULT_SENDER_NOT_OWNED, smtp_text
    )
    pop_first_null_sender_message: str = setting(
        "pop_first_null_sender_message", DEFAULT_NULL_SENDER, smtp_text
    )
    # Extra addresses per user ("user: address @domain ..."); read at start
    # and on reload. None: the rule alone.
    pop_first_sender_addresses: Path | None = optional_setting(
        "pop_first_sender_addresses", None, _sender_addresses_file
    )
    # Users who keep POP-first after the date, and a file of more (one a line).
    pop_first_exempt_users: tuple[str, ...] = setting(
        "pop_first_exempt_users", (), string_list(exempt_user_name)
    )
    pop_first_exempt_users_file: Path | None = optional_setting(
        "pop_first_exempt_users_file", None, _exempt_users_file
    )
    # A user seen relaying by SMTP AUTH relays by POP-first no more.
    pop_first_graduate: bool = setting("pop_first_graduate", False, boolean)
    pop_first_graduated_message: str = setting(
        "pop_first_graduated_message", DEFAULT_POP_FIRST_GRADUATED, smtp_text
    )
    # The relay budget: at most this many relayed recipients per window per
    # POP-first address (SMTP AUTH, trusted networks and local recipients
    # are never counted); "" turns it off. Far above what a person sends
    # (docs/configuration.rst), far below what a hijacked client would.
    pop_first_max_recipients: int | None = setting(
        "pop_first_max_recipients", DEFAULT_POP_FIRST_MAX_RECIPIENTS, _recipient_budget
    )
    # Seconds a budget lasts from the first recipient counted in it.
    pop_first_budget_window: int = setting("pop_first_budget_window", 3600, integer(1, 7 * 86_400))
    # The text after "451 4.7.1" once the budget is spent.
    pop_first_budget_message: str = setting(
        "pop_first_budget_message", DEFAULT_BUDGET_SPENT, smtp_text
    )

    def __post_init__(self) -> None:
        if self.pop_first is PopFirst.OFF and self.pop_first_retire_at is not None:
            raise ConfigError(
                "bad value for 'pop_first_retire_at': pop_first = \"off\" has already retired"
                ' POP-before-SMTP; set pop_first = "warn" to retire it at that time'
            )
        if self.pop_first is PopFirst.OFF and (
            self.pop_first_exempt_users or self.pop_first_exempt_users_file
        ):
            raise ConfigError(
                "bad value for 'pop_first_exempt_users': pop_first = \"off\" refuses every"
                ' user; exemptions need pop_first = "warn" and a pop_first_retire_at'
            )
        if self.allow_wide_trusted_networks:
            return
        for network in self.trusted_networks:
            widest = WIDEST_TRUSTED_PREFIX[network.version]
            if network.prefixlen < widest:
                raise ConfigError(
                    f"bad value for 'trusted_networks': {network} is wider than a /{widest} "
                    "and would let much of the Internet relay; set "
                    "allow_wide_trusted_networks = true if that is meant"
                )

    def policy(self, local: LocalDelivery) -> RelayPolicy:
        """The decision's data, with the effective local domains and mailers."""
        return RelayPolicy(
            trusted_networks=self.trusted_networks,
            local_delivery=local.rules(),
            pop_first=self.pop_first,
            provenance=Provenance(local.source, local.domains, local.mailers),
            pop_first_sender=self.pop_first_sender,
            sender_owners=dataclasses.replace(
                read_sender_addresses(self.pop_first_sender_addresses),
                login_map=local.sender_logins,
            ),
            campaign=self.campaign(),
            pop_first_budget=self.budget,
        )

    def campaign(self) -> Campaign:
        """The phase-out's data; the exempt users' file is read again each time (reload)."""
        exempt = frozenset(self.pop_first_exempt_users)
        retire_at = self.pop_first_retire_at
        return Campaign(
            retire_at=None if retire_at is None else retire_at.timestamp(),
            exempt_users=exempt | read_exempt_users(self.pop_first_exempt_users_file),
            graduate=self.pop_first_graduate,
        )

    @property
    def budget(self) -> RelayBudget | None:
        if self.pop_first_max_recipients is None:
            return None
        return RelayBudget(self.pop_first_max_recipients, self.pop_first_budget_window)


@dataclass(frozen=True, slots=True)
class LocalDeliverySettings:
    """What the MTA delivers here: configured, or learned from the MTA.

    The field names are the keys, as ``popauth.localdelivery.resolve`` reads them.
    """

    # None (the key absent): learned from the MTA at start and on reload.
    local_domains: tuple[str, ...] | None = learned_unless_set("local_domains", domains)
    local_mailers: tuple[str, ...] | None = learned_unless_set("local_mailers", mailers)
    # Which MTA to learn them from: "auto" tries Postfix, then Sendmail.
    learn_from_mta: LearnFrom = setting("learn_from_mta", LearnFrom.AUTO, choice(LearnFrom))
    # Postfix's config_directory; None = as Postfix's own commands (MAIL_CONFIG).
    postfix_config_directory: str | None = optional_setting(
        "postfix_config_directory", None, directory
    )
    sendmail_cf: str = setting("sendmail_cf", "/etc/mail/sendmail.cf", then(file_path, str))
    sendmail_command: str = setting("sendmail_command", "/usr/sbin/sendmail", then(file_path, str))


@dataclass(frozen=True, slots=True)
class AccountsSettings:
    """The books: per-user usage and the block list."""

    accounting: Accounting = setting("accounting", Accounting.MESSAGES, choice(Accounting))
    usage_path: Path | None = optional_setting(
        "usage_path", STATE_DIRECTORY / "usage.json", file_path
    )
    usage_max_users: int = setting("usage_max_users", 100_000, integer(1, 10_000_000))
    # Used with the memory store; a Redis site keeps its block list in Redis.
    blocklist_path: Path | None = optional_setting(
        "blocklist_path", STATE_DIRECTORY / "blocked.json", file_path
    )
    # pop_first_graduate's record, with the memory store (Redis keeps it in Redis).
    graduates_path: Path | None = optional_setting(
        "graduates_path", STATE_DIRECTORY / "graduates.json", file_path
    )


def _notice_template(value: Any) -> Path:
    """A notice template, read and checked once here so that a bad one stops popauth at start."""
    path = file_path(value)
    try:
        read_template(path)
    except TemplateError as error:
        raise ValueError(str(error)) from None
    return path


domain_name = matching(DOMAIN_NAME.pattern, "must be a domain name")
_ADDRESS = matching(r"[^\s@<>]+@[^\s@<>]+", "must be an address, local@domain")


@dataclass(frozen=True, slots=True)
class NoticeSettings:
    """Notices to the users still relaying by POP-first, mailed to their own address."""

    # Off by default: an upgrade must not start mailing users on its own.
    enabled: bool = setting("pop_first_notices", False, boolean)
    # Seconds between two notices to one user (and one more in the final week).
    interval: int = setting("pop_first_notice_interval", 7 * 86_400, integer(3600, 366 * 86_400))
    # The operator's template; None: the built-in text (contrib/pop-first-notice.txt).
    template: Path | None = optional_setting("pop_first_notice_template", None, _notice_template)
    smtp_auth_instructions: str = setting(
        "pop_first_notice_smtp_auth_instructions",
        DEFAULT_SMTP_AUTH_INSTRUCTIONS,
        matching(".+", "must not be empty"),
    )
    # The domain of a login without "@" (joe -> joe@DOMAIN); None: the first local domain.
    domain: str | None = optional_setting("pop_first_notice_domain", None, domain_name)
    # The envelope sender and From:; None: postmaster@ the first local domain.
    sender: str | None = optional_setting("pop_first_notice_sender", None, _ADDRESS)
    # The MTA's sendmail command and its options; popauth adds -i -f SENDER -- RECIPIENT.
    sendmail: tuple[str, ...] = setting(
        "pop_first_notice_sendmail",
        ("/usr/sbin/sendmail",),
        nonempty(string_list(matching(".+", "must not be empty"))),
    )
    timeout: float = setting("pop_first_notice_timeout", 30.0, number(1, 600))
    # Seconds before the first retry of a failed submission; each next one waits twice as long.
    retry: float = setting("pop_first_notice_retry", 300.0, number(1, 86_400))
    per_minute: float = setting("pop_first_notices_per_minute", 30.0, number(0.1, 6000))
    queue_size: int = setting("pop_first_notice_queue", 1000, integer(1, 1_000_000))
    # Who was told when, with the embedded store (a Redis site keeps it in Redis).
    path: Path | None = optional_setting(
        "pop_first_notice_path", STATE_DIRECTORY / "notices.json", file_path
    )


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    # Where Prometheus metrics are served; None turns them off.
    listen: ListenAddress | None = optional_setting("metrics_listen", None, listen_address)


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: LogFormat = setting("log_format", LogFormat.CONSOLE, choice(LogFormat))
    level: LogLevel = setting("log_level", LogLevel.INFO, choice(LogLevel))


@dataclass(frozen=True, slots=True)
class Settings:
    milter: MilterSettings = field(default_factory=MilterSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    socketmap: SocketmapSettings = field(default_factory=SocketmapSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    accounts: AccountsSettings = field(default_factory=AccountsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    sessions: SessionSettings = field(default_factory=SessionSettings)
    follow: FollowSettings = field(default_factory=FollowSettings)
    local: LocalDeliverySettings = field(default_factory=LocalDeliverySettings)
    notices: NoticeSettings = field(default_factory=NoticeSettings)

    def __post_init__(self) -> None:
        # Checks that join keys of different groups.
        interval = self.sessions.renew_interval
        if interval and interval >= self.store.ttl:
            # A renewal must come before the entry it renews expires.
            raise ConfigError(
                "bad value for 'session_renew_interval': "
                f"must be less than ttl ({self.store.ttl}), or 0 for a quarter of it"
            )

    def session_interval(self) -> float:
        """Seconds between session renewals (``session_renew_interval``, or ttl / 4)."""
        return self.sessions.renew_interval or self.store.ttl / 4
