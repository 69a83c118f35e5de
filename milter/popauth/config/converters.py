"""The converters: each takes a raw TOML value and returns the typed one.

A converter raises ValueError saying what is expected; the loader adds the
key's name. Strings go through :func:`matching`, so they are checked whole
(``fullmatch``), and every string first through :func:`text`, which refuses
control characters.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from popauth.basics.addresses import AddressError, IPNetwork, NetworkSet, parse_network
from popauth.basics.posixids import SystemGroup, SystemUser, system_group, system_user
from popauth.doors.ingest import wire
from popauth.localdelivery import DOMAIN_NAME, MAILER_NAME

T = TypeVar("T")
EnumT = TypeVar("EnumT", bound=enum.Enum)
Converter = Callable[[Any], T]

_PORT = r"(?P<port>[1-9][0-9]{0,4})"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH_BYTES = 107


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


def text(value: Any) -> str:
    """A string without control characters; every string setting starts here.

    A line break in a mailer name, a NUL in a path or an escape sequence in a
    message is never meant and fails later.
    """
    if not isinstance(value, str):
        raise ValueError("must be a string")
    control = wire.CONTROL_CHARACTER.search(value)
    if control is not None:
        raise ValueError(
            f"must not contain control characters ({control.group()!r} at {control.start()})"
        )
    return value


def matching(pattern: str, requirement: str) -> Converter[str]:
    """A string that matches ``pattern`` whole; ``requirement`` says what is expected."""
    compiled = re.compile(pattern)

    def convert(value: Any) -> str:
        checked = text(value)
        if not compiled.fullmatch(checked):
            raise ValueError(requirement)
        return checked

    return convert


def then(first: Converter[Any], second: Callable[[Any], T]) -> Converter[T]:
    """``first``, then ``second`` on its result (a check or a conversion)."""
    return lambda value: second(first(value))


def optional(convert: Converter[T]) -> Converter[T | None]:
    """The empty string (the file's one way to say "off" or "none") as None."""

    def check(value: Any) -> T | None:
        return None if text(value) == "" else convert(value)

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


def mode(value: Any) -> int:
    # TOML has no octal strings people recognise, so accept "0660" too.
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ValueError('must be a permission mode such as "0660"')


def _port(digits: str) -> int:
    port = int(digits)
    if not 0 < port < 65536:
        raise ValueError(f"port {digits} is not between 1 and 65535")
    return port


def file_path(value: Any) -> Path:
    """An absolute path that can name a file: not "/", not ending in "/", "." or ".."."""
    checked = text(value)
    if not checked.startswith("/"):
        raise ValueError("must be an absolute path")
    if checked.rsplit("/", 1)[1] in ("", ".", ".."):
        raise ValueError("must name a file, not a directory")
    path = Path(checked)
    try:
        is_directory = path.is_dir()
    except OSError:
        # A directory this user may not look into (another service's): the
        # code that opens the file says so, naming it.
        is_directory = False
    if is_directory:
        raise ValueError(f"{checked} is a directory")
    return path


def socket_path(value: Any) -> Path:
    path = file_path(value)
    if len(bytes(path)) > _MAX_SOCKET_PATH_BYTES:
        raise ValueError(f"a socket path may be at most {_MAX_SOCKET_PATH_BYTES} bytes long")
    return path


_MILTER_UNIX = re.compile(r"(unix|local):(?P<path>.+)")
_MILTER_INET = re.compile(rf"(?P<family>inet6?):{_PORT}(@(?P<host>.+))?")


def milter_spec(value: Any) -> str:
    checked = text(value)
    unix = _MILTER_UNIX.fullmatch(checked)
    if unix is not None:
        socket_path(unix["path"])
        return checked
    inet = _MILTER_INET.fullmatch(checked)
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
    return checked


def redis_url(value: Any) -> str:
    checked = text(value)
    if not re.fullmatch(r"(redis|rediss|unix)://.*", checked):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    try:
        parts = urlsplit(checked)
        _ = parts.port  # ValueError for a port out of range
    except ValueError as error:
        raise ValueError(f"not a usable Redis URL: {error}") from None
    # redis-py ignores a database path that is not a number; say so instead.
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            raise ValueError("a unix:// URL needs an absolute socket path")
    elif not re.fullmatch(r"/?([0-9]+)?", parts.path):
        raise ValueError(f"the database in {parts.path!r} is not a number")
    return checked


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_LISTEN = re.compile(rf"(?P<host>[0-9.]+|\[[0-9A-Fa-f:.]+\]):{_PORT}")


def listen_address(value: Any) -> ListenAddress:
    listen = _LISTEN.fullmatch(text(value))
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


_name = matching(r"[^\s:/]{1,64}", "must be a user or group name, or a number")


def user(value: Any) -> SystemUser:
    """A user name or number, looked up here, once: the doors get the uid."""
    name = _name(value)
    try:
        return system_user(name)
    except KeyError:
        raise ValueError(f"no such user: {name!r}") from None


def group(value: Any) -> SystemGroup:
    """A group name or number, looked up here, once: the doors get the gid."""
    name = _name(value)
    try:
        return system_group(name)
    except KeyError:
        raise ValueError(f"no such group: {name!r}") from None


def _network(network_text: str) -> IPNetwork:
    try:
        return parse_network(network_text)
    except AddressError as error:
        raise ValueError(str(error)) from None


def renew_interval(value: Any) -> float:
    interval = number(0, 86_400)(value)
    if 0 < interval < 0.1:
        raise ValueError("must be 0 (a quarter of ttl) or at least 0.1")
    return interval


protocols = nonempty(
    string_list(matching(r"[a-z0-9_-]{1,32}", 'not a Dovecot protocol name such as "imap"'))
)


def host_port(value: Any) -> str:
    """A sentinel: "HOST:PORT", an IPv6 address in brackets."""
    checked = text(value)
    host, colon, port = checked.rpartition(":")
    if not colon or not re.fullmatch(r"[0-9]+", port) or not host:
        raise ValueError(f'not "HOST:PORT": {checked!r}')
    _port(port)
    if ":" in host or host.startswith("["):
        if not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f'an IPv6 address goes in brackets, "[ADDRESS]:PORT": {checked!r}')
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"not an IPv6 address: {host!r}") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"not a host name or address: {host!r}")
    return checked


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def existing_file(value: Any) -> str:
    path = file_path(value)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return str(path)


