"""Delivery classes from Postfix's own configuration.

Postfix sorts every recipient domain into an address class (trivial-rewrite,
in this order: the first list that matches wins) and delivers the class
with its transport; the transport's name is what smtpd sends the milter as
``{rcpt_mailer}``:

=========================  =================================================
address class (its list)   transport ({rcpt_mailer} is the part before ':')
=========================  =================================================
local (mydestination)      local_transport (``local``)
virtual alias              ``error`` until cleanup rewrites the address with
(virtual_alias_domains)    virtual_alias_maps (trivial-rewrite's answer)
virtual mailbox            virtual_transport (``virtual``, often ``lmtp``)
(virtual_mailbox_domains)
relay (relay_domains)      relay_transport (``relay``): inbound, backup MX
=========================  =================================================

``transport_maps`` can give an address or a domain of any class but virtual
alias another transport; where it does, that transport is the address's
only local mailer. Every other domain is Postfix's default class: mail
relayed elsewhere.

popauth follows Postfix's matching exactly (:mod:`popauth.relay.postfixlists`):
``!`` exclusions, ``/file/name`` and ``type:table`` patterns, string lists
(exact names) versus relay_domains (parent domains, after
parent_domain_matches_subdomains). What it cannot follow exactly (a table
whose keys cannot be listed, a file that Postfix versions read differently)
is refused with an error naming the setting: a list followed only roughly
could count a domain as local that Postfix relays away.

The values come from ``postconf -x`` (``$name`` expanded, ``-c DIR`` or
``MAIL_CONFIG`` like every Postfix command); tables are listed with
``postmap -s``, streamed, keeping only the entries that matter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from popauth.localdelivery import (
    SHOWN_ROUTE_KEYS,
    LearnedClass,
    LearnError,
    LocalDelivery,
    MtaNotFound,
    RouteSummary,
    configured_class,
    first_origins,
    is_mailer_name,
)
from popauth.localdelivery.commands import (
    CommandFailed,
    CommandResult,
    CommandRunner,
    CommandUnavailable,
    Runner,
    find_tool,
)
from popauth.relay.ownership import login_map_entries
from popauth.relay.postfixlists import (
    ListKind,
    ListPattern,
    PostfixList,
    RelevantDomains,
    TransportRoutes,
    fold,
)
from popauth.relay.recipients import DeliveryClass, DomainSet


@dataclass(frozen=True)
class AddressClass:
    name: str
    # The domain list, and the parameter naming the class's transport.
    parameter: str
    transport_parameter: str | None
    kind: ListKind


ADDRESS_CLASSES = (
    AddressClass("local", "mydestination", "local_transport", ListKind.STRING),
    AddressClass("virtual alias", "virtual_alias_domains", None, ListKind.STRING),
    AddressClass(
        "virtual mailbox", "virtual_mailbox_domains", "virtual_transport", ListKind.STRING
    ),
    AddressClass("relay", "relay_domains", "relay_transport", ListKind.DOMAIN),
)
# trivial-rewrite resolves a virtual alias domain to the error transport; the
# real destination is known only after cleanup's virtual_alias_maps rewrite.
VIRTUAL_ALIAS_MAILER = "error"
PARAMETERS = (
    "config_directory",
    *(spec.parameter for spec in ADDRESS_CLASSES),
    *(spec.transport_parameter for spec in ADDRESS_CLASSES if spec.transport_parameter),
    "transport_maps",
    "parent_domain_matches_subdomains",
    "recipient_delimiter",
    "smtpd_sender_login_maps",
    "owner_request_special",
    "double_bounce_sender",
)
# Table types whose entries postmap -s can list; the others can only be asked
# for a key (and postmap's fatal error on them costs a one-second pause).
LISTABLE_TABLE_TYPES = frozenset(
    {"hash", "btree", "lmdb", "cdb", "dbm", "sdbm", "texthash", "inline"}
)
# Postfix's list separators (CHARS_COMMA_SP) and white space (isspace in C).
LIST_SEPARATORS = frozenset(", \t\r\n")
C_SPACE = " \t\n\v\f\r"
# More transport_maps entries in local classes than this are not kept in memory.
MAX_TRANSPORT_ROUTES = 100_000
_FIX_DOMAINS = "set local_domains in popauth's settings to the domains Postfix delivers here"
_FIX_MAILERS = (
    "set local_mailers in popauth's settings to the transports of the local domains"
    " (popauth then does without transport_maps)"
)


def split_list(text: str) -> list[str]:
    """Postfix's mystrtokq(): split at commas and white space, keep ``{...}`` whole.

    A token that starts with ``#`` ends the list (Postfix warns that a
    comment after text is not supported, and ignores the rest).
    """
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for character in text + ",":
        if character == "{":
            depth += 1
        elif character == "}" and depth:
            depth -= 1
        elif depth == 0 and character in LIST_SEPARATORS:
            if current:
                if current[0] == "#":
                    return items
                items.append("".join(current))
                current = []
            continue
        current.append(character)
    return items


def _lines_before_3_8(text: str) -> list[str]:
    """How Postfix up to 3.7 reads a /file/name list: each line, '#' lines skipped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line for line in lines if not line.startswith("#")]


