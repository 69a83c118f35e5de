"""Settings: flat TOML keys outside, typed groups inside, every default in one place.

The TOML file stays flat, in the Postfix style mail administrators know
(``ttl = 900``, ``milter_socket = "unix:..."``). Inside, each key is a typed
field of one group (``settings.store.ttl``, ``settings.milter.socket``):
enums, paths, networks, user and group ids, converted once, when the file
is loaded.

- :mod:`popauth.config.converters`: raw TOML value to typed value, or a
  ValueError saying what is expected;
- :mod:`popauth.config.groups`: the groups, the only source of defaults;
- :mod:`popauth.config.loader`: the file, its keys and the groups joined;
- :mod:`popauth.config.effective`: ``check-config --show``.

This package loads only the standard library and popauth's pure modules (not
the code that asks the MTA), so that the stdlib-only commands (``popauth
sessions``) can read the settings.
"""

from popauth.basics.errors import ConfigError
from popauth.config.converters import ListenAddress
from popauth.config.groups import (
    DEFAULT_INGEST_SOCKET,
    DEFAULT_MILTER_SOCKET,
    FOLLOW_FORMATS,
    FOLLOW_STATE_DIRECTORY,
    LEARNED_UNLESS_SET,
    STATE_DIRECTORY,
    WIDEST_TRUSTED_PREFIX,
    AccountsSettings,
    FollowFormat,
    FollowSettings,
    FollowTrust,
    IngestSettings,
    LocalDeliverySettings,
    LogSettings,
    MetricsSettings,
    MilterSettings,
    PolicySettings,
    RelaySettings,
    SessionSettings,
    Settings,
    SocketmapSettings,
    StoreSettings,
)
from popauth.config.loader import KEYS, Key, load_settings, settings_from_mapping

__all__ = [
    "DEFAULT_INGEST_SOCKET",
    "DEFAULT_MILTER_SOCKET",
    "FOLLOW_FORMATS",
    "FOLLOW_STATE_DIRECTORY",
    "KEYS",
    "LEARNED_UNLESS_SET",
    "STATE_DIRECTORY",
    "WIDEST_TRUSTED_PREFIX",
    "AccountsSettings",
    "ConfigError",
    "FollowFormat",
    "FollowSettings",
    "FollowTrust",
    "IngestSettings",
    "Key",
    "ListenAddress",
    "LocalDeliverySettings",
    "LogSettings",
    "MetricsSettings",
    "MilterSettings",
    "PolicySettings",
    "RelaySettings",
    "SessionSettings",
    "Settings",
    "SocketmapSettings",
    "StoreSettings",
    "load_settings",
    "settings_from_mapping",
]
