"""debian/ agrees with the rest of the tree (the package itself: test_debian_host.py)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from popauth.config import KEYS

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "debian"


def test_the_package_version_is_the_project_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"popauth ({project})"), first


def test_the_conffile_holds_only_real_keys_each_explained() -> None:
    text = (DEBIAN / "conf" / "popauth.toml").read_text()
    assigned = re.findall(r"^#?([a-z_]+) = ", text, re.MULTILINE)
    assert assigned, text
    assert set(assigned) <= set(KEYS), set(assigned) - set(KEYS)
    # Far fewer than the full reference: the operator's decisions only.
    assert len(assigned) < len(KEYS) / 3
    active = tomllib.loads(text)
    assert active["milter_socket"].startswith("unix:/var/spool/postfix/")


def test_every_unit_is_packaged_with_documentation_the_package_ships() -> None:
    rules = (DEBIAN / "rules").read_text()
    units = re.search(r"^UNITS = (.+)$", rules, re.MULTILINE)
    assert units is not None
    shipped = {path.stem for path in (REPO / "contrib" / "systemd").glob("*.service")}
    assert set(units.group(1).split()) == shipped
    docs = (DEBIAN / "popauth.docs").read_text().split()
    for unit in shipped:
        text = (REPO / "contrib" / "systemd" / f"{unit}.service").read_text()
        for path in re.findall(r"file:///usr/share/doc/popauth/(\S+)", text):
            assert path.split("/")[0] in docs, (unit, path)
            assert (REPO / path).is_file(), (unit, path)
