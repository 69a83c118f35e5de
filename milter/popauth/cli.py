"""The ``popauth`` command.

Exit status, like grep's: 0 success, 1 the address is not whitelisted
(query, revoke), 2 an error. The client subcommands import only the
standard library so that the login hook starts fast; ``serve`` loads the
rest on demand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from popauth.client import IngestClient, IngestUnreachable

DEFAULT_SOCKET = "/run/popauth/ingest.sock"  # kept equal to config.DEFAULT_INGEST_SOCKET
EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popauth", description="POP-before-SMTP relay control")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the milter and the ingest endpoint")
    serve.add_argument("--config", type=Path, help="TOML settings (default: embedded defaults)")
    check = commands.add_parser("check-config", help="validate a settings file and exit")
    check.add_argument("config", type=Path)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--socket", default=DEFAULT_SOCKET, help="ingest socket path")
        sub.add_argument("--timeout", type=float, default=2.0, help="give up after SECONDS")
        return sub

    login = client("login", "report a POP/IMAP login (the hook client)")
    login.add_argument("address")
    login.add_argument("user", nargs="?", default="")
    client("query", "show the whitelist entry of an address").add_argument("address")
    client("revoke", "remove an address from the whitelist").add_argument("address")
    client("list", "list every whitelisted client")
    client("stats", "show whitelist statistics")
    client("ping", "check that the endpoint answers")
    return parser


def _run_client(arguments: argparse.Namespace) -> int:
    words = [arguments.command.upper()]
    if getattr(arguments, "address", None) is not None:
        words.append(arguments.address)
    if getattr(arguments, "user", ""):
        words.append(arguments.user)
    line = " ".join(words)
    if "\n" in line or "\r" in line:
        print("popauth: line breaks are not allowed in arguments", file=sys.stderr)
        return EXIT_ERROR
    try:
        reply = IngestClient(arguments.socket, arguments.timeout).request(line)
    except IngestUnreachable as error:
        print(f"popauth: {error}", file=sys.stderr)
        return EXIT_ERROR
    status = reply[0].split(" ", 1)[0]
    if status == "OK":
        print("\n".join(reply))
        return EXIT_OK
    if status == "NOTFOUND":
        print("\n".join(reply))
        return EXIT_NOT_FOUND
    print(f"popauth: {reply[0]}", file=sys.stderr)
    return EXIT_ERROR


def _run_server(arguments: argparse.Namespace) -> int:
    from popauth.config import ConfigError, load_settings

    try:
        settings = load_settings(arguments.config)
    except ConfigError as error:
        print(f"popauth: configuration error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if arguments.command == "check-config":
        print(f"{arguments.config}: OK")
        return EXIT_OK
    from popauth.serve import serve
    from popauth.sockets import SocketInUse

    try:
        serve(settings)
    except (SocketInUse, OSError) as error:
        print(f"popauth: cannot start: {error}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command in ("serve", "check-config"):
        return _run_server(arguments)
    return _run_client(arguments)


if __name__ == "__main__":
    sys.exit(main())
