"""The try-it mode: when make run chooses it, its settings, and what it prints."""

from __future__ import annotations

import shlex
import stat
import tomllib
from pathlib import Path

import pytest

from popauth.config import load_settings, settings_from_mapping
from popauth.daemon.serve import state_file_paths
from popauth.daemon.tryit import (
    TRY_IT_DOMAIN,
    Mode,
    banner,
    choose_mode,
    host_has_mta,
    settings_text,
    try_commands,
    write_settings,
)


@pytest.mark.parametrize(
    ("config_given", "has_mta", "mode"),
    [
        (False, False, Mode.TRY_IT),
        (False, True, Mode.SERVE),
        (True, False, Mode.SERVE),
        (True, True, Mode.SERVE),
    ],
)
def test_only_no_settings_and_no_mta_chooses_the_try_it_mode(
    config_given: bool, has_mta: bool, mode: Mode
) -> None:
    assert choose_mode(config_given=config_given, has_mta=has_mta) is mode


def test_an_mta_is_seen_when_configured_and_when_it_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    postfix = tmp_path / "postfix"
    postfix.mkdir()
    (postfix / "main.cf").write_text("compatibility_level = 3.6\nmydestination = mx.test\n")
    # postconf finds its configuration through MAIL_CONFIG: here, none.
    monkeypatch.setenv("MAIL_CONFIG", str(empty))
    no_sendmail = {"sendmail_cf": str(empty / "sendmail.cf")}
    assert not host_has_mta(settings_from_mapping(no_sendmail).local)
    configured = {**no_sendmail, "postfix_config_directory": str(postfix)}
    assert host_has_mta(settings_from_mapping(configured).local)
    # Named but unreadable is still an MTA: plain serve refuses with the reason.
    unreadable = {**no_sendmail, "postfix_config_directory": str(empty)}
    assert host_has_mta(settings_from_mapping(unreadable).local)


def test_the_settings_put_every_path_under_the_directory_and_learn_nothing(
    tmp_path: Path,
) -> None:
    settings = settings_from_mapping(tomllib.loads(settings_text(tmp_path)))
    assert settings.milter.socket == f"unix:{tmp_path / 'milter.sock'}"
    assert settings.ingest.socket == tmp_path / "ingest.sock"
    assert settings.socketmap.socket == tmp_path / "socketmap.sock"
    assert settings.local.local_domains == (TRY_IT_DOMAIN,)
    assert settings.local.local_mailers == ("local",)
    assert settings.local.learn_from_mta == "none"
    # Nothing kept between starts: no state file anywhere.
    assert state_file_paths(settings) == []


def test_the_settings_file_is_written_in_a_private_directory(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "try-it"
    path = write_settings(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert load_settings(path).ingest.socket == directory / "ingest.sock"
    path.write_text("garbage")
    assert write_settings(directory) == path
    assert load_settings(path).ingest.socket == directory / "ingest.sock"


def test_the_commands_are_relative_to_the_checkout_when_they_can_be(tmp_path: Path) -> None:
    settings = load_settings(write_settings(tmp_path / ".cache" / "try-it"))
    popauth = str(tmp_path / ".venv" / "bin" / "popauth")
    steps = try_commands(settings, popauth, tmp_path)
    commands = [shlex.split(command) for _, group in steps for command in group]
    assert all(words[:1] == [".venv/bin/popauth"] for words in commands)
    assert all(words[2:4] == ["--socket", ".cache/try-it/ingest.sock"] for words in commands)
    verbs = [words[1] for words in commands]
    assert verbs == [
        "explain",
        "explain",
        "login",
        "query",
        "explain",
        "revoke",
        "explain",
        "explain",
    ]
    elsewhere = try_commands(settings, "/usr/bin/popauth", tmp_path / "other")
    first = shlex.split(elsewhere[0][1][0])
    assert first[0] == "/usr/bin/popauth"
    assert first[3] == str(tmp_path / ".cache" / "try-it" / "ingest.sock")


def test_the_banner_says_why_where_and_how(tmp_path: Path) -> None:
    path = write_settings(tmp_path / "try-it")
    lines = banner(load_settings(path), path, "no MTA here", tmp_path)
    assert lines[0].startswith("popauth try-it mode: no MTA here, so this popauth serves")
    assert f"{tmp_path / 'try-it'}, where no MTA is attached" in lines[0]
    assert lines[1].startswith(f"Settings: {path}.")
    assert lines[2] == f"    cd {tmp_path}"
    assert lines[-1].startswith(f"The milter listens on unix:{tmp_path / 'try-it' / 'milter.sock'}")
