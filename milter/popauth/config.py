"""Settings: flat TOML keys outside, typed groups inside, every default here.

The TOML file stays flat, in the Postfix style mail administrators know
(``ttl = 900``, ``milter_socket = "unix:..."``). Inside, each key is a typed
field of one group (``settings.store.ttl``, ``settings.milter.socket``):
enums, paths, networks, converted once, when the file is loaded. An unknown
key or a bad value stops ``popauth serve`` with a message naming the key,
because a typo in a relay-control config must not silently fall back to
something else.

Adding a setting is one line in the group it belongs to::

    ttl: int = setting("ttl", 900, integer(1, 7 * 86_400))

that is: the flat TOML key, the default (already typed) and the converter
from the raw TOML value, which raises ValueError saying what is expected
(the loader adds the key's name). Strings go through :func:`matching`, so
they are checked whole (``fullmatch``). Then add the key with its default
to ``contrib/popauth.toml`` and to ``docs/configuration.rst``; tests check
all three agree. A new group is a frozen dataclass of such fields plus one
line in :class:`Settings`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import grp
import ipaddress
import pwd
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from popauth.basics.addresses import (
    AddressError,
    IPNetwork,
    NetworkSet,
    WhitelistKeying,
    parse_network,
)
from popauth.doors.ingest import wire
from popauth.localdelivery import LocalDelivery
from popauth.localdelivery.resolve import LEARN_CHOICES
from popauth.relay.decision import PopFirst, Provenance, RelayPolicy
from popauth.relay.gate import Accounting
from popauth.store import MAX_USERS_PER_ADDRESS, StoreKind
from popauth.telemetry.logs import LogFormat, LogLevel

T = TypeVar("T")
EnumT = TypeVar("EnumT", bound=enum.Enum)
Converter = Callable[[Any], T]

_KEY = "popauth.key"
_CONVERT = "popauth.convert"

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


# Keys whose absence means "learn from the MTA": no default value to write down.
LEARNED_UNLESS_SET = ("local_domains", "local_mailers")


class ConfigError(ValueError):
    """A setting is unknown or has a bad value; the message names the key."""


# The vocabulary of settings that the modules they configure import from here;
# this module loads only the standard library and popauth's pure modules, so
# that the stdlib-only commands (``popauth sessions``) can read the settings.


def setting(key: str, default: T, convert: Converter[T]) -> T:
    """A field of a settings group: its flat TOML key, typed default and converter."""
    # A dataclasses.Field in disguise: dataclass() sees the Field, mypy the default.
    made: T = field(default=default, metadata={_KEY: key, _CONVERT: convert})
    return made


def learned_unless_set(key: str, convert: Converter[T]) -> T | None:
    """A setting without a default: absent (None), its value is learned elsewhere."""
    return setting(key, None, convert)


def optional_setting(key: str, default: T | None, convert: Converter[T]) -> T | None:
    """A setting that ``""`` turns off (None); any other value goes to ``convert``."""
    return setting(key, default, optional(convert))


# --- converters: each takes the raw TOML value and returns the typed one ---

# C0 controls, DEL and C1 controls: a line break in a mailer name, a NUL in a
# path or an escape sequence in a message is never meant and fails later.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PORT = r"(?P<port>[1-9][0-9]{0,4})"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH_BYTES = 107
# Trusted networks wider than these cover a large part of the Internet: an IPv4
# /8 is 1/256 of all addresses, and no single provider holds an IPv6 network
# wider than a /16 (the largest allocations are about /19).
WIDEST_TRUSTED_PREFIX = {4: 8, 6: 16}


def integer(low: int, high: int) -> Converter[int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return convert


def number(low: float, high: float) -> Converter[float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return float(value)

    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _string(value: Any) -> str:
    """A string without control characters; every string setting starts here."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    control = _CONTROL.search(value)
    if control is not None:
        raise ValueError(
            f"must not contain control characters ({control.group()!r} at {control.start()})"
        )
    return value


