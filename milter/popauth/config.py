"""Settings: every default in one place, loaded from TOML and validated at start.

An unknown key or a bad value stops ``popauth serve`` with a message naming
the key, because a typo in a relay-control config must not silently fall
back to something else.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popauth.addresses import AddressError, IPNetwork, NetworkSet, parse_network
from popauth.decision import PopFirst, RelayPolicy
from popauth.localdelivery import LocalDelivery
from popauth.localdelivery.resolve import LEARN_CHOICES

DEFAULT_INGEST_SOCKET = "/run/popauth/ingest.sock"
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


@dataclass(frozen=True)
class Settings:
    milter_socket: str = DEFAULT_MILTER_SOCKET
    milter_name: str = "popauth"
    # Seconds libmilter waits for the MTA before dropping a connection.
    milter_timeout: int = 600
    milter_socket_mode: int = 0o660
    milter_socket_group: str = ""
    ingest_socket: str = DEFAULT_INGEST_SOCKET
    ingest_socket_mode: int = 0o660
    ingest_socket_group: str = ""
    # Reporters: who may report logins (LOGIN), e.g. the POP server's hook.
    ingest_allowed_users: tuple[str, ...] = ()
    ingest_allowed_groups: tuple[str, ...] = ()
    # Operators: who may read (QUERY, LIST, REPORT, BLOCKED, STATS) and revoke.
    ingest_operator_users: tuple[str, ...] = ()
    ingest_operator_groups: tuple[str, ...] = ()
    # Administrators: everything, BLOCK/UNBLOCK too; root and popauth's user always.
    ingest_admin_users: tuple[str, ...] = ()
    ingest_admin_groups: tuple[str, ...] = ()
    # Seconds a client may take for one request line before it is dropped.
    ingest_timeout: float = 5.0
    ingest_max_clients: int = 256
    # Connections one uid without an ingest role may hold at once.
    ingest_clients_per_uid: int = 8
    # Seconds a new ingest connection may stay silent before it is closed.
    ingest_first_byte_timeout: float = 1.0
    # The socketmap door (Postfix/Sendmail lookup table); "" = off.
    socketmap_socket: str = ""
    socketmap_socket_mode: int = 0o660
    socketmap_socket_group: str = ""
    # The map name the MTA sends (socketmap:unix:/path:NAME, Kname socket ...).
    socketmap_name: str = "popauth"
    # The value answered for a whitelisted client ("OK" permits in Postfix).
    socketmap_ok_value: str = "OK"
    # Seconds to complete a request; seconds an idle connection is kept.
    socketmap_timeout: float = 5.0
    socketmap_idle_timeout: float = 300.0
    socketmap_max_clients: int = 512
    # Connections one uid outside the socket's group may hold at once.
    socketmap_clients_per_uid: int = 8
    ttl: int = 900
    # popauth sessions (on the Dovecot host): seconds between renewals of the
    # entries of open sessions; 0 = a quarter of ttl. Must be less than ttl.
    session_renew_interval: float = 0.0
    # The doveadm that lists sessions, and Dovecot's configuration for it
    # ("" = doveadm's default); which Dovecot protocols' sessions count.
    session_doveadm: str = "doveadm"
    session_dovecot_config: str = ""
    session_protocols: tuple[str, ...] = ("imap", "pop3")
    # popauth follow: the log it reads ("-" = standard input), the login
    # format of the POP/IMAP server that writes it, and how far it is trusted.
    follow_log: str = ""
    follow_format: str = ""
    # follow_format = "regex": a pattern with named groups ip and user,
    # matched against the whole message after the program tag.
    follow_regex: str = ""
    # Program tags that count; [] = the format's own.
    follow_programs: tuple[str, ...] = ()
    # "rsyslog": lines in popauth's rsyslog template, sender checked by the
    # kernel's credentials; "file": every line of the log is the server's.
    follow_trust: str = "rsyslog"
    follow_trusted_users: tuple[str, ...] = ("root",)
    follow_state_path: str = "/var/lib/popauth/follow.json"
    # Logins logged longer ago than this are not reported (seconds).
    follow_max_age: int = 60
    follow_poll_interval: float = 0.1
    max_entries: int = 100_000
    store: str = "memory"
    # The embedded store's snapshot; "" disables it.
    snapshot_path: str = "/var/lib/popauth/whitelist.json"
    snapshot_interval: int = 60
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Seconds a Redis connect or reply may take before the caller fails closed.
    redis_timeout: float = 0.5
    redis_key_prefix: str = "popauth:"
    # Redis Sentinel: "HOST:PORT" of each sentinel; empty = talk to redis_url directly.
    redis_sentinels: tuple[str, ...] = ()
    # The master's name in the sentinels' configuration ("sentinel monitor NAME ...").
    redis_sentinel_service: str = "popauth"
    # The sentinels' own credentials and TLS (the master's come from redis_url).
    redis_sentinel_username: str = ""
    redis_sentinel_password: str = ""
    redis_sentinel_tls: bool = False
    redis_sentinel_tls_ca_file: str = ""
    redis_sentinel_tls_cert_file: str = ""
    redis_sentinel_tls_key_file: str = ""
    # Replicas that must hold a login before it is acknowledged (WAIT); 0 = none.
    redis_wait_replicas: int = 0
    # Seconds a login waits for those replicas before it is refused.
    redis_wait_timeout: float = 0.1
    trusted_networks: tuple[IPNetwork, ...] = field(
        default_factory=lambda: (parse_network("127.0.0.0/8"), parse_network("::1/128"))
    )
    # A trusted network wider than WIDEST_TRUSTED_PREFIX makes an open relay by
    # configuration; it is refused unless this says it is meant.
    allow_wide_trusted_networks: bool = False
    ipv6_prefix: int = 128
    # None (the key absent): learned from the MTA at start and on reload.
    local_domains: tuple[str, ...] | None = None
    local_mailers: tuple[str, ...] | None = None
    # Which MTA to learn them from: "auto" tries Postfix, then Sendmail.
    learn_from_mta: str = "auto"
    # Postfix's config_directory; "" = as Postfix's own commands (MAIL_CONFIG).
    postfix_config_directory: str = ""
    sendmail_cf: str = "/etc/mail/sendmail.cf"
    sendmail_command: str = "/usr/sbin/sendmail"
    reject_message: str = DEFAULT_REJECT_MESSAGE
    pop_first: str = "on"
    pop_first_retired_message: str = DEFAULT_POP_FIRST_RETIRED_MESSAGE
    accounting: str = "messages"
    usage_path: str = "/var/lib/popauth/usage.json"
    usage_max_users: int = 100_000
    # Used with the memory store; a Redis site keeps its block list in Redis.
    blocklist_path: str = "/var/lib/popauth/blocked.json"
    # "HOST:PORT" serves Prometheus metrics there; "" turns it off.
    metrics_listen: str = ""
    log_format: str = "console"
    log_level: str = "info"

    def sentinel_addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(_split_host_port(address) for address in self.redis_sentinels)

    def relay_policy(self, local: LocalDelivery) -> RelayPolicy:
        """The decision's data, with the effective local domains and mailers."""
        return RelayPolicy(
            trusted_networks=NetworkSet.of(self.trusted_networks),
            local_domains=local.domain_set(),
            local_mailers=local.mailer_set(),
            pop_first=PopFirst(self.pop_first),
        )

    def session_interval(self) -> float:
        """Seconds between session renewals (``session_renew_interval``, or ttl / 4)."""
        return self.session_renew_interval or self.ttl / 4

    def metrics_address(self) -> tuple[str, int] | None:
        if not self.metrics_listen:
            return None
        host, _, port = self.metrics_listen.rpartition(":")
        return host.strip("[]"), int(port)

    def ingest_socket_path(self) -> Path:
        return Path(self.ingest_socket)

    def milter_socket_path(self) -> Path | None:
        """The filesystem path of a ``unix:``/``local:`` milter socket."""
        kind, _, rest = self.milter_socket.partition(":")
        return Path(rest) if kind in ("unix", "local") else None


