"""`popauth serve` refuses to start when nothing says which mail is delivered here."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.popauth_server import POPAUTH


def test_serve_refuses_to_start_without_local_delivery(tmp_path: Path) -> None:
    config = tmp_path / "popauth.toml"
    config.write_text(
        f'milter_socket = "unix:{tmp_path}/milter.sock"\n'
        f'ingest_socket = "{tmp_path}/ingest.sock"\n'
        'snapshot_path = ""\nusage_path = ""\nblocklist_path = ""\n'
        'learn_from_mta = "none"\n'
    )
    completed = subprocess.run(
        [POPAUTH, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2, completed
    assert completed.stderr.startswith("popauth: cannot start: local_domains and local_mailers"), (
        completed.stderr
    )
    assert not (tmp_path / "milter.sock").exists()
    assert not (tmp_path / "ingest.sock").exists()