def follow_regex(value: Any) -> str:
    checked = text(value)
    try:
        pattern = re.compile(checked)
    except re.error as error:
        raise ValueError(f"does not compile: {error}") from None
    if not {"ip", "user"} <= set(pattern.groupindex):
        raise ValueError("needs the named groups (?P<ip>...) and (?P<user>...)")
    return checked


follow_log = matching(r"-|/.*", 'must be an absolute path, or "-" for standard input')
programs = string_list(matching(r"[^\s\[\]:]{1,64}", "must be program tags"))
any_text = matching(".*", "must be text")
visible = matching(r"[\x21-\x7e]{1,64}", "must be 1 to 64 visible ASCII characters")
socketmap_name = matching(
    r"[A-Za-z0-9_.-]{1,64}", "must be 1 to 64 letters, digits, '_', '.' or '-'"
)
socketmap_value = matching(
    r"[\x21-\x7e]([\x20-\x7e]{0,198}[\x21-\x7e])?",
    "must be 1 to 200 printable ASCII characters, not blank at either end",
)
key_prefix = matching(r"[\x21-\x7e]{0,64}", "must be up to 64 visible ASCII characters")
# libmilter drops a reply with a lone '%', and SMTP replies are ASCII.
smtp_text = matching(
    r"[\x20-\x24\x26-\x7e]{0,400}", "must be at most 400 printable ASCII characters without '%'"
)
_mailer = matching(MAILER_NAME.pattern, 'must be mailer names such as "local"')
_domain = matching(
    DOMAIN_NAME.pattern,
    'must be domains such as "example.org", or ".example.org" for its subdomains',
)
_network_text = matching(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?", 'must be networks such as "10.0.0.0/8"')
sentinel_service = matching(
    r"[A-Za-z0-9_.-]{1,64}", "must be 1 to 64 letters, digits, '_', '.' or '-'"
)
users = string_list(user)
groups = string_list(group)
networks = then(string_list(then(_network_text, _network)), NetworkSet.of)
domains = string_list(then(_domain, str.lower))
mailers = nonempty(string_list(then(_mailer, str.lower)))
directory = matching(r"/.*", "must be an absolute path")


def rfc3339_time(value: Any) -> datetime.datetime:
    """An RFC 3339 time with its offset (a TOML date-time, or one as a string), or
    a date alone (midnight UTC); returned with its time zone."""
    if isinstance(value, str):
        try:
            value = (
                datetime.date.fromisoformat(value)
                if len(value) == 10
                else datetime.datetime.fromisoformat(value)
            )
        except ValueError:
            raise ValueError(
                "must be an RFC 3339 time, e.g. 2027-03-01T00:00:00Z, or a date, 2027-03-01"
            ) from None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError("must carry its offset from UTC, e.g. 2027-03-01T00:00:00Z")
        return value
    if isinstance(value, datetime.date):
        return datetime.datetime.combine(value, datetime.time(), datetime.UTC)
    raise ValueError("must be an RFC 3339 time, e.g. 2027-03-01T00:00:00Z, or a date, 2027-03-01")