# --- validators: each takes the raw TOML value and returns the typed one ---

_Validator = Callable[[Any], Any]
_LOG_LEVELS = ("debug", "info", "warning", "error")
_MAILER = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_DOMAIN = re.compile(r"\.?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)\.?")
_PROTOCOL = re.compile(r"[a-z0-9_-]{1,32}")
_SMTP_TEXT = re.compile(r"[\x20-\x7e]*")
# C0 controls, DEL and C1 controls: a line break in a mailer name, a NUL in a
# path or an escape sequence in a message is never meant and fails later.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DECIMAL = re.compile(r"[0-9]+")
_PORT = r"(?P<port>[1-9][0-9]{0,4})"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH_BYTES = 107
# Trusted networks wider than these cover a large part of the Internet: an IPv4
# /8 is 1/256 of all addresses, and no single provider holds an IPv6 network
# wider than a /16 (the largest allocations are about /19).
WIDEST_TRUSTED_PREFIX = {4: 8, 6: 16}


def _integer(low: int, high: int) -> _Validator:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return check


def _number(low: float, high: float) -> _Validator:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return float(value)

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _clean(text: str) -> str:
    """``text`` unchanged, unless it holds a control character (then ValueError)."""
    control = _CONTROL.search(text)
    if control is not None:
        raise ValueError(
            f"must not contain control characters ({control.group()!r} at {control.start()})"
        )
    return text


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return _clean(value)