def _logical_lines(text: str) -> list[str]:
    """readllines(): lines joined with their indented continuations, comments dropped."""
    logical: list[str] = []
    position = 0
    while True:
        buffer = ""
        at_end = False
        while True:
            newline = text.find("\n", position)
            if newline < 0:
                line, position, at_end = text[position:], len(text), True
            else:
                line, position = text[position:newline], newline + 1
            if not line.strip(C_SPACE) or line.lstrip(C_SPACE)[0] == "#":
                line = ""
            buffer += line
            if at_end:
                break
            if buffer:
                following = text[position] if position < len(text) else ""
                if not following or (following != "#" and following not in C_SPACE):
                    break
        if buffer and buffer[0] in C_SPACE:
            continue  # text continued from nothing: Postfix warns and skips it
        if buffer:
            logical.append(buffer)
        if at_end:
            return logical


def file_entries(text: str, path: str = "file") -> list[str]:
    """The patterns of a ``/file/name`` list, read as every Postfix reads it.

    Postfix up to 3.7 reads it line by line; 3.8 and later join indented
    lines to the one before (and then a ``#`` ends the joined line). Where the two
    differ, popauth cannot know which one runs, so it refuses the file.
    """
    old = [item for line in _lines_before_3_8(text) for item in split_list(line)]
    new = [item for line in _logical_lines(text) for item in split_list(line)]
    if old != new:
        raise LearnError(
            f"{path}: Postfix versions read this file differently (an indented line, or a"
            " '#' comment after text followed by one); put each pattern on its own"
            " unindented line"
        )
    return new


