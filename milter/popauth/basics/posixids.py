"""Local users and groups as configured: the name an operator wrote, and its id.

Names are looked up once, when the settings are loaded; every door and
companion then works with the id, and messages still show the name.
"""

from __future__ import annotations

import grp
import pwd
import re
from dataclasses import dataclass

# ASCII digits only: "\u0661" (ARABIC-INDIC DIGIT ONE) is not a uid.
_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class SystemUser:
    name: str
    uid: int

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SystemGroup:
    name: str
    gid: int

    def __str__(self) -> str:
        return self.name


def system_user(name: str) -> SystemUser:
    """A number, or a user name this host knows; KeyError for an unknown name."""
    uid = int(name) if _NUMBER.fullmatch(name) else pwd.getpwnam(name).pw_uid
    return SystemUser(name, uid)


def system_group(name: str) -> SystemGroup:
    """A number, or a group name this host knows; KeyError for an unknown name."""
    gid = int(name) if _NUMBER.fullmatch(name) else grp.getgrnam(name).gr_gid
    return SystemGroup(name, gid)


ROOT = SystemUser("root", 0)