def _string_list(item: Callable[[str], Any]) -> _Validator:
    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of strings")
        return tuple(item(_clean(v)) for v in value)

    return check


def _choice(*choices: str) -> _Validator:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return str(value)

    return check


def _mode(value: Any) -> int:
    # TOML has no octal strings people recognise, so accept "0660" too.
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ValueError('must be a permission mode such as "0660"')


def _matching(pattern: str, requirement: str, flags: int = 0) -> _Validator:
    """A string that matches ``pattern`` whole; ``requirement`` says what is expected."""
    compiled = re.compile(pattern, flags)

    def check(value: Any) -> str:
        text = _text(value)
        if not compiled.fullmatch(text):
            raise ValueError(requirement)
        return text

    return check


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {text} is not between 1 and 65535")
    return port


def _file_path(text: str) -> str:
    """An absolute path that can name a file: not "/", not ending in "/", "." or ".."."""
    if not text.startswith("/"):
        raise ValueError("must be an absolute path")
    name = text.rsplit("/", 1)[1]
    if name in ("", ".", ".."):
        raise ValueError("must name a file, not a directory")
    if Path(text).is_dir():
        raise ValueError(f"{text} is a directory")
    return text


def _file(value: Any) -> str:
    return _file_path(_text(value))


def _directory_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("must be an absolute path")
    return text


def _socket_path(text: str) -> str:
    _file_path(text)
    if len(text.encode()) > _MAX_SOCKET_PATH_BYTES:
        raise ValueError(f"a socket path may be at most {_MAX_SOCKET_PATH_BYTES} bytes long")
    return text


def _socket(value: Any) -> str:
    return _socket_path(_text(value))


_MILTER_UNIX = re.compile(r"(unix|local):(?P<path>.+)")
_MILTER_INET = re.compile(rf"(?P<family>inet6?):{_PORT}(@(?P<host>.+))?")
_MILTER_SPEC_HELP = 'must be a libmilter socket such as "unix:/path" or "inet:PORT@HOST"'


def _milter_spec(value: Any) -> str:
    text = _text(value)
    unix = _MILTER_UNIX.fullmatch(text)
    if unix is not None:
        _socket_path(unix["path"])
        return text
    inet = _MILTER_INET.fullmatch(text)
    if inet is None:
        raise ValueError(_MILTER_SPEC_HELP)
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