def parse_postconf(text: str) -> dict[str, str]:
    """``name = value`` lines, as ``postconf`` prints them."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, equals, value = line.partition(" = ")
        if not equals:
            name, equals, value = line.partition(" =")
        if equals:
            values[name.strip()] = value.strip()
    return values


def table_entry(line: str) -> tuple[str, str] | None:
    """``key<TAB>value`` from ``postmap -s``; the key exactly as stored."""
    key, tab, value = line.partition("\t")
    if tab and key and not key[0].isspace():
        return key, value.strip()
    parts = line.split(None, 1)
    if not parts:
        return None
    return parts[0], parts[1].strip() if len(parts) > 1 else ""


def mailer_word(transport: str) -> str | None:
    """The ``{rcpt_mailer}`` of a transport value: ``lmtp:unix:private/x`` -> lmtp.

    None for an empty transport (``:nexthop`` keeps the class's transport).
    """
    word = transport.strip().split(":", 1)[0].strip().lower()
    return word if word and is_mailer_name(word) else None


def is_table(pattern: str) -> bool:
    """MATCH_DICTIONARY(): ``type:name``, not an ``[address]``."""
    return ":" in pattern and not pattern.startswith("[")


def _table_for_reading(table: str) -> str:
    # proxymap only answers Postfix's own daemons; read the table underneath.
    return table.removeprefix("proxy:")


class PostfixConfig:
    """One Postfix configuration, read through its own tools."""

    def __init__(self, config_directory: str | None = None, run: Runner | None = None) -> None:
        self.config_directory = config_directory
        self._run = run if run is not None else CommandRunner()
        self._where = f"-c {config_directory}" if config_directory else "MAIL_CONFIG or default"

    def _tool(self, name: str) -> list[str]:
        path = find_tool(name)
        if path is None:
            raise MtaNotFound(f"{name} is not installed (no Postfix here)")
        argv = [path]
        if self.config_directory:
            argv += ["-c", self.config_directory]
        return argv

    def _call(self, argv: Sequence[str], stdin: str = "") -> CommandResult:
        try:
            return self._run.run(argv, stdin)
        except CommandUnavailable as problem:
            raise LearnError(str(problem)) from None

    def parameters(self, names: Iterable[str]) -> dict[str, str]:
        result = self._call([*self._tool("postconf"), "-x", *names])
        if result.returncode != 0:
            message = result.error_text()
            if "main.cf" in message and "No such file" in message and not self.config_directory:
                raise MtaNotFound(f"no Postfix configuration: {message}")
            raise LearnError(f"postconf ({self._where}) failed: {message}")
        return parse_postconf(result.stdout)

    def table_lines(self, table: str, fold_keys: bool) -> Iterator[str]:
        """Every entry of a listable table as ``postmap -s`` prints it, streamed.

        ``fold_keys`` opens it as transport_maps does (keys folded); without
        it, as a domain list does, so the keys are exactly what Postfix
        compares the lower-cased name with. Parse a line with table_entry.
        """
        kind = _table_for_reading(table).split(":", 1)[0]
        if kind not in LISTABLE_TABLE_TYPES:
            raise LearnError(
                f"cannot list the entries of {table}: {kind} tables cannot be listed"
                f" (listable: {', '.join(sorted(LISTABLE_TABLE_TYPES))})"
            )
        argv = [*self._tool("postmap"), *([] if fold_keys else ["-f"])]
        argv += ["-s", _table_for_reading(table)]
        try:
            yield from self._run.lines(argv)
        except CommandFailed as failed:
            raise LearnError(
                f"cannot list the entries of {table}: {failed.result.error_text()}"
            ) from None
        except CommandUnavailable as problem:
            raise LearnError(f"cannot list the entries of {table}: {problem}") from None

    def read_file(self, path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError as error:
            raise LearnError(f"cannot read {path}: {error.strerror}") from None


@dataclass
class CompiledList:
    matcher: PostfixList
    # (pattern as check-config shows it, origin)
    shown: list[tuple[str, str]]


class ListCompiler:
    """match_list_init(): a list value, files and tables expanded, as Postfix does."""

    def __init__(self, config: PostfixConfig, parameter: str) -> None:
        self._config = config
        self._parameter = parameter
        self.patterns: list[ListPattern] = []
        self.shown: list[tuple[str, str]] = []

    def _fail(self, problem: str) -> LearnError:
        return LearnError(f"{self._parameter}: {problem}; {_FIX_DOMAINS}")

    def add(self, text: str, positive: bool = True, files: tuple[str, ...] = ()) -> None:
        origin = f"postfix {self._parameter}" + (f" ({files[-1]})" if files else "")
        for token in split_list(text):
            item = token
            polarity = positive
            while item.startswith("!"):
                polarity = not polarity
                item = item[1:]
            if not item:
                raise self._fail(f"no pattern after '!' in {token!r}")
            if item.startswith("/"):
                if item in files:
                    raise self._fail(f"{item} includes itself")
                try:
                    entries = file_entries(self._config.read_file(item), item)
                except LearnError as problem:
                    raise self._fail(str(problem)) from None
                for entry in entries:
                    self.add(entry, polarity, (*files, item))
            elif is_table(item):
                try:
                    lines = self._config.table_lines(item, fold_keys=False)
                    keys = frozenset(entry[0] for entry in map(table_entry, lines) if entry)
                except LearnError as problem:
                    raise self._fail(str(problem)) from None
                self.patterns.append(ListPattern(polarity, item, keys))
                self.shown += [(_shown(polarity, key), f"{origin} {item}") for key in sorted(keys)]
            else:
                self.patterns.append(ListPattern(polarity, fold(item)))
                self.shown.append((_shown(polarity, fold(item)), origin))


def _shown(positive: bool, text: str) -> str:
    return text if positive else "!" + text


def compile_list(
    config: PostfixConfig, parameter: str, value: str, kind: ListKind, *, parent_style: bool
) -> CompiledList:
    compiler = ListCompiler(config, parameter)
    compiler.add(value)
    return CompiledList(PostfixList(tuple(compiler.patterns), kind, parent_style), compiler.shown)


def _class_heading(spec: AddressClass, compiled: PostfixList) -> str:
    if spec.kind is ListKind.STRING:
        return f"{spec.name}: {spec.parameter} (exact names only)"
    if compiled.parent_style:
        return f"{spec.name}: {spec.parameter} (a name matches its subdomains too)"
    return f"{spec.name}: {spec.parameter} (.name matches the subdomains of name)"


def _class_mailer(spec: AddressClass, values: dict[str, str]) -> tuple[str, str] | None:
    if spec.transport_parameter is None:
        origin = f"postfix {spec.parameter} (resolved to Postfix's error transport)"
        return VIRTUAL_ALIAS_MAILER, origin
    word = mailer_word(values.get(spec.transport_parameter, ""))
    if word is None:
        return None
    return word, f"postfix {spec.transport_parameter} (for {spec.parameter})"


def _is_yes(value: str) -> bool:
    return value.strip().lower() in ("yes", "true", "1")


class TransportLearner:
    """The transport_maps entries that apply to domains of the local classes.

    transport(5) looks up the address, the address without its extension,
    the domain, its parents and ``*``, across the tables in order; popauth
    does the same in memory (TransportRoutes), so it needs those entries.
    Only they are kept: a table of millions of routes elsewhere is streamed
    through and costs time, not memory.
    """

    def __init__(self, config: PostfixConfig, values: dict[str, str], parent_style: bool) -> None:
        self._config = config
        self._values = values
        self._parent_style = parent_style

    def tables(self) -> list[str]:
        tables = split_list(self._values.get("transport_maps", ""))
        for table in tables:
            if not is_table(table):
                raise LearnError(f"transport_maps: {table!r} is not a type:table; {_FIX_MAILERS}")
        return tables

    def learn(self, relevant: RelevantDomains) -> tuple[TransportRoutes | None, list[RouteSummary]]:
        tables = self.tables()
        if not tables:
            return None, []
        entries: dict[str, str] = {}
        summaries: dict[str, RouteSummary] = {}
        for table in tables:
            try:
                for line in self._config.table_lines(table, fold_keys=True):
                    # Most lines are routes elsewhere: judged by the key alone, unparsed.
                    key, tab, value = line.partition("\t")
                    if not tab:
                        entry = table_entry(line)
                        if entry is None:
                            continue
                        key, value = entry
                    if key in entries or not relevant.wants_key(key, self._parent_style):
                        continue
                    if len(entries) >= MAX_TRANSPORT_ROUTES:
                        raise LearnError(
                            f"more than {MAX_TRANSPORT_ROUTES} entries of {table} route mail"
                            " in the local domains, more than popauth keeps in memory"
                        )
                    transport = value.split(":", 1)[0].strip()
                    entries[key] = transport
                    _summarise(summaries, table, key, transport)
            except LearnError as problem:
                raise LearnError(f"transport_maps: {problem}; {_FIX_MAILERS}") from None
        routes = TransportRoutes(
            entries=entries,
            parent_style=self._parent_style,
            recipient_delimiter=self._values.get("recipient_delimiter", ""),
            unsplit_local_parts=frozenset(
                {"postmaster", "mailer-daemon", fold(self._values.get("double_bounce_sender", ""))}
            ),
            owner_request_special=_is_yes(self._values.get("owner_request_special", "yes")),
        )
        return routes, list(summaries.values())


def _summarise(summaries: dict[str, RouteSummary], table: str, key: str, transport: str) -> None:
    word = transport.lower() or "(the class's own)"
    known = summaries.get(word)
    if known is None:
        summaries[word] = RouteSummary(word, table, (key,), 1)
        return
    keys = known.keys if len(known.keys) >= SHOWN_ROUTE_KEYS else (*known.keys, key)
    summaries[word] = RouteSummary(word, known.table, keys, known.count + 1)


def _parent_style(config: PostfixConfig, values: dict[str, str]) -> PostfixList:
    """parent_domain_matches_subdomains is itself a string list (of feature names)."""
    value = values.get("parent_domain_matches_subdomains", "")
    name = "parent_domain_matches_subdomains"
    return compile_list(config, name, value, ListKind.STRING, parent_style=False).matcher


def learn_from_postfix(
    config_directory: str | None = None,
    configured_domains: Sequence[str] | None = None,
    run: Runner | None = None,
    *,
    with_transport_maps: bool = True,
) -> LocalDelivery:
    """What Postfix delivers here. ``configured_domains`` replaces its domain lists;
    without ``with_transport_maps`` (local_mailers is configured) no route is learned.

    Raises MtaNotFound when there is no Postfix configuration (and no
    directory was named), LearnError when one is there but cannot be read
    whole or followed exactly.
    """
    config = PostfixConfig(config_directory, run)
    values = config.parameters(PARAMETERS)
    # A directory given with -c is the one read, whatever main.cf says of itself.
    source = f"postfix (config_directory {config_directory or values.get('config_directory', '?')})"
    parent_features = _parent_style(config, values)
    if not with_transport_maps:
        values = {**values, "transport_maps": ""}
    transports = TransportLearner(config, values, parent_features.matches("transport_maps"))
    specs = [spec for spec in ADDRESS_CLASSES if split_list(values.get(spec.parameter, ""))]
    logins, unlisted = learn_sender_logins(config, values.get("smtpd_sender_login_maps", ""))
    if configured_domains is not None:
        learned = _with_configured_domains(source, specs, values, transports, configured_domains)
        return dataclasses.replace(learned, sender_logins=logins, sender_logins_unlisted=unlisted)
    compiled = {
        spec.name: compile_list(
            config,
            spec.parameter,
            values[spec.parameter],
            spec.kind,
            parent_style=spec.kind is ListKind.DOMAIN and parent_features.matches(spec.parameter),
        )
        for spec in specs
    }
    # transport_maps is not consulted for virtual alias domains.
    routed = [compiled[spec.name].matcher for spec in specs if spec.transport_parameter]
    routes, summaries = transports.learn(RelevantDomains.of_lists(routed))
    classes = []
    for spec in specs:
        mailer = _class_mailer(spec, values)
        matcher = compiled[spec.name].matcher
        rule = DeliveryClass(
            name=spec.name,
            domains=matcher,
            mailers=frozenset({mailer[0]} if mailer else ()),
            routes=routes if spec.transport_parameter else None,
        )
        heading = _class_heading(spec, matcher)
        shown = tuple(compiled[spec.name].shown)
        classes.append(LearnedClass(rule, heading, shown, (mailer,) if mailer else ()))
    return LocalDelivery(tuple(classes), source, tuple(summaries), logins, unlisted)


def learn_sender_logins(
    config: PostfixConfig, value: str
) -> tuple[tuple[tuple[str, frozenset[str]], ...], tuple[str, ...]]:
    """smtpd_sender_login_maps' entries from its listable tables, and the
    tables that cannot be listed (regexp, pcre, SQL, LDAP...: only Postfix can
    ask them, one sender at a time)."""
    entries: list[tuple[str, str]] = []
    unlisted: list[str] = []
    for table in split_list(value):
        if not is_table(table):
            continue
        kind = _table_for_reading(table).split(":", 1)[0]
        if kind not in LISTABLE_TABLE_TYPES:
            unlisted.append(table)
            continue
        for line in config.table_lines(table, fold_keys=True):
            entry = table_entry(line)
            if entry is not None:
                entries.append(entry)
    return login_map_entries(entries), tuple(unlisted)


def _with_configured_domains(
    source: str,
    specs: list[AddressClass],
    values: dict[str, str],
    transports: TransportLearner,
    configured_domains: Sequence[str],
) -> LocalDelivery:
    """Configured domains, with every class's transport and their transport_maps routes."""
    mailers = first_origins(
        mailer for spec in specs if (mailer := _class_mailer(spec, values)) is not None
    )
    domains = DomainSet.of(configured_domains)
    relevant = RelevantDomains(domains.names, (parent[1:] for parent in domains.parents))
    routes, summaries = transports.learn(relevant)
    learned = configured_class(configured_domains, mailers, routes)
    return LocalDelivery((learned,), source, tuple(summaries))
