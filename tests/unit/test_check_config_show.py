"""``popauth check-config --show``: every effective setting, the changed ones marked."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from popauth.cli import main
from popauth.config import KEYS, LEARNED_UNLESS_SET, Settings, load_settings
from popauth.config.effective import CHANGED, as_toml, effective_lines, toml_of


def show(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> dict[str, str]:
    """The --show output of a settings file, line by key."""
    path = tmp_path / "popauth.toml"
    path.write_text(text)
    assert main(["check-config", "--show", str(path)]) == 0
    lines: dict[str, str] = {}
    for line in capsys.readouterr().out.splitlines():
        name = line.lstrip("# ").split(" ", 1)[0].rstrip(":")
        lines[name] = line
    return lines


def test_a_changed_key_is_marked_with_its_default_and_an_unchanged_one_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = show(
        tmp_path,
        capsys,
        'ttl = 600\nmilter_socket_group = "root"\n'
        'ingest_socket_mode = "0666"\nmax_entries = 100000\n',
    )
    assert lines["ttl"] == f"ttl = 600  {CHANGED}900"
    assert lines["milter_socket_group"] == f'milter_socket_group = "root"  {CHANGED}""'
    assert lines["ingest_socket_mode"] == f'ingest_socket_mode = "0666"  {CHANGED}"0660"'
    # Set, but to its default: not a change.
    assert lines["max_entries"] == "max_entries = 100000"
    assert lines["milter_socket_mode"] == 'milter_socket_mode = "0660"'
    assert sum(CHANGED in line for line in lines.values()) == 3


def test_every_key_is_shown_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = show(tmp_path, capsys, "")
    assert sorted(name for name in lines if name != "effective") == sorted(KEYS)
    assert not any(CHANGED in line for line in lines.values())


def test_keys_learned_unless_set_say_so_and_are_marked_when_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = show(tmp_path, capsys, 'local_domains = ["example.org"]\n')
    assert lines["local_domains"].startswith('local_domains = ["example.org"]  # changed')
    assert lines["local_mailers"] == "# local_mailers: not set, learned from the MTA"


def test_the_listing_is_toml_that_gives_the_same_settings(tmp_path: Path) -> None:
    path = tmp_path / "popauth.toml"
    path.write_text(
        'ttl = 600\ntrusted_networks = ["10.0.0.0/8"]\nlog_format = "json"\n'
        'ingest_allowed_users = ["root", "0"]\nsnapshot_path = ""\n'
        'metrics_listen = "[::1]:9754"\nfollow_format = "dovecot"\nlearn_from_mta = "none"\n'
        'reject_message = "Say \\"hello\\" first."\n'
    )
    settings = load_settings(path)
    again = tmp_path / "shown.toml"
    again.write_text("\n".join(effective_lines(settings)) + "\n")
    assert load_settings(again) == settings


def test_every_default_written_as_toml_converts_to_itself() -> None:
    for key in KEYS.values():
        if key.name not in LEARNED_UNLESS_SET:
            assert key.convert(toml_of(key, key.default)) == key.default, key.name
    assert load_settings(None) == Settings()
    assert as_toml(None) == ""


def test_passwords_are_not_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = show(
        tmp_path,
        capsys,
        'redis_url = "redis://watcher:master-secret@127.0.0.1:6379/0"\n'
        'redis_sentinels = ["127.0.0.1:26379"]\nredis_sentinel_password = "sentinel-secret"\n',
    )
    listing = "\n".join(lines.values())
    assert "secret" not in listing
    assert lines["redis_url"].startswith('redis_url = "redis://watcher:(hidden)@127.0.0.1:6379/0"')
    assert tomllib.loads(lines["redis_sentinel_password"])["redis_sentinel_password"] == "(hidden)"


def test_a_bad_file_is_an_error_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "popauth.toml"
    path.write_text("ttl = 0\n")
    assert main(["check-config", "--show", str(path)]) != 0
    captured = capsys.readouterr()
    assert "'ttl'" in captured.err
    assert captured.out == ""