_sentinel_service = _matching(
    r"[A-Za-z0-9_.-]{1,64}", "must be 1 to 64 letters, digits, '_', '.' or '-'"
)


def _redis_url(value: Any) -> str:
    text = _text(value)
    if not re.fullmatch(r"(redis|rediss|unix)://.*", text):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    from urllib.parse import urlsplit

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


_socketmap_name = _matching(
    r"[A-Za-z0-9_.-]{1,64}", "must be 1 to 64 letters, digits, '_', '.' or '-'"
)
_socketmap_value = _matching(
    r"[\x21-\x7e]([\x20-\x7e]{0,198}[\x21-\x7e])?",
    "must be 1 to 200 printable ASCII characters, not blank at either end",
)
_key_prefix = _matching(r"[\x21-\x7e]{0,64}", "must be up to 64 visible ASCII characters")
_milter_name = _matching(r"[\x21-\x7e]{1,64}", "must be 1 to 64 visible ASCII characters")
_LISTEN = re.compile(rf"(?P<host>[0-9.]+|\[[0-9A-Fa-f:.]+\]):{_PORT}")


def _listen_address(value: Any) -> str:
    text = _text(value)
    if not text:
        return text
    listen = _LISTEN.fullmatch(text)
    if listen is None:
        raise ValueError('must be "ADDRESS:PORT", e.g. "127.0.0.1:9754" or "[::1]:9754", or ""')
    _port(listen["port"])
    host = listen["host"]
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None
    if (address.version == 6) != host.startswith("["):
        raise ValueError("an IPv6 address goes in brackets, an IPv4 address does not")
    return text


