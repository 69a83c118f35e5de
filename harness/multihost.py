"""Several MTA hosts on one machine, each a Postfix with a popauth of its own.

What a deployment with a shared store looks like (several MX hosts, one
Redis or a Sentinel-watched pair): host ``name`` has its own directory,
Postfix (``NAME.local.test``, local domain ``local.test``) and milter and
ingest sockets. Postfix runs for as long as the hosts do; each test starts
the hosts' popauth with the store settings it is about, and stops it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.smtp import REMOTE, rcpt_reply


@dataclass
class MtaHost:
    """One host: its directory, its running Postfix and, while a test runs, its popauth."""

    name: str
    directory: Path
    postfix: PostfixInstance
    popauth: PopauthServer | None = None

    def start_popauth(self, **settings: Any) -> PopauthServer:
        """popauth serve on this host's sockets, with ``settings``."""
        self.stop_popauth()
        self.popauth = PopauthServer(self.directory, **settings).start()
        return self.popauth

    def stop_popauth(self) -> None:
        if self.popauth is not None:
            self.popauth.stop()
            self.popauth = None

    def relay(self, client: str) -> tuple[int, str]:
        """The reply to a RCPT for a remote recipient from ``client``, in a fresh session."""
        return rcpt_reply(self.postfix.smtp_port, client, REMOTE)

    def login(self, client: str, user: str) -> str:
        """LOGIN over this host's ingest socket; the reply's first line."""
        assert self.popauth is not None, f"no popauth running on {self.name}"
        return self.popauth.ask(f"LOGIN {client} {user}")[0]


def start_mta_host(directory: Path, name: str) -> MtaHost:
    """A host with a running Postfix; its milter at ``directory/milter.sock``."""
    directory.mkdir(mode=0o755)
    postfix = PostfixInstance(
        root=directory / "postfix",
        smtp_port=free_port(),
        milter=f"unix:{directory / 'milter.sock'}",
        local_domain="local.test",
        extra_main_cf={"myhostname": f"{name}.local.test", "myorigin": "local.test"},
    )
    postfix.start()
    return MtaHost(name, directory, postfix)


class MtaHosts:
    """Hosts started together and stopped together (popauth first, then Postfix)."""

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        self.hosts: list[MtaHost] = []
        # Traversable: smtpd (user postfix) reaches the milter sockets below it.
        root.mkdir(mode=0o755, exist_ok=True)
        try:
            for name in names:
                self.hosts.append(start_mta_host(root / name, name))
        except BaseException:
            self.stop()
            raise

    def stop_popauth(self) -> None:
        for host in self.hosts:
            host.stop_popauth()

    def stop(self) -> None:
        self.stop_popauth()
        for host in self.hosts:
            host.postfix.stop()
