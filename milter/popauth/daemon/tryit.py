"""The try-it mode: ``make run`` serves on a host with no MTA, and guesses nothing.

popauth must never serve a real MTA with a made-up list of local domains:
a wrong list refuses inbound mail or, worse, calls relayed mail inbound. So
a production ``popauth serve`` whose MTA cannot be read still refuses to
start, naming the keys to set. But a host with neither a configured Postfix
nor a configured Sendmail has no MTA to serve, so nothing can be harmed:
there ``make run`` starts this mode instead, which

- puts every socket under a directory of the checkout (``.cache/try-it``),
  where no MTA is attached, and keeps no state between starts;
- stands ``example.test`` (a name reserved for testing, RFC 2606) for the
  local domains, with ``local`` as its mailer, and learns nothing;
- writes those settings to ``popauth.toml`` in that directory, loaded like
  any settings file, so that ``popauth check-config`` shows them;
- prints, before serving, the commands that try it from a second terminal.

On a host where Postfix or Sendmail is configured (even one popauth cannot
read), ``make run`` is plain ``popauth serve``, which learns from that MTA
or refuses. Which of the two runs is :func:`choose_mode`'s decision.
"""

from __future__ import annotations

import enum
import json
import os
import shlex
import sys
from pathlib import Path

from popauth.config import LocalDeliverySettings, Settings
from popauth.localdelivery import LearnError
from popauth.localdelivery.commands import Runner
from popauth.localdelivery.resolve import learn_from_mta

TRY_IT_DOMAIN = "example.test"
TRY_IT_MAILER = "local"
SETTINGS_NAME = "popauth.toml"
# Documentation addresses (RFC 5737): a client that logs in, a stranger.
_CLIENT = "192.0.2.10"
_STRANGER = "198.51.100.7"
_USER = "joe"
_REMOTE = "friend@elsewhere.test"


class Mode(enum.Enum):
    # popauth serve on the settings given, or on the embedded defaults.
    SERVE = "serve"
    TRY_IT = "try-it"


def host_has_mta(local: LocalDeliverySettings, run: Runner | None = None) -> bool:
    """Whether a Postfix or Sendmail configuration is here to learn from.

    A configuration that exists but cannot be read counts as an MTA: plain
    ``serve`` then refuses with the reason, rather than trying it beside it.
    """
    try:
        learned, _ = learn_from_mta(local, None, run)
    except LearnError:
        return True
    return learned is not None


def choose_mode(*, config_given: bool, has_mta: bool) -> Mode:
    """``make run``'s choice: the try-it mode only with no settings and no MTA."""
    if config_given or has_mta:
        return Mode.SERVE
    return Mode.TRY_IT


def settings_text(directory: Path) -> str:
    """The try-it settings: every path under ``directory``, nothing learned."""
    values: dict[str, str | list[str]] = {
        "milter_socket": f"unix:{directory / 'milter.sock'}",
        "ingest_socket": str(directory / "ingest.sock"),
        "socketmap_socket": str(directory / "socketmap.sock"),
        # Nothing is kept between starts, so the commands it prints tell the
        # same story every time.
        "snapshot_path": "",
        "usage_path": "",
        "blocklist_path": "",
        "graduates_path": "",
        "local_domains": [TRY_IT_DOMAIN],
        "local_mailers": [TRY_IT_MAILER],
        "learn_from_mta": "none",
    }
    lines = [
        "# popauth's try-it mode (make run on a host with no MTA), rewritten at every",
        "# start. No MTA is attached to these sockets; example.test stands for your",
        "# domains; nothing is kept between starts. For a real MTA, start from",
        "# contrib/popauth.toml instead.",
    ]
    # JSON strings are TOML basic strings.
    lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_settings(directory: Path) -> Path:
    """Create ``directory`` (mode 0700) and write the try-it settings file in it."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / SETTINGS_NAME
    temporary = path.with_name(f".{SETTINGS_NAME}.tmp")
    temporary.write_text(settings_text(directory))
    os.replace(temporary, path)
    return path


def popauth_command() -> str:
    """This popauth's own executable: the checkout's ``.venv/bin/popauth``."""
    beside = Path(sys.prefix) / "bin" / "popauth"
    return str(beside) if beside.exists() else "popauth"


def _shown(path: str, base: Path) -> str:
    """``path`` relative to ``base`` when it lies under it, for shorter lines."""
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


def try_commands(settings: Settings, popauth: str, base: Path) -> list[tuple[str, list[str]]]:
    """What to try, in order: a few words, then the commands, as they will run."""
    program = _shown(popauth, base)
    socket = _shown(str(settings.ingest.socket), base)

    def command(verb: str, *words: str) -> str:
        return shlex.join([program, verb, "--socket", socket, *words])

    local = f"{_USER}@{TRY_IT_DOMAIN}"
    return [
        ("a stranger may not relay, and popauth says why:", [command("explain", _CLIENT, _REMOTE)]),
        (
            f"but anyone may send to the local domain {TRY_IT_DOMAIN}:",
            [command("explain", _STRANGER, local)],
        ),
        (
            f"{_USER} checks his mail from {_CLIENT} (what the POP/IMAP login hook reports):",
            [command("login", _CLIENT, _USER), command("query", _CLIENT)],
        ),
        (
            f"now {_CLIENT} may relay, for ttl = {settings.store.ttl} seconds:",
            [command("explain", _CLIENT, _REMOTE, "--user", _USER)],
        ),
        (
            "revoke it, and see why it is refused again:",
            [command("revoke", _CLIENT), command("explain", _CLIENT, _REMOTE)],
        ),
        (
            "a client that authenticated with SMTP AUTH may always relay:",
            [command("explain", _STRANGER, _REMOTE, "--auth", _USER)],
        ),
    ]


def banner(settings: Settings, settings_path: Path, why: str, base: Path) -> list[str]:
    """The first lines ``make run`` prints in the try-it mode."""
    directory = settings.ingest.socket.parent
    lines = [
        f"popauth try-it mode: {why}, so this popauth serves the example domain"
        f" {TRY_IT_DOMAIN} on sockets under {directory}, where no MTA is attached.",
        f"Settings: {settings_path}. Stop it with Ctrl-C. Try it from a second terminal:",
        f"    cd {shlex.quote(str(base))}",
    ]
    for words, commands in try_commands(settings, popauth_command(), base):
        lines.append(f"  {words}")
        lines += [f"    {command}" for command in commands]
    socketmap = settings.socketmap.socket
    lines.append(
        f"The milter listens on {settings.milter.socket}"
        + (f" and the socketmap on {socketmap}" if socketmap else "")
        + ": attach a test MTA to them, never one that serves mail (README: Try it)."
    )
    return lines