def _split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _host_port(text: str) -> str:
    """A sentinel: "HOST:PORT", an IPv6 address in brackets."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not host:
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


def _existing_file(text: str) -> str:
    _file_path(text)
    if not Path(text).is_file():
        raise ValueError(f"no such file: {text}")
    return text


def _network(text: str) -> IPNetwork:
    try:
        return parse_network(text)
    except AddressError as error:
        raise ValueError(str(error)) from None


def _domain(text: str) -> str:
    if not _DOMAIN.fullmatch(text):
        raise ValueError(f"not a domain: {text!r}")
    return text.lower()


def _mailer(text: str) -> str:
    if not _MAILER.fullmatch(text):
        raise ValueError(f"not a mailer name: {text!r}")
    return text.lower()


def _renew_interval(value: Any) -> float:
    interval: float = _number(0, 86_400)(value)
    if 0 < interval < 0.1:
        raise ValueError("must be 0 (a quarter of ttl) or at least 0.1")
    return interval


def _protocol(text: str) -> str:
    if not _PROTOCOL.fullmatch(text):
        raise ValueError(f"not a Dovecot protocol name: {text!r}")
    return text


def _user(text: str) -> str:
    if not _DECIMAL.fullmatch(text):
        try:
            pwd.getpwnam(text)
        except KeyError:
            raise ValueError(f"no such user: {text!r}") from None
    return text


def _group(text: str) -> str:
    if not _DECIMAL.fullmatch(text):
        try:
            grp.getgrnam(text)
        except KeyError:
            raise ValueError(f"no such group: {text!r}") from None
    return text


def _optional(validator: Callable[[str], str]) -> _Validator:
    """The empty string (meaning "off" or "none"), or what ``validator`` accepts."""

    def check(value: Any) -> str:
        text = _text(value)
        return validator(text) if text else text

    return check


def _reject_message(value: Any) -> str:
    text = _text(value)
    # libmilter drops a reply with a lone '%', and SMTP replies are ASCII.
    if not _SMTP_TEXT.fullmatch(text) or "%" in text:
        raise ValueError("must be printable ASCII without '%'")
    if len(text) > 400:
        raise ValueError("must be at most 400 characters")
    return text


def _nonempty(validator: _Validator) -> _Validator:
    def check(value: Any) -> Any:
        result = validator(value)
        if not result:
            raise ValueError("must not be empty")
        return result

    return check


FOLLOW_FORMATS = ("courier", "cyrus", "dovecot", "popa3d", "solid-pop3d", "qpopper", "uw", "regex")
_PROGRAM = re.compile(r"[^\s\[\]:]{1,64}")


def _follow_log(text: str) -> str:
    if text != "-" and not text.startswith("/"):
        raise ValueError('must be an absolute path, or "-" for standard input')
    return text


def _follow_regex(value: Any) -> str:
    text = _text(value)
    if not text:
        return text
    try:
        pattern = re.compile(text)
    except re.error as error:
        raise ValueError(f"does not compile: {error}") from None
    if not {"ip", "user"} <= set(pattern.groupindex):
        raise ValueError("needs the named groups (?P<ip>...) and (?P<user>...)")
    return text


def _program(text: str) -> str:
    if not _PROGRAM.fullmatch(text):
        raise ValueError(f"not a program tag: {text!r}")
    return text


VALIDATORS: Mapping[str, _Validator] = {
    "milter_socket": _milter_spec,
    "milter_name": _milter_name,
    "milter_timeout": _integer(1, 86_400),
    "milter_socket_mode": _mode,
    "milter_socket_group": _optional(_group),
    "ingest_socket": _socket,
    "ingest_socket_mode": _mode,
    "ingest_socket_group": _optional(_group),
    "ingest_allowed_users": _string_list(_user),
    "ingest_allowed_groups": _string_list(_group),
    "ingest_operator_users": _string_list(_user),
    "ingest_operator_groups": _string_list(_group),
    "ingest_admin_users": _string_list(_user),
    "ingest_admin_groups": _string_list(_group),
    "ingest_timeout": _number(0.1, 300),
    "ingest_max_clients": _integer(1, 100_000),
    "ingest_clients_per_uid": _integer(1, 100_000),
    "ingest_first_byte_timeout": _number(0.1, 300),
    "socketmap_socket": _optional(_socket_path),
    "socketmap_socket_mode": _mode,
    "socketmap_socket_group": _optional(_group),
    "socketmap_name": _socketmap_name,
    "socketmap_ok_value": _socketmap_value,
    "socketmap_timeout": _number(0.1, 300),
    "socketmap_idle_timeout": _number(1, 86_400),
    "socketmap_max_clients": _integer(1, 100_000),
    "socketmap_clients_per_uid": _integer(1, 100_000),
    "ttl": _integer(1, 7 * 86_400),
    "session_renew_interval": _renew_interval,
    "session_doveadm": _nonempty(_text),
    "session_dovecot_config": _optional(_file_path),
    "session_protocols": _nonempty(_string_list(_protocol)),
    "follow_log": _optional(_follow_log),
    "follow_format": _optional(_choice(*FOLLOW_FORMATS)),
    "follow_regex": _follow_regex,
    "follow_programs": _string_list(_program),
    "follow_trust": _choice("rsyslog", "file"),
    "follow_trusted_users": _nonempty(_string_list(_user)),
    "follow_state_path": _optional(_file_path),
    "follow_max_age": _integer(1, 86_400),
    "follow_poll_interval": _number(0.01, 10),
    "max_entries": _integer(1, 100_000_000),
    "store": _choice("memory", "redis"),
    "snapshot_path": _optional(_file_path),
    "snapshot_interval": _integer(1, 86_400),
    "redis_url": _redis_url,
    "redis_timeout": _number(0.01, 30),
    "redis_key_prefix": _key_prefix,
    "redis_sentinels": _string_list(_host_port),
    "redis_sentinel_service": _sentinel_service,
    "redis_sentinel_username": _text,
    "redis_sentinel_password": _text,
    "redis_sentinel_tls": _boolean,
    "redis_sentinel_tls_ca_file": _optional(_existing_file),
    "redis_sentinel_tls_cert_file": _optional(_existing_file),
    "redis_sentinel_tls_key_file": _optional(_existing_file),
    "redis_wait_replicas": _integer(0, 16),
    "redis_wait_timeout": _number(0.001, 30),
    "trusted_networks": _string_list(_network),
    "allow_wide_trusted_networks": _boolean,
    "ipv6_prefix": _integer(0, 128),
    "local_domains": _string_list(_domain),
    "local_mailers": _nonempty(_string_list(_mailer)),
    "learn_from_mta": _choice(*LEARN_CHOICES),
    "postfix_config_directory": _optional(_directory_path),
    "sendmail_cf": _file,
    "sendmail_command": _file,
    "reject_message": _reject_message,
    "pop_first": _choice("on", "warn", "off"),
    "pop_first_retired_message": _reject_message,
    "accounting": _choice("messages", "recipients"),
    "usage_path": _optional(_file_path),
    "usage_max_users": _integer(1, 10_000_000),
    "blocklist_path": _optional(_file_path),
    "metrics_listen": _listen_address,
    "log_format": _choice("console", "json"),
    "log_level": _choice(*_LOG_LEVELS),
}


def settings_from_mapping(raw: Mapping[str, Any]) -> Settings:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        validator = VALIDATORS.get(key)
        if validator is None:
            raise ConfigError(f"unknown setting {key!r}")
        try:
            values[key] = validator(value)
        except ValueError as error:
            raise ConfigError(f"bad value for {key!r}: {error}") from None
    settings = Settings(**values)
    _check_trusted_networks(settings)
    _check_session_renew_interval(settings)
    _check_redis(settings)
    _check_follow_regex(settings)
    return settings


def _check_follow_regex(settings: Settings) -> None:
    if settings.follow_format == "regex" and not (
        settings.follow_regex and settings.follow_programs
    ):
        raise ConfigError(
            "bad value for 'follow_format': \"regex\" needs follow_regex and follow_programs"
        )


def _check_trusted_networks(settings: Settings) -> None:
    """Refuse a trusted network that lets much of the Internet relay, unless meant."""
    if settings.allow_wide_trusted_networks:
        return
    for network in settings.trusted_networks:
        widest = WIDEST_TRUSTED_PREFIX[network.version]
        if network.prefixlen < widest:
            raise ConfigError(
                f"bad value for 'trusted_networks': {network} is wider than a /{widest} "
                "and would let much of the Internet relay; set "
                "allow_wide_trusted_networks = true if that is meant"
            )


def _check_session_renew_interval(settings: Settings) -> None:
    interval = settings.session_renew_interval
    if interval and interval >= settings.ttl:
        # A renewal must come before the entry it renews expires.
        raise ConfigError(
            f"bad value for 'session_renew_interval': must be less than ttl ({settings.ttl}), "
            "or 0 for a quarter of it"
        )


def _check_redis(settings: Settings) -> None:
    """Redis settings that only fail when read together."""
    if settings.redis_sentinels and settings.redis_url.startswith("unix://"):
        raise ConfigError(
            "bad value for 'redis_sentinels': sentinels name TCP masters, "
            "so redis_url must not be unix://"
        )
    tls_files = (
        settings.redis_sentinel_tls_ca_file,
        settings.redis_sentinel_tls_cert_file,
        settings.redis_sentinel_tls_key_file,
    )
    if any(tls_files) and not settings.redis_sentinel_tls:
        raise ConfigError("redis_sentinel_tls_*_file needs redis_sentinel_tls = true")
    if bool(settings.redis_sentinel_tls_cert_file) != bool(settings.redis_sentinel_tls_key_file):
        raise ConfigError(
            "redis_sentinel_tls_cert_file and redis_sentinel_tls_key_file go together"
        )
    if settings.redis_wait_replicas and settings.redis_wait_timeout >= settings.redis_timeout:
        raise ConfigError("bad value for 'redis_wait_timeout': must be shorter than redis_timeout")


def load_settings(path: Path | None) -> Settings:
    """Settings from a TOML file, or the embedded defaults when path is None."""
    if path is None:
        return Settings()
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    return settings_from_mapping(raw)
