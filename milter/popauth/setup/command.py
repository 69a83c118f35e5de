"""The ``popauth setup TARGET [--apply]`` command: print the plan, or make it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from popauth.basics.errors import ConfigError
from popauth.config import load_settings
from popauth.setup import Plan, SetupError, apply, run
from popauth.setup.postfix import PostfixUnreadable

EXIT_OK, EXIT_ERROR = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=("postfix", "dovecot", "sendmail"))
    parser.add_argument("--apply", action="store_true", help="make the changes (else print them)")
    parser.add_argument(
        "--mta-config",
        default="",
        metavar="DIR",
        help="the MTA's configuration directory (Postfix: as postconf -c; Dovecot: /etc/dovecot)",
    )
    parser.add_argument(
        "--door",
        choices=("milter", "policy"),
        default="milter",
        help="Postfix: judge by popauth's milter, or by its policy door (policy_socket)",
    )


def make_plan(
    target: str, settings_path: Path | None, directory: str, door: str = "milter"
) -> Plan:
    settings = load_settings(settings_path)
    systemd = Path("/run/systemd/system").is_dir()
    if target == "postfix":
        from popauth.setup.postfix import plan_postfix

        status = run(["postfix", *(["-c", directory] if directory else []), "status"]).returncode
        return plan_postfix(
            settings,
            config_directory=directory,
            systemd=systemd,
            postfix_running=status == 0,
            door=door,
        )
    if target == "dovecot":
        from popauth.setup.dovecot import plan_dovecot

        return plan_dovecot(settings, config_directory=directory or "/etc/dovecot", systemd=systemd)
    from popauth.setup.sendmail import plan_sendmail

    return plan_sendmail(settings, mc=Path(directory or "/etc/mail") / "sendmail.mc")


def run_setup(arguments: argparse.Namespace, settings_path: Path | None) -> int:
    try:
        if arguments.door != "milter" and arguments.target != "postfix":
            print("popauth: --door policy is for postfix only", file=sys.stderr)
            return EXIT_ERROR
        plan = make_plan(arguments.target, settings_path, arguments.mta_config, arguments.door)
    except ConfigError as error:
        print(f"popauth: configuration error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except (PostfixUnreadable, OSError) as error:
        print(
            f"popauth: cannot read the {arguments.target} configuration: {error}", file=sys.stderr
        )
        return EXIT_ERROR
    if not arguments.apply or plan.refusals:
        print("\n".join(plan.describe()))
        if plan.refusals:
            return EXIT_ERROR
        if plan.changes_anything:
            print(f"# these are the changes; popauth setup {arguments.target} --apply makes them")
        return EXIT_OK
    try:
        done = apply(plan)
    except (SetupError, OSError) as error:
        print(f"popauth: setup {arguments.target}: {error}", file=sys.stderr)
        return EXIT_ERROR
    print("\n".join(done))
    for note in plan.notes:
        print(f"note: {note}")
    return EXIT_OK
