"""What each format's line proves on the running kernel, and where following is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from popauth.cli import EXIT_ERROR, EXIT_OK, main
from popauth.companions.follow import trust
from popauth.companions.follow.trust import (
    ORIGINS,
    assess,
    ptrace_meaning,
    read_ptrace_scope,
    users_trace_own_processes,
)
from popauth.config import FOLLOW_FORMATS, FollowTrust

# None: Yama absent; 0: classic ptrace; 1 and up: a user cannot attach to a
# process it did not start.
TRACEABLE = (None, 0)
RESTRICTED = (1, 2, 3)


def test_every_format_says_what_its_line_proves() -> None:
    assert sorted(ORIGINS) == sorted(FOLLOW_FORMATS)


def test_ptrace_scope_is_read_from_yama_and_fails_closed(tmp_path: Path) -> None:
    scope = tmp_path / "ptrace_scope"
    assert read_ptrace_scope(scope) is None  # no Yama
    scope.write_text("1\n")
    assert read_ptrace_scope(scope) == 1
    scope.write_text("restricted\n")
    assert read_ptrace_scope(scope) == 0  # not understood: as permissive as it gets
    assert [users_trace_own_processes(value) for value in (None, 0, 1, 2, 3)] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert "Yama is absent" in ptrace_meaning(None)
    assert "only its own descendants" in ptrace_meaning(1)


@pytest.mark.parametrize("scope", [*TRACEABLE, *RESTRICTED])
def test_courier_is_refused_while_mail_users_run_programs(scope: int | None) -> None:
    report = assess("courier", FollowTrust.RSYSLOG, scope, mail_users_run_programs=True)
    assert report.refusal is not None
    assert "Maildir/loginexec" in report.refusal
    assert "contrib/courier/popauth-courier-login" in report.refusal
    assert ("ptrace" in report.refusal) == (scope in TRACEABLE)


@pytest.mark.parametrize("scope", TRACEABLE)
def test_courier_is_refused_while_users_may_trace_their_processes(scope: int | None) -> None:
    report = assess("courier", FollowTrust.RSYSLOG, scope, mail_users_run_programs=False)
    assert report.refusal is not None
    assert "trace its own courierpop3d" in report.refusal
    assert "kernel.yama.ptrace_scope = 1" in report.refusal
    assert "loginexec" not in report.refusal


@pytest.mark.parametrize("envelope", list(FollowTrust))
@pytest.mark.parametrize("scope", RESTRICTED)
def test_courier_is_followed_only_without_local_mail_users_and_ptrace(
    envelope: FollowTrust, scope: int
) -> None:
    report = assess("courier", envelope, scope, mail_users_run_programs=False)
    assert report.refusal is None
    assert "courierlogger (root) forwarded" in report.proves


@pytest.mark.parametrize("name", ["cyrus", "dovecot", "solid-pop3d"])
@pytest.mark.parametrize("scope", [*TRACEABLE, *RESTRICTED])
def test_servers_whose_writer_cannot_be_traced_are_trusted_on_any_kernel(
    name: str, scope: int | None
) -> None:
    report = assess(name, FollowTrust.RSYSLOG, scope, mail_users_run_programs=True)
    assert report.refusal is None
    assert report.warnings == ()


@pytest.mark.parametrize("name", ["qpopper", "uw", "regex"])
def test_formats_not_seen_live_warn_while_ptrace_is_open(name: str) -> None:
    for scope in TRACEABLE:
        (warning,) = assess(name, FollowTrust.RSYSLOG, scope, mail_users_run_programs=True).warnings
        assert "tracing" in warning
    for scope in RESTRICTED:
        assert assess(name, FollowTrust.RSYSLOG, scope, mail_users_run_programs=True).warnings == ()


def test_popa3d_names_what_a_mail_account_could_still_do() -> None:
    report = assess(
        "popa3d", FollowTrust.RSYSLOG, 1, mail_users_run_programs=True, pid_max=4_194_304
    )
    (warning,) = report.warnings
    assert "follow_session_timeout" in warning and "kernel.pid_max = 4194304" in warning
    assert report.refusal is None
    assert assess("popa3d", FollowTrust.RSYSLOG, 1, mail_users_run_programs=False).warnings == ()


def test_a_trusted_file_is_a_warning_for_every_format() -> None:
    for name in ORIGINS:
        if name == "courier":
            continue
        warnings = assess(name, FollowTrust.FILE, 1, mail_users_run_programs=False).warnings
        assert any("every line of the file counts" in warning for warning in warnings), name


def test_the_report_for_people_names_the_refusal() -> None:
    lines = assess("courier", FollowTrust.RSYSLOG, None, mail_users_run_programs=True).lines()
    assert lines[0].startswith("follow: courier: a counted line proves: courierlogger")
    assert lines[1].startswith("follow: kernel: Yama is absent")
    assert lines[-1].startswith("follow: refused: courier's LOGIN line")


def test_check_config_says_what_following_means_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scope = tmp_path / "ptrace_scope"
    monkeypatch.setattr(trust, "YAMA_PTRACE_SCOPE", scope)
    config = tmp_path / "popauth.toml"
    base = 'local_domains = ["example.org"]\nlocal_mailers = ["local"]\n'
    config.write_text(base + 'follow_format = "courier"\n')
    assert main(["check-config", str(config)]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert "follow: kernel: Yama is absent" in captured.out
    assert "cannot follow: courier's LOGIN line" in captured.err
    # Safe only without local mail users and with ptrace restricted.
    config.write_text(base + 'follow_format = "courier"\nfollow_mail_users_run_programs = false\n')
    assert main(["check-config", str(config)]) == EXIT_ERROR
    assert "trace its own courierpop3d" in capsys.readouterr().err
    scope.write_text("1\n")
    assert main(["check-config", str(config)]) == EXIT_OK
    captured = capsys.readouterr()
    assert "follow: kernel: kernel.yama.ptrace_scope = 1" in captured.out
    assert "refused" not in captured.out
    # Without follow_format, check-config says nothing of following.
    config.write_text(base)
    assert main(["check-config", str(config)]) == EXIT_OK
    assert "follow:" not in capsys.readouterr().out