def matching(pattern: str, requirement: str) -> Converter[str]:
    """A string that matches ``pattern`` whole; ``requirement`` says what is expected."""
    compiled = re.compile(pattern)

    def convert(value: Any) -> str:
        text = _string(value)
        if not compiled.fullmatch(text):
            raise ValueError(requirement)
        return text

    return convert


def then(first: Converter[Any], second: Callable[[Any], T]) -> Converter[T]:
    """``first``, then ``second`` on its result (a check or a conversion)."""
    return lambda value: second(first(value))


def optional(convert: Converter[T]) -> Converter[T | None]:
    """The empty string (meaning "off" or "none") as None, or what ``convert`` accepts."""

    def check(value: Any) -> T | None:
        return None if _string(value) == "" else convert(value)

    return check


def string_list(item: Converter[T]) -> Converter[tuple[T, ...]]:
    def convert(value: Any) -> tuple[T, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of strings")
        return tuple(item(v) for v in value)

    return convert


def choice(kind: type[EnumT]) -> Converter[EnumT]:
    """One of an enum's values, given as its text."""
    values = [str(member.value) for member in kind]

    def convert(value: Any) -> EnumT:
        if not isinstance(value, str) or value not in values:
            raise ValueError(f"must be one of {', '.join(values)}")
        return kind(value)

    return convert


def nonempty(convert: Converter[T]) -> Converter[T]:
    def check(value: Any) -> T:
        result = convert(value)
        if not result:
            raise ValueError("must not be empty")
        return result

    return check


def _mode(value: Any) -> int:
    # TOML has no octal strings people recognise, so accept "0660" too.
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ValueError('must be a permission mode such as "0660"')


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {text} is not between 1 and 65535")
    return port


def _file_path(value: Any) -> Path:
    """An absolute path that can name a file: not "/", not ending in "/", "." or ".."."""
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError("must be an absolute path")
    if text.rsplit("/", 1)[1] in ("", ".", ".."):
        raise ValueError("must name a file, not a directory")
    path = Path(text)
    try:
        is_directory = path.is_dir()
    except OSError:
        # A directory this user may not look into (another service's): the
        # code that opens the file says so, naming it.
        is_directory = False
    if is_directory:
        raise ValueError(f"{text} is a directory")
    return path


def _socket_path(value: Any) -> Path:
    path = _file_path(value)
    if len(bytes(path)) > _MAX_SOCKET_PATH_BYTES:
        raise ValueError(f"a socket path may be at most {_MAX_SOCKET_PATH_BYTES} bytes long")
    return path


_MILTER_UNIX = re.compile(r"(unix|local):(?P<path>.+)")
_MILTER_INET = re.compile(rf"(?P<family>inet6?):{_PORT}(@(?P<host>.+))?")


def _milter_spec(value: Any) -> str:
    text = _string(value)
    unix = _MILTER_UNIX.fullmatch(text)
    if unix is not None:
        _socket_path(unix["path"])
        return text
    inet = _MILTER_INET.fullmatch(text)
    if inet is None:
        raise ValueError('must be a libmilter socket such as "unix:/path" or "inet:PORT@HOST"')
    _port(inet["port"])
    host = inet["host"]
    if host is not None and not _HOSTNAME.fullmatch(host):
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            address = ipaddress.ip_address(literal)
        except ValueError:
            raise ValueError(f"not a host name or IP address: {host!r}") from None
        if address.version != (6 if inet["family"] == "inet6" else 4):
            raise ValueError(f"{inet['family']}: does not take {host!r}")
    return text


def _redis_url(value: Any) -> str:
    text = _string(value)
    if not re.fullmatch(r"(redis|rediss|unix)://.*", text):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    try:
        parts = urlsplit(text)
        _ = parts.port  # ValueError for a port out of range
    except ValueError as error:
        raise ValueError(f"not a usable Redis URL: {error}") from None
    # redis-py ignores a database path that is not a number; say so instead.
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            raise ValueError("a unix:// URL needs an absolute socket path")
    elif not re.fullmatch(r"/?([0-9]+)?", parts.path):
        raise ValueError(f"the database in {parts.path!r} is not a number")
    return text


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_LISTEN = re.compile(rf"(?P<host>[0-9.]+|\[[0-9A-Fa-f:.]+\]):{_PORT}")


def _listen_address(value: Any) -> ListenAddress:
    listen = _LISTEN.fullmatch(_string(value))
    if listen is None:
        raise ValueError('must be "ADDRESS:PORT", e.g. "127.0.0.1:9754" or "[::1]:9754", or ""')
    port = _port(listen["port"])
    host = listen["host"]
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None
    if (address.version == 6) != host.startswith("["):
        raise ValueError("an IPv6 address goes in brackets, an IPv4 address does not")
    return ListenAddress(str(address), port)


def _existing(kind: str, lookup: Callable[[str], object]) -> Callable[[str], str]:
    """A number, or a name that ``lookup`` (getpwnam, getgrnam) knows."""

    def check(name: str) -> str:
        if not re.fullmatch(r"[0-9]+", name):
            try:
                lookup(name)
            except KeyError:
                raise ValueError(f"no such {kind}: {name!r}") from None
        return name

    return check


_user = _existing("user", pwd.getpwnam)
_group = _existing("group", grp.getgrnam)


def _network(text: str) -> IPNetwork:
    try:
        return parse_network(text)
    except AddressError as error:
        raise ValueError(str(error)) from None


def _renew_interval(value: Any) -> float:
    interval = number(0, 86_400)(value)
    if 0 < interval < 0.1:
        raise ValueError("must be 0 (a quarter of ttl) or at least 0.1")
    return interval


_protocols = nonempty(
    string_list(matching(r"[a-z0-9_-]{1,32}", 'not a Dovecot protocol name such as "imap"'))
)


def _host_port(value: Any) -> str:
    """A sentinel: "HOST:PORT", an IPv6 address in brackets."""
    text = _string(value)
    host, colon, port = text.rpartition(":")
    if not colon or not re.fullmatch(r"[0-9]+", port) or not host:
        raise ValueError(f'not "HOST:PORT": {text!r}')
    _port(port)
    if ":" in host or host.startswith("["):
        if not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f'an IPv6 address goes in brackets, "[ADDRESS]:PORT": {text!r}')
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"not an IPv6 address: {host!r}") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"not a host name or address: {host!r}")
    return text


