"""The ``popauth`` command.

Exit status, like grep's: 0 success, 1 not found (query, revoke, unblock),
2 an error. The client subcommands import only the
standard library so that the login hook starts fast; ``serve`` loads the
rest on demand.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popauth.basics.clock import how_long, parse_moment, rfc3339
from popauth.basics.errors import ConfigError, InputError, PopauthError, StoppedError
from popauth.doors.ingest.client import IngestClient, IngestUnreachable, UnsafeRequest
from popauth.doors.ingest.report import (
    CAMPAIGN_COLUMNS,
    WEEK_COLUMNS,
    DryRun,
    Standing,
    campaign_report,
    dry_run,
    report_rows,
)
from popauth.doors.ingest.wire import CAMPAIGN_VIEW, DEFAULT_SOCKET, NOT_FOUND, OK

if TYPE_CHECKING:
    from popauth.config import Settings

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2
# The settings file every command reads when --config names none.
DEFAULT_CONFIG = Path("/etc/popauth/popauth.toml")
CONFIG_HELP = f"TOML settings (default: {DEFAULT_CONFIG} if it exists, else the embedded defaults)"


class SettingsFileError(ConfigError):
    """The settings file was named twice, differently."""


def settings_file(arguments: argparse.Namespace) -> Path | None:
    """The settings file a command reads: --config, the old positional form, or the default."""
    named = [path for path in (arguments.config, getattr(arguments, "config_file", None)) if path]
    if len(set(named)) > 1:
        raise SettingsFileError(f"two settings files named: {named[0]} and {named[1]}")
    if named:
        return Path(named[0])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _add_explain(explain: argparse.ArgumentParser) -> None:
    explain.add_argument("address", help="the SMTP client's IP address")
    explain.add_argument("recipient", help="the envelope recipient (RCPT TO)")
    explain.add_argument("--user", default="", help="the POP/IMAP user expected at ADDRESS")
    explain.add_argument("--auth", default="", metavar="USER", help="as if SMTP AUTH as USER")
    explain.add_argument("--sender", default="", help="the envelope sender (MAIL FROM)")
    explain.add_argument(
        "--mailer",
        default="",
        help="the MTA's {rcpt_mailer} for RECIPIENT (default: a local one for a local domain)",
    )


def _client_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--socket", help=f"ingest socket path (default: the settings', else {DEFAULT_SOCKET})"
    )
    sub.add_argument("--config", type=Path, help=CONFIG_HELP + "; gives the socket")
    sub.add_argument("--timeout", type=float, default=2.0, help="give up after SECONDS")


def _moment(written: str) -> float:
    try:
        stamp = parse_moment(written)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if stamp.utcoffset() is None:
        raise argparse.ArgumentTypeError("give its offset from UTC, e.g. 2027-03-01T00:00:00Z")
    return stamp.timestamp()


def _positive_days(written: str) -> int:
    days = int(written) if written.isdigit() else 0
    if not 1 <= days <= 3660:
        raise argparse.ArgumentTypeError("1 to 3660 days")
    return days


def _add_campaign(report: argparse.ArgumentParser, commands: Any) -> None:
    """report's dry run of a retirement, and ``popauth pop-first reinstate USER``."""
    report.add_argument(
        "--retire-at",
        metavar="DATE",
        type=_moment,
        help="dry run: who would be refused if POP first were retired at DATE (RFC 3339)",
    )
    report.add_argument(
        "--days",
        type=_positive_days,
        default=30,
        help="with --retire-at: users who relayed by POP first in the last DAYS days (30)",
    )
    report.add_argument(
        "--campaign",
        action="store_true",
        help="the phase-out's progress: per user and in total, then per ISO week",
    )
    report.add_argument(
        "--weekly",
        action="store_true",
        help="the campaign's weekly trend only (users per week by POP first,"
        " by SMTP AUTH, graduated, notified)",
    )
    pop_first = commands.add_parser("pop-first", help="the phase-out of POP-before-SMTP")
    pop_first_commands = pop_first.add_subparsers(dest="pop_first_command", required=True)
    reinstate = pop_first_commands.add_parser(
        "reinstate", help="let a graduated user relay by POP first again"
    )
    _client_options(reinstate)
    reinstate.add_argument("user")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popauth", description="POP-before-SMTP relay control")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the milter and the ingest endpoint")
    serve.add_argument("--config", type=Path, help=CONFIG_HELP)
    serve.add_argument(
        "--try-it",
        type=Path,
        metavar="DIR",
        help="the try-it mode: sockets and state under DIR, example.test, no MTA attached",
    )
    serve.add_argument(
        "--try-it-if-no-mta",
        type=Path,
        metavar="DIR",
        help="make run's choice: the try-it mode when there is neither --config nor a"
        " configured Postfix or Sendmail on this host, plain serve otherwise",
    )
    check = commands.add_parser("check-config", help="validate a settings file and exit")
    check.add_argument("--config", type=Path, help=CONFIG_HELP)
    # The older form, `check-config FILE`, still works.
    check.add_argument("config_file", nargs="?", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    check.add_argument("--quiet", action="store_true", help="print nothing when the file is good")
    check.add_argument(
        "--show",
        action="store_true",
        help="print every effective setting, those changed from the default marked"
        " (like postconf -n and -d together), and exit",
    )
    sessions = commands.add_parser(
        "sessions", help="keep open IMAP/POP sessions relaying (runs beside Dovecot)"
    )
    sessions.add_argument("--config", type=Path, help=CONFIG_HELP)
    sessions.add_argument("--once", action="store_true", help="run one renewal cycle and exit")
    follow = commands.add_parser(
        "follow", help="report the logins a POP/IMAP server writes to its log (docs/follow.rst)"
    )
    follow.add_argument("--config", type=Path, help=CONFIG_HELP)
    follow.add_argument(
        "log", nargs="?", help='the log (default: follow_log); "-" = standard input'
    )

    notices = commands.add_parser(
        "notices", help="who would be sent a POP-first notice now, and its text (docs/notices.rst)"
    )
    notices.add_argument("--config", type=Path, help=CONFIG_HELP)
    notices.add_argument(
        "--dry-run", action="store_true", required=True, help="show, send nothing (required)"
    )
    setup = commands.add_parser("setup", help="point Postfix, Dovecot or Sendmail at popauth")
    setup.add_argument("--config", type=Path, help=CONFIG_HELP)
    from popauth.setup.command import add_arguments

    add_arguments(setup)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        _client_options(sub)
        return sub

    login = client("login", "report a POP/IMAP login (the hook client)")
    login.add_argument("address")
    login.add_argument("user", nargs="?", default="")
    query = client("query", "show the whitelist entry of an address")
    query.add_argument("address")
    query.add_argument("--format", choices=("table", "raw"), default="table")
    revoke = client(
        "revoke",
        "remove an address (all its users), or a user from every address, from the whitelist",
    )
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("address", nargs="?")
    target.add_argument("--user", help="revoke this user's membership of every entry")
    client("block", "refuse a user's logins and revoke their entries").add_argument("user")
    client("unblock", "accept a user's logins again").add_argument("user")
    client("blocked", "list blocked users")
    report = client("report", "users who still relay by POP first, most recent first")
    report.add_argument("--format", choices=("table", "json", "csv"), default="table")
    _add_campaign(report, commands)
    _add_explain(client("explain", "the milter's verdict for a client and a recipient, and why"))
    listing = client("list", "list every whitelisted client")
    # raw: the ingest protocol's key=value lines, times in epoch seconds.
    listing.add_argument("--format", choices=("table", "raw"), default="table")
    client("stats", "show whitelist statistics")
    client("ping", "check that the endpoint answers")
    return parser


class BlankInArgument(InputError):
    """A blank would split one argument into two words on the wire."""


def _explain_line(arguments: argparse.Namespace) -> str:
    words = ["EXPLAIN", arguments.address, arguments.recipient]
    for option, value in (
        ("user", arguments.user),
        ("auth", arguments.auth),
        ("sender", arguments.sender),
        ("mailer", arguments.mailer),
    ):
        if value:
            words.append(f"{option}={value}")
    if any(not word or any(c.isspace() for c in word) for word in words):
        raise BlankInArgument(" ".join(words))
    return " ".join(words)


def _asks_campaign(arguments: argparse.Namespace) -> bool:
    """``report --campaign`` (or ``--weekly``, its trend alone)."""
    return arguments.command == "report" and bool(arguments.campaign or arguments.weekly)


def _request_line(arguments: argparse.Namespace) -> str:
    if arguments.command == "explain":
        return _explain_line(arguments)
    if arguments.command == "revoke" and arguments.user:
        return f"REVOKEUSER {arguments.user}"
    if arguments.command == "pop-first":
        return f"REINSTATE {arguments.user}"
    if _asks_campaign(arguments):
        return f"REPORT view={CAMPAIGN_VIEW}"
    words = [arguments.command.upper()]
    if getattr(arguments, "address", None) is not None:
        words.append(arguments.address)
    if getattr(arguments, "user", ""):
        words.append(arguments.user)
    return " ".join(words)


def _rows(lines: list[str], time_keys: tuple[str, ...]) -> list[dict[str, str]]:
    """``key=value`` reply lines as rows, the times as UTC dates."""
    rows = [dict(word.split("=", 1) for word in line.split()) for line in lines]
    for row in rows:
        for key, value in row.items():
            if key.endswith(time_keys):
                row[key] = _timestamp(value)
    return rows


def _print_table(columns: list[str], rows: list[dict[str, str]]) -> None:
    table = [columns, *([row.get(c, "") for c in columns] for row in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for row_values in table:
        print("  ".join(v.ljust(w) for v, w in zip(row_values, widths, strict=True)).rstrip())


def _print_grants(reply: list[str], command: str) -> None:
    """list: one row per user of each entry; query: the entry, with all its
    users (user and granted: the newest login) and its relay budget, if one
    is configured; dates as in report (UTC)."""
    columns = ["address", "user", "granted", "expires"]
    if command == "list":
        lines = reply[1:]
    else:
        lines = [reply[0].split(" ", 1)[1]]
        columns.append("users")
        if " budget_left=" in lines[0]:
            # The relay budget: recipients left of the limit, until the window ends.
            columns += ["budget_left", "budget_ends"]
    rows = _rows(lines, ("granted", "expires", "budget_ends"))
    for row in rows:
        if "budget_max" in row:
            row["budget_left"] = f"{row['budget_left']}/{row['budget_max']}"
    _print_table(columns, rows)


def _print_report(lines: list[str], style: str) -> None:
    rows = _rows(lines, _TIMES)
    columns = [
        "user",
        "pop_messages",
        "pop_recipients",
        "pop_last_seen",
        "pop_first_seen",
        "auth_messages",
        "auth_recipients",
        "auth_last_seen",
        "graduated",
        "exempt",
    ]
    if style == "json":
        print(json.dumps(rows, indent=2))
    elif style == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_table(columns, rows)


def _print_dry_run(lines: list[str], arguments: argparse.Namespace) -> None:
    run = dry_run(report_rows(lines), arguments.retire_at, time.time(), arguments.days)
    if arguments.format == "json":
        groups = {which.value: _rows_of(rows) for which, rows in run.groups.items()}
        print(json.dumps({**_dry_run_summary(run), "users": groups}, indent=2))
        return
    if arguments.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=["standing", *_DRY_RUN_COLUMNS])
        writer.writeheader()
        for which, rows in run.groups.items():
            for row in _rows_of(rows):
                writer.writerow(
                    {"standing": which.value, **{c: row.get(c, "") for c in _DRY_RUN_COLUMNS}}
                )
        return
    summary = _dry_run_summary(run)
    print(f"dry run: POP first retired at {summary['retire_at']} ({summary['retire_in']})")
    print(f"users who relayed by POP first in the last {run.days} days: {run.users}")
    print(
        f"would be refused: {len(run.groups[Standing.REFUSED])} users,"
        f" {summary['messages_refused']} of {summary['messages']} POP-first messages"
        f" ({summary['share_refused']:.1%})"
    )
    for which, heading in _DRY_RUN_HEADINGS:
        rows = run.groups[which]
        print(f"\n{heading}: {len(rows)}")
        if rows:
            _print_table(_DRY_RUN_COLUMNS, _rows_of(rows))


_DRY_RUN_COLUMNS = ["user", "pop_messages", "pop_last_seen", "auth_last_seen", "graduated"]
_DRY_RUN_HEADINGS = (
    (Standing.REFUSED, "would be refused (relayed by POP first, not by SMTP AUTH since)"),
    (Standing.EXEMPT, "not affected: exempt (pop_first_exempt_users)"),
    (Standing.SWITCHED, "not affected: relayed by SMTP AUTH since their last POP-first relay"),
    (Standing.GRADUATED, "refused already: graduated to SMTP AUTH (pop_first_graduate)"),
)


def _print_campaign(lines: list[str], arguments: argparse.Namespace) -> None:
    """``report --campaign``: users and a total row, then the weekly trend."""
    report = campaign_report(lines)
    users, total = _rows_of(report.users), report.totals()
    if arguments.format == "json":
        document = {
            "retire_at": rfc3339(report.retire_at) if report.retire_at else None,
            "users": users,
            "total": total,
            "weeks": report.weeks,
        }
        print(json.dumps(document, indent=2))
        return
    if arguments.format == "csv":
        columns, rows = (
            (WEEK_COLUMNS, report.weeks)
            if arguments.weekly
            else (CAMPAIGN_COLUMNS, [*users, total])
        )
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return
    if not arguments.weekly:
        if report.retire_at:
            when = how_long(report.retire_at - report.now)
            print(f"campaign: POP first retired at {rfc3339(report.retire_at)} ({when})")
        else:
            print("campaign: no retirement date (pop_first_retire_at) set")
        _print_table(CAMPAIGN_COLUMNS, [*users, total])
        print()
    print("weekly trend (users per ISO week):")
    _print_table(WEEK_COLUMNS, report.weeks)


def _dry_run_summary(run: DryRun) -> dict[str, object]:
    return {
        "retire_at": rfc3339(run.retire_at),
        "retire_in": how_long(run.retire_at - run.now),
        "days": run.days,
        "users": run.users,
        "users_refused": len(run.groups[Standing.REFUSED]),
        "messages": run.messages(),
        "messages_refused": run.messages(Standing.REFUSED),
        "share_refused": run.refused_share,
    }


def _rows_of(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Report rows with their times as UTC dates."""
    return [
        {key: _timestamp(value) if key.endswith(_TIMES) else value for key, value in row.items()}
        for row in rows
    ]


_TIMES = ("_seen", "graduated", "reinstated", "notified")


def _timestamp(epoch: str) -> str:
    seconds = int(epoch)
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _client_socket(arguments: argparse.Namespace) -> str:
    """--socket, else the ingest socket of the settings file, else the default."""
    if arguments.socket:
        return str(arguments.socket)
    path = settings_file(arguments)
    if path is None:
        return DEFAULT_SOCKET
    from popauth.config import load_settings

    return str(load_settings(path).ingest.socket)


def _run_client(arguments: argparse.Namespace) -> int:
    if _asks_campaign(arguments) and arguments.retire_at is not None:
        print("popauth: --campaign and --retire-at are two reports: give one", file=sys.stderr)
        return EXIT_ERROR
    try:
        line = _request_line(arguments)
    except BlankInArgument:
        print("popauth: arguments must not be empty or contain blanks", file=sys.stderr)
        return EXIT_ERROR
    try:
        socket_path = _client_socket(arguments)
    except ConfigError as error:
        print(f"popauth: configuration error: {error}", file=sys.stderr)
        return EXIT_ERROR
    try:
        reply = IngestClient(socket_path, arguments.timeout).request(line)
    except UnsafeRequest:
        print("popauth: control characters are not allowed in arguments", file=sys.stderr)
        return EXIT_ERROR
    except IngestUnreachable as error:
        print(f"popauth: {error}", file=sys.stderr)
        return EXIT_ERROR
    status = reply[0].split(" ", 1)[0]
    if status == OK and _asks_campaign(arguments):
        _print_campaign(reply[1:], arguments)
        return EXIT_OK
    if status == OK and arguments.command == "report" and arguments.retire_at is not None:
        _print_dry_run(reply[1:], arguments)
        return EXIT_OK
    if status == OK and arguments.command == "report":
        _print_report(reply[1:], arguments.format)
        return EXIT_OK
    if status == OK and arguments.command == "pop-first":
        print("\n".join(reply))
        return EXIT_OK
    if status == OK and arguments.command == "explain":
        print("\n".join(reply[1:]))
        return EXIT_OK
    if status == OK and getattr(arguments, "format", "raw") == "table":
        _print_grants(reply, arguments.command)
        return EXIT_OK
    if status == OK:
        print("\n".join(reply))
        return EXIT_OK
    if status == NOT_FOUND:
        print("\n".join(reply))
        return EXIT_NOT_FOUND
    print(f"popauth: {reply[0]}", file=sys.stderr)
    return EXIT_ERROR


def _run_sessions(arguments: argparse.Namespace) -> int:
    from popauth.companions.sessions import (
        RenewalPlan,
        SessionRenewer,
        doveadm_command,
        run_until_signalled,
    )
    from popauth.config import load_settings
    from popauth.daemon.notify import NotifyError, notify
    from popauth.telemetry.logs import configure_logging

    try:
        settings = load_settings(settings_file(arguments))
    except ConfigError as error:
        print(f"popauth: configuration error: {error}", file=sys.stderr)
        return EXIT_ERROR
    sessions = settings.sessions
    dovecot_config = "" if sessions.dovecot_config is None else str(sessions.dovecot_config)
    plan = RenewalPlan(
        ingest_socket=str(settings.ingest.socket),
        command=tuple(doveadm_command(sessions.doveadm, dovecot_config)),
        services=frozenset(sessions.protocols),
        interval=settings.session_interval(),
    )
    log = configure_logging(settings.log.format, settings.log.level)
    renewer = SessionRenewer(plan, log)
    if arguments.once:
        return EXIT_OK if renewer.cycle() else EXIT_ERROR

    def ready() -> None:
        # Type=notify: systemd counts the unit started only now, after a first cycle.
        try:
            notify("READY=1")
        except NotifyError as error:
            log.error("not_notified", error=str(error))

    run_until_signalled(renewer, ready)
    return EXIT_OK


def _run_follow(arguments: argparse.Namespace) -> int:
    from popauth.companions.follow.run import build_follower, run_until_signalled
    from popauth.config import load_settings

    try:
        settings = load_settings(settings_file(arguments))
    except ConfigError as error:
        print(f"popauth: configuration error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if arguments.log not in (None, "-") and not arguments.log.startswith("/"):
        arguments.log = str(Path(arguments.log).absolute())
    try:
        follower = build_follower(settings, arguments.log)
        run_until_signalled(follower)
    except StoppedError as error:
        print(f"popauth: follow stopped: {error}", file=sys.stderr)
        return EXIT_ERROR
    except (PopauthError, OSError) as error:
        print(f"popauth: cannot follow: {error}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _check_follow(settings: Settings) -> int:
    """check-config: what following follow_format means here; an error if refused."""
    if settings.follow.format is None:
        return EXIT_OK
    from popauth.companions.follow.run import trust_report

    report = trust_report(settings, settings.follow.format)
    print("\n".join(report.lines()))
    if report.refusal is not None:
        print(f"popauth: configuration error: cannot follow: {report.refusal}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# What to do when someone else holds popauth's paths: by how serve was
# started, and whether a process runs there or a directory is another user's.
_ADVICE = {
    ("serve", "running"): "stop it first, or give this popauth sockets of its own (--config)",
    ("serve", "foreign_directory"): (
        "run popauth as that user (as its systemd unit does), or give it paths of its own"
        " (--config)"
    ),
    ("make-run", "running"): (
        "use it (popauth ping), or stop it first (systemctl stop popauth); or run this"
        " checkout beside it on sockets of its own: make try"
    ),
    ("make-run", "foreign_directory"): (
        "popauth is set up as a service here: start it (systemctl start popauth), or run"
        " this checkout beside it on paths of its own: make try"
    ),
    ("try-it", "running"): (
        "it is this checkout's try-it popauth: use the commands it printed, or stop it"
        " (Ctrl-C in its terminal) first"
    ),
    ("try-it", "foreign_directory"): (
        "remove that directory, or give this popauth a settings file: make run CONFIG=FILE"
    ),
}


def _check_config(arguments: argparse.Namespace) -> int:
    from popauth.config import load_settings
    from popauth.localdelivery.resolve import resolve_local_delivery

    if arguments.show:
        return _show_config(arguments)
    try:
        settings = load_settings(settings_file(arguments))
        local = resolve_local_delivery(settings.local)
    except ConfigError as error:
        print(f"popauth: configuration error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:
        # e.g. a non-root user who may not run the MTA's tools or read its files.
        print(f"popauth: cannot check: {error}", file=sys.stderr)
        return EXIT_ERROR
    if not arguments.quiet:
        print(f"{settings_file(arguments) or 'embedded defaults'}: OK")
        print("\n".join(local.describe()))
        print("\n".join(_campaign_lines(settings)))
    return _check_follow(settings)


def _campaign_lines(settings: Settings) -> list[str]:
    """The phase-out of POP-first as check-config says it: the date, how long, who is spared."""
    from popauth.relay.explain import retirement_line

    campaign = settings.relay.campaign()
    lines = [retirement_line(campaign, time.time())]
    if campaign.exempt_users:
        lines.append(f"pop_first_exempt_users: {len(campaign.exempt_users)} users exempt")
    if campaign.graduate:
        lines.append("pop_first_graduate: users seen relaying by SMTP AUTH lose POP-first")
    return [line for line in lines if line]


def _show_config(arguments: argparse.Namespace) -> int:
    """check-config --show: the settings as popauth would run with them; no MTA is asked."""
    from popauth.config import ConfigError, load_settings
    from popauth.config.effective import effective_lines

    path = settings_file(arguments)
    try:
        settings = load_settings(path)
    except (ConfigError, SettingsFileError) as error:
        print(f"popauth: configuration error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(f"# effective settings of {path or 'embedded defaults'}")
    print("\n".join(effective_lines(settings)))
    for line in _campaign_lines(settings):
        print(f"# {line}")
    return EXIT_OK


def _run_notices(arguments: argparse.Namespace) -> int:
    from popauth.config import load_settings
    from popauth.daemon.notices import dry_run_lines
    from popauth.localdelivery.resolve import resolve_local_delivery

    try:
        settings = load_settings(settings_file(arguments))
        for line in dry_run_lines(settings, resolve_local_delivery(settings.local)):
            print(line)
    except (PopauthError, OSError) as error:
        print(f"popauth: cannot show notices: {error}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _run_server(arguments: argparse.Namespace) -> int:
    if arguments.command == "check-config":
        return _check_config(arguments)
    from popauth.config import load_settings
    from popauth.daemon.tryit import SETTINGS_NAME, Mode, choose_mode, host_has_mta

    if arguments.try_it and (arguments.config or arguments.try_it_if_no_mta):
        print("popauth: --try-it takes neither --config nor --try-it-if-no-mta", file=sys.stderr)
        return EXIT_ERROR
    try:
        settings_path = None if arguments.try_it else settings_file(arguments)
        settings = load_settings(settings_path)
    except ConfigError as error:
        print(f"popauth: configuration error: {error}", file=sys.stderr)
        return EXIT_ERROR
    started_by, why = "serve", "asked for with --try-it"
    directory: Path | None = arguments.try_it
    banner: list[str] = []
    if arguments.try_it_if_no_mta is not None:
        started_by = "make-run"
        # A settings file given, or the service's own: no need to ask the MTA.
        config_given = settings_path is not None
        has_mta = not config_given and host_has_mta(settings.local)
        if choose_mode(config_given=config_given, has_mta=has_mta) is Mode.TRY_IT:
            directory = arguments.try_it_if_no_mta
            why = "this host has no Postfix or Sendmail configuration to learn local domains from"
    if directory is not None:
        try:
            settings, banner = _try_it_settings(directory.absolute(), why)
        except (ConfigError, OSError) as error:
            print(
                f"popauth: cannot start the try-it mode: {error} (a settings file instead:"
                " make run CONFIG=FILE)",
                file=sys.stderr,
            )
            return EXIT_ERROR
        started_by = "try-it"
        settings_path = directory.absolute() / SETTINGS_NAME
    return _serve_with(settings, settings_path, started_by, banner)


def _serve_with(
    settings: Settings, settings_path: Path | None, started_by: str, banner: list[str]
) -> int:
    from popauth.daemon.preflight import occupant
    from popauth.daemon.serve import serve, state_file_paths

    problem = occupant(settings, state_file_paths(settings))
    if problem is not None:
        advice = _ADVICE[started_by, problem.kind.value]
        print(f"popauth: {problem.text}: {advice}", file=sys.stderr)
        return EXIT_ERROR
    if banner:
        print("\n".join(banner), flush=True)
    try:
        stopped = serve(settings, settings_path)
    except (PopauthError, OSError) as error:
        print(f"popauth: cannot start: {error}", file=sys.stderr)
        return EXIT_ERROR
    status = EXIT_OK
    if not stopped.clean:
        print(f"popauth: stopped: {stopped.reason}", file=sys.stderr)
        status = EXIT_ERROR
    # Everything is saved and every socket removed. Leave now: the
    # interpreter's teardown (modules, libmilter's idle threads) can take
    # longer than the whole stop on a busy host, and systemd waits for it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _try_it_settings(directory: Path, why: str) -> tuple[Settings, list[str]]:
    from popauth.config import load_settings
    from popauth.daemon.tryit import banner, write_settings

    path = write_settings(directory)
    settings = load_settings(path)
    return settings, banner(settings, path, why, Path.cwd())


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command in ("serve", "check-config"):
        return _run_server(arguments)
    if arguments.command == "sessions":
        return _run_sessions(arguments)
    if arguments.command == "follow":
        return _run_follow(arguments)
    if arguments.command == "notices":
        return _run_notices(arguments)
    if arguments.command == "setup":
        from popauth.setup.command import run_setup

        try:
            return run_setup(arguments, settings_file(arguments))
        except SettingsFileError as error:
            print(f"popauth: {error}", file=sys.stderr)
            return EXIT_ERROR
    return _run_client(arguments)


if __name__ == "__main__":
    sys.exit(main())
