"""contrib/rsyslog/popauth-follow.conf on Debian's stock rsyslog configuration.

Debian's rsyslog package, its own ``/etc/rsyslog.conf`` (which already
loads imuxsock), the snippet in ``/etc/rsyslog.d/``, with and without the
edit its header tells the operator to make (``harness/stock_rsyslog.py``).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.logservers import ensure_package_root
from harness.popauth import FollowerProcess, PopauthServer, wait_until
from harness.stock_rsyslog import StockRsyslog, adm_gid, operator_steps

pytestmark = pytest.mark.live

LOGIN = "user alice authenticated - 192.0.2.44"


@pytest.fixture(scope="module")
def package_root(live_root: Path) -> Path:
    return ensure_package_root(live_root / "logservers")


def open_root(live_root: Path) -> Path:
    """A fresh directory other users can enter: local users log to its /dev/log."""
    root = Path(tempfile.mkdtemp(prefix="stock-rsyslog-", dir=live_root))
    root.chmod(0o755)
    return root


@pytest.fixture(params=[False, True], ids=["stock", "edited"])
def rsyslog(
    request: pytest.FixtureRequest, live_root: Path, package_root: Path
) -> Iterator[StockRsyslog]:
    instance = StockRsyslog(open_root(live_root), package_root, edit_imuxsock=request.param)
    instance.start()
    yield instance
    instance.stop()


def log_as(user: str, rsyslog: StockRsyslog, tag: str, message: str) -> None:
    group = "root" if user == "root" else "nogroup"
    sent = subprocess.run(
        [
            *("setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", "logger"),
            *("-u", str(rsyslog.socket_path), "-p", "local0.notice", "-t", tag, message),
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr


def lines_of(rsyslog: StockRsyslog, tag: str) -> list[str]:
    return [line for line in rsyslog.text().splitlines() if f" {tag}" in line]


def test_the_snippet_loads_and_the_log_is_for_group_adm(rsyslog: StockRsyslog) -> None:
    """No complaint from rsyslog about the snippet; the file is root:adm 0640."""
    assert rsyslog.errors() == []
    if rsyslog.edit_imuxsock:
        checked = rsyslog.checked()
        assert "End of config validation run" in checked, checked
        assert "error" not in checked.lower(), checked
    status = rsyslog.log_path.stat()
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (0, adm_gid(), 0o640)


def test_senders_are_annotated_only_after_the_documented_edit(rsyslog: StockRsyslog) -> None:
    log_as("root", rsyslog, "solid-pop3d", LOGIN)
    log_as("nobody", rsyslog, "forger", LOGIN)
    # Postfix's chrooted daemons log through the socket of the Postfix
    # package's drop-in, which nothing annotates.
    rsyslog.send(
        "postfix/smtpd[7]", "connect from unknown[192.0.2.1]", path=rsyslog.postfix_socket_path
    )
    rsyslog.sync()
    (root_line,) = lines_of(rsyslog, "solid-pop3d:")
    (nobody_line,) = lines_of(rsyslog, "forger:")
    (postfix_line,) = lines_of(rsyslog, "postfix/smtpd[7]:")
    assert " uid= pid= " in postfix_line
    if rsyslog.edit_imuxsock:
        assert " uid=0 pid=" in root_line
        assert " uid=65534 pid=" in nobody_line
    else:
        assert " uid= pid= " in root_line
        assert " uid= pid= " in nobody_line


def test_the_operator_steps_are_the_documented_ones() -> None:
    """The commands the test runs are those of docs/follow.rst, word for word."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "follow.rst").read_text()
    for step in operator_steps():
        assert step in doc, step


def test_the_follower_says_once_that_rsyslog_annotates_nothing(
    live_root: Path, package_root: Path, tmp_path: Path
) -> None:
    rsyslog = StockRsyslog(open_root(live_root), package_root, edit_imuxsock=False).start()
    (tmp_path / "popauth").mkdir()
    try:
        with PopauthServer(tmp_path / "popauth") as server:
            follower = FollowerProcess(
                tmp_path, server, str(rsyslog.log_path), follow_format="solid-pop3d"
            ).start()
            try:
                for _ in range(3):
                    log_as("root", rsyslog, "solid-pop3d", LOGIN)
                rsyslog.sync()
                size = rsyslog.log_path.stat().st_size
                wait_until(
                    lambda: handled_up_to(follower) == size,
                    10,
                    lambda: f"the follower did not read the log to its end:\n{follower.output()}",
                )
            finally:
                assert follower.stop() == 0
            assert not server.ask("QUERY 192.0.2.44")[0].startswith("OK")
    finally:
        rsyslog.stop()
    (told,) = follower.events("follow_no_sender")
    assert told["level"] == "error"
    (stopped,) = follower.events("follow_stop")
    assert stopped["refused"] == {"no_sender": 3}


def handled_up_to(follower: FollowerProcess) -> int:
    """The offset of the follower's saved position (lines before it are handled)."""
    state = Path(follower.settings["follow_state_path"])
    try:
        offset: int = json.loads(state.read_text())["offset"]
    except (OSError, ValueError):
        return -1
    return offset