def _split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _existing_file(value: Any) -> str:
    path = _file_path(value)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return str(path)


FOLLOW_FORMATS = ("courier", "cyrus", "dovecot", "popa3d", "solid-pop3d", "qpopper", "uw", "regex")


def _follow_format(value: Any) -> str:
    text = _string(value)
    if text not in FOLLOW_FORMATS:
        raise ValueError(f"must be one of {', '.join(FOLLOW_FORMATS)}")
    return text


def _follow_regex(value: Any) -> str:
    text = _string(value)
    try:
        pattern = re.compile(text)
    except re.error as error:
        raise ValueError(f"does not compile: {error}") from None
    if not {"ip", "user"} <= set(pattern.groupindex):
        raise ValueError("needs the named groups (?P<ip>...) and (?P<user>...)")
    return text


_follow_log = matching(r"-|/.*", 'must be an absolute path, or "-" for standard input')
_programs = string_list(matching(r"[^\s\[\]:]{1,64}", "must be program tags"))
_follow_trust = matching("rsyslog|file", "must be one of rsyslog, file")
_any_text = matching(".*", "must be text")
_tls_file = then(optional(_existing_file), lambda text: text or "")
_visible = matching(r"[\x21-\x7e]{1,64}", "must be 1 to 64 visible ASCII characters")
_socketmap_name = matching(
    r"[A-Za-z0-9_.-]{1,64}", "must be 1 to 64 letters, digits, '_', '.' or '-'"
)
_socketmap_value = matching(
    r"[\x21-\x7e]([\x20-\x7e]{0,198}[\x21-\x7e])?",
    "must be 1 to 200 printable ASCII characters, not blank at either end",
)
_key_prefix = matching(r"[\x21-\x7e]{0,64}", "must be up to 64 visible ASCII characters")
# libmilter drops a reply with a lone '%', and SMTP replies are ASCII.
_smtp_text = matching(
    r"[\x20-\x24\x26-\x7e]{0,400}", "must be at most 400 printable ASCII characters without '%'"
)
_name = matching(r"[^\s:/]{1,64}", "must be a user or group name, or a number")
_mailer = matching(r"[A-Za-z0-9_.+-]{1,64}", 'must be mailer names such as "local"')
_domain = matching(
    r"\.?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)\.?",
    'must be domains such as "example.org", or ".example.org" for its subdomains',
)
_network_text = matching(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?", 'must be networks such as "10.0.0.0/8"')
_sentinel_service = matching(
    r"[A-Za-z0-9_.-]{1,64}", "must be 1 to 64 letters, digits, '_', '.' or '-'"
)
_group_name = then(_name, _group)
_user_names = string_list(then(_name, _user))
_group_names = string_list(_group_name)
_networks = then(string_list(then(_network_text, _network)), NetworkSet.of)
_domains = string_list(then(_domain, str.lower))
_mailers = nonempty(string_list(then(_mailer, str.lower)))
_learn_choice = matching("|".join(LEARN_CHOICES), f"must be one of {', '.join(LEARN_CHOICES)}")
_directory = matching(r"/.*", "must be an absolute path")
# "" is no group: the socket keeps the group the process gave it.
_socket_group = then(optional(_group_name), lambda name: name or "")

# --- the groups ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MilterSettings:
    """The milter door: where libmilter listens for the MTA."""

    # libmilter's spec: unix:/path, local:/path, inet:PORT@HOST, inet6:PORT@HOST.
    socket: str = setting("milter_socket", DEFAULT_MILTER_SOCKET, _milter_spec)
    name: str = setting("milter_name", "popauth", _visible)
    # Seconds libmilter waits for the MTA before dropping a connection.
    timeout: int = setting("milter_timeout", 600, integer(1, 86_400))
    socket_mode: int = setting("milter_socket_mode", 0o660, _mode)
    socket_group: str = setting("milter_socket_group", "", _socket_group)

    @property
    def socket_path(self) -> Path | None:
        """The filesystem path of a ``unix:``/``local:`` socket, else None."""
        kind, _, rest = self.socket.partition(":")
        return Path(rest) if kind in ("unix", "local") else None


@dataclass(frozen=True, slots=True)
class IngestSettings:
    """The ingest door, where login hooks and the CLI talk to popauth."""

    socket: Path = setting("ingest_socket", Path(DEFAULT_INGEST_SOCKET), _socket_path)
    socket_mode: int = setting("ingest_socket_mode", 0o660, _mode)
    socket_group: str = setting("ingest_socket_group", "", _socket_group)
    # More groups that may connect, each by a POSIX ACL entry (popauth follow).
    socket_acl_groups: tuple[str, ...] = setting("ingest_socket_acl_groups", (), _group_names)
    # Reporters: who may report logins (LOGIN), e.g. the POP server's hook.
    allowed_users: tuple[str, ...] = setting("ingest_allowed_users", (), _user_names)
    allowed_groups: tuple[str, ...] = setting("ingest_allowed_groups", (), _group_names)
    # Operators: who may read (QUERY, LIST, REPORT, BLOCKED, STATS) and revoke.
    operator_users: tuple[str, ...] = setting("ingest_operator_users", (), _user_names)
    operator_groups: tuple[str, ...] = setting("ingest_operator_groups", (), _group_names)
    # Administrators: everything, BLOCK/UNBLOCK too; root and popauth's user always.
    admin_users: tuple[str, ...] = setting("ingest_admin_users", (), _user_names)
    admin_groups: tuple[str, ...] = setting("ingest_admin_groups", (), _group_names)
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

    socket: Path | None = optional_setting("socketmap_socket", None, _socket_path)
    socket_mode: int = setting("socketmap_socket_mode", 0o660, _mode)
    socket_group: str = setting("socketmap_socket_group", "", _socket_group)
    # The map name the MTA sends (socketmap:unix:/path:NAME, Kname socket ...).
    name: str = setting("socketmap_name", "popauth", _socketmap_name)
    # The value answered for a whitelisted client ("OK" permits in Postfix).
    ok_value: str = setting("socketmap_ok_value", "OK", _socketmap_value)
    # Seconds to complete a request; seconds an idle connection is kept.
    timeout: float = setting("socketmap_timeout", 5.0, number(0.1, 300))
    idle_timeout: float = setting("socketmap_idle_timeout", 300.0, number(1, 86_400))
    max_clients: int = setting("socketmap_max_clients", 512, integer(1, 100_000))
    # Connections one uid outside the socket's group may hold at once; 0: any
    # (off by default: an MTA reaching the socket by its mode must not be held).
    clients_per_uid: int = setting("socketmap_clients_per_uid", 0, integer(0, 100_000))


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """``popauth sessions`` on the Dovecot host: renewing the entries of open sessions."""

    # Seconds between renewals; 0 = a quarter of ttl. Must be less than ttl.
    renew_interval: float = setting("session_renew_interval", 0.0, _renew_interval)
    # The doveadm that lists sessions, and Dovecot's configuration for it
    # (None = doveadm's default); which Dovecot protocols' sessions count.
    doveadm: str = setting("session_doveadm", "doveadm", matching(".+", "must not be empty"))
    dovecot_config: Path | None = optional_setting("session_dovecot_config", None, _file_path)
    protocols: tuple[str, ...] = setting("session_protocols", ("imap", "pop3"), _protocols)


@dataclass(frozen=True, slots=True)
class FollowSettings:
    """``popauth follow``: logins read from a POP/IMAP server's log."""

    # The log it reads ("-" = standard input; "" = none), the login format
    # of the POP/IMAP server that writes it, and how far it is trusted.
    log: str = setting("follow_log", "", then(optional(_follow_log), lambda text: text or ""))
    format: str = setting("follow_format", "", then(optional(_follow_format), lambda t: t or ""))
    # follow_format = "regex": a pattern with named groups ip and user,
    # matched against the whole message after the program tag.
    regex: str = setting("follow_regex", "", then(optional(_follow_regex), lambda t: t or ""))
    # Program tags that count; () = the format's own.
    programs: tuple[str, ...] = setting("follow_programs", (), _programs)
    # "rsyslog": lines in popauth's rsyslog template, sender checked by the
    # kernel's credentials; "file": every line of the log is the server's.
    trust: str = setting("follow_trust", "rsyslog", _follow_trust)
    trusted_users: tuple[str, ...] = setting(
        "follow_trusted_users", ("root",), nonempty(_user_names)
    )
    state_path: Path | None = optional_setting(
        "follow_state_path", FOLLOW_STATE_DIRECTORY / "follow.json", _file_path
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
        if self.format == "regex" and not (self.regex and self.programs):
            raise ConfigError(
                "bad value for 'follow_format': \"regex\" needs follow_regex and follow_programs"
            )
        if self.mail_uid_min > self.mail_uid_max:
            raise ConfigError("bad value for 'follow_mail_uid_max': less than follow_mail_uid_min")

    @property
    def mail_uids(self) -> range:
        return range(self.mail_uid_min, self.mail_uid_max + 1)


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
        "snapshot_path", STATE_DIRECTORY / "whitelist.json", _file_path
    )
    snapshot_interval: int = setting("snapshot_interval", 60, integer(1, 86_400))
    redis_url: str = setting("redis_url", "redis://127.0.0.1:6379/0", _redis_url)
    # Seconds a Redis connect or reply may take before the caller fails closed.
    redis_timeout: float = setting("redis_timeout", 0.5, number(0.01, 30))
    redis_key_prefix: str = setting("redis_key_prefix", "popauth:", _key_prefix)
    # Redis Sentinel: "HOST:PORT" of each sentinel; empty = talk to redis_url directly.
    redis_sentinels: tuple[str, ...] = setting("redis_sentinels", (), string_list(_host_port))
    # The master's name in the sentinels' configuration ("sentinel monitor NAME ...").
    redis_sentinel_service: str = setting("redis_sentinel_service", "popauth", _sentinel_service)
    # The sentinels' own credentials and TLS (the master's come from redis_url).
    redis_sentinel_username: str = setting("redis_sentinel_username", "", _any_text)
    redis_sentinel_password: str = setting("redis_sentinel_password", "", _any_text)
    redis_sentinel_tls: bool = setting("redis_sentinel_tls", False, boolean)
    redis_sentinel_tls_ca_file: str = setting("redis_sentinel_tls_ca_file", "", _tls_file)
    redis_sentinel_tls_cert_file: str = setting("redis_sentinel_tls_cert_file", "", _tls_file)
    redis_sentinel_tls_key_file: str = setting("redis_sentinel_tls_key_file", "", _tls_file)
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
        return tuple(_split_host_port(address) for address in self.redis_sentinels)

    @property
    def keying(self) -> WhitelistKeying:
        return WhitelistKeying(self.ipv6_prefix)


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Who may relay, and what a refused client is told."""

    trusted_networks: NetworkSet = setting(
        "trusted_networks",
        NetworkSet.of([parse_network("127.0.0.0/8"), parse_network("::1/128")]),
        _networks,
    )
    # A trusted network wider than WIDEST_TRUSTED_PREFIX makes an open relay by
    # configuration; it is refused unless this says it is meant.
    allow_wide_trusted_networks: bool = setting("allow_wide_trusted_networks", False, boolean)
    reject_message: str = setting("reject_message", DEFAULT_REJECT_MESSAGE, _smtp_text)
    pop_first: PopFirst = setting("pop_first", PopFirst.ON, choice(PopFirst))
    pop_first_retired_message: str = setting(
        "pop_first_retired_message", DEFAULT_POP_FIRST_RETIRED_MESSAGE, _smtp_text
    )

    def __post_init__(self) -> None:
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
        )


@dataclass(frozen=True, slots=True)
class LocalDeliverySettings:
    """What the MTA delivers here: configured, or learned from the MTA.

    The field names are the keys, as ``popauth.localdelivery.resolve`` reads them.
    """

    # None (the key absent): learned from the MTA at start and on reload.
    local_domains: tuple[str, ...] | None = learned_unless_set("local_domains", _domains)
    local_mailers: tuple[str, ...] | None = learned_unless_set("local_mailers", _mailers)
    # Which MTA to learn them from: "auto" tries Postfix, then Sendmail.
    learn_from_mta: str = setting("learn_from_mta", "auto", _learn_choice)
    # Postfix's config_directory; "" = as Postfix's own commands (MAIL_CONFIG).
    postfix_config_directory: str = setting(
        "postfix_config_directory", "", then(optional(_directory), lambda text: text or "")
    )
    sendmail_cf: str = setting("sendmail_cf", "/etc/mail/sendmail.cf", then(_file_path, str))
    sendmail_command: str = setting("sendmail_command", "/usr/sbin/sendmail", then(_file_path, str))


@dataclass(frozen=True, slots=True)
class AccountsSettings:
    """The books: per-user usage and the block list."""

    accounting: Accounting = setting("accounting", Accounting.MESSAGES, choice(Accounting))
    usage_path: Path | None = optional_setting(
        "usage_path", STATE_DIRECTORY / "usage.json", _file_path
    )
    usage_max_users: int = setting("usage_max_users", 100_000, integer(1, 10_000_000))
    # Used with the memory store; a Redis site keeps its block list in Redis.
    blocklist_path: Path | None = optional_setting(
        "blocklist_path", STATE_DIRECTORY / "blocked.json", _file_path
    )


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    # Where Prometheus metrics are served; None turns them off.
    listen: ListenAddress | None = optional_setting("metrics_listen", None, _listen_address)


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: LogFormat = setting("log_format", LogFormat.CONSOLE, choice(LogFormat))
    level: LogLevel = setting("log_level", LogLevel.INFO, choice(LogLevel))


@dataclass(frozen=True, slots=True)
class Settings:
    milter: MilterSettings = field(default_factory=MilterSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    socketmap: SocketmapSettings = field(default_factory=SocketmapSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    accounts: AccountsSettings = field(default_factory=AccountsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    sessions: SessionSettings = field(default_factory=SessionSettings)
    follow: FollowSettings = field(default_factory=FollowSettings)
    local: LocalDeliverySettings = field(default_factory=LocalDeliverySettings)

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


# --- the one place where flat keys become typed groups -------------------


@dataclass(frozen=True, slots=True)
class Key:
    """Where a flat TOML key lives: its group, its field, its converter."""

    name: str
    group: str
    field: str
    convert: Converter[Any]
    default: Any


def _keys() -> Iterator[Key]:
    for group in dataclasses.fields(Settings):
        group_class = group.default_factory
        assert isinstance(group_class, type)
        for item in dataclasses.fields(group_class):
            yield Key(
                item.metadata[_KEY], group.name, item.name, item.metadata[_CONVERT], item.default
            )


KEYS: Mapping[str, Key] = {key.name: key for key in _keys()}


def settings_from_mapping(raw: Mapping[str, Any]) -> Settings:
    """Typed settings from flat ``key = value`` pairs; unset keys keep their default."""
    groups: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        key = KEYS.get(name)
        if key is None:
            close = difflib.get_close_matches(name, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown setting {name!r}{hint}")
        try:
            converted = key.convert(value)
        except ValueError as error:
            raise ConfigError(f"bad value for {name!r}: {error}") from None
        groups.setdefault(key.group, {})[key.field] = converted
    made: dict[str, Any] = {}
    for group in dataclasses.fields(Settings):
        assert isinstance(group.default_factory, type)
        made[group.name] = group.default_factory(**groups.get(group.name, {}))
    return Settings(**made)


_POSITION = re.compile(r"\(at line (\d+), column \d+\)")
_ASSIGNMENT = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


def _duplicate_key(text: str, error: tomllib.TOMLDecodeError) -> str | None:
    """The key a "Cannot overwrite a value" error is about, which tomllib does not say."""
    position = _POSITION.search(str(error))
    if not str(error).startswith("Cannot overwrite") or position is None:
        return None
    lines = text.splitlines()[: int(position.group(1))]
    # The value may span lines (an array): its key is the last one assigned.
    for line_number in range(len(lines), 0, -1):
        assigned = _ASSIGNMENT.match(lines[line_number - 1])
        if assigned is not None:
            first = next(
                number
                for number, line in enumerate(lines, 1)
                if (earlier := _ASSIGNMENT.match(line)) and earlier.group(1) == assigned.group(1)
            )
            return f"{assigned.group(1)!r} is set twice, on lines {first} and {line_number}"
    return None


def load_settings(path: Path | None) -> Settings:
    """Settings from a TOML file, or the embedded defaults when path is None."""
    if path is None:
        return Settings()
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid TOML: not UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        duplicate = _duplicate_key(text, error)
        if duplicate is not None:
            raise ConfigError(
                f"{path}: setting {duplicate}; edit the first one instead of adding another"
            ) from None
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    return settings_from_mapping(raw)
