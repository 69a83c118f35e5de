"""One wire definition: the server, the client and the CLI share it; the hook copies it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from popauth.doors.ingest import wire
from popauth.doors.ingest.protocol import parse_request
from popauth.doors.ingest.wire import ErrorCode, Verb

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
HOOK = CONTRIB / "dovecot" / "popauth-login"
COURIER_REPORTER = CONTRIB / "courier" / "popauth-courier-login"


def load_hook(path: Path = HOOK) -> ModuleType:
    """A contrib reporter as a module, without running it (it runs only as a script)."""
    loader = importlib.machinery.SourceFileLoader(f"contrib_{path.parent.name}", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", [HOOK, COURIER_REPORTER], ids=["dovecot", "courier"])
def test_the_hooks_copies_equal_the_wire_definitions(path: Path) -> None:
    hook = load_hook(path)
    assert hook.DEFAULT_SOCKET == wire.DEFAULT_SOCKET
    assert hook.MAX_LINE == wire.MAX_LINE
    assert Verb.LOGIN.value == hook.LOGIN
    assert hook.OK == wire.OK
    assert hook.BUSY_PREFIX == wire.BUSY_PREFIX
    for code in range(0x250):
        character = chr(code)
        assert hook.unsafe(character) == wire.has_control_characters(character), hex(code)


def test_the_defaults_of_cli_and_config_are_the_wire_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from popauth import cli, config

    # No --socket and no settings file (whatever this machine has in /etc): the wire default.
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    arguments = cli._parser().parse_args(["ping"])
    assert cli.settings_file(arguments) is None
    assert cli._client_socket(arguments) == wire.DEFAULT_SOCKET
    arguments.socket = "/x.sock"
    assert cli._client_socket(arguments) == "/x.sock"
    assert Path(wire.DEFAULT_SOCKET) == config.Settings().ingest.socket


def test_reply_forms() -> None:
    assert wire.ok() == b"OK\n"
    assert wire.ok("pong") == b"OK pong\n"
    assert wire.not_found("192.0.2.1") == b"NOTFOUND address=192.0.2.1\n"
    assert wire.not_found_user("alice") == b"NOTFOUND user=alice\n"
    assert wire.error(ErrorCode.BUSY, "try again").decode().startswith(wire.BUSY_PREFIX)
    body = wire.multi_line(["a=1", "b=2"]).decode().splitlines()
    assert body == ["OK count=2", "a=1", "b=2"]
    assert wire.announced_count(body[0]) == 2
    assert wire.announced_count("OK pong") is None
    assert wire.parse_fields("OK address=192.0.2.1 user=alice x") == {
        "address": "192.0.2.1",
        "user": "alice",
    }


def test_multi_line_verbs_are_known_in_any_case() -> None:
    assert {verb for verb in Verb if wire.is_multi_line(verb.value.lower())} == wire.MULTI_LINE
    assert not wire.is_multi_line("LOGIN 192.0.2.1 alice")


def test_the_longest_request_is_accepted_and_one_more_byte_is_not() -> None:
    line = b"PING" + b" " * (wire.MAX_LINE - 5) + b"\n"
    assert len(line) == wire.MAX_LINE
    assert parse_request(line).verb is Verb.PING
