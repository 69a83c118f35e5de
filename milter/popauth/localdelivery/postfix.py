"""Local domains and mailers from Postfix's own configuration.

Postfix sorts every recipient domain into an address class and delivers each
class with its transport; the transport's name is what smtpd sends the milter
as ``{rcpt_mailer}``:

=========================  =================================================
domain list                transport ({rcpt_mailer} is the part before ':')
=========================  =================================================
mydestination              local_transport (``local``)
virtual_alias_domains      ``error`` until cleanup rewrites the address with
                           virtual_alias_maps (trivial-rewrite's answer)
virtual_mailbox_domains    virtual_transport (``virtual``, often ``lmtp``)
relay_domains              relay_transport (``relay``): inbound, backup MX
=========================  =================================================

and ``transport_maps`` can give any of those domains another transport. The
values come from ``postconf -x`` (``$name`` expanded, ``-c DIR`` or
``MAIL_CONFIG`` like every Postfix command); domain lists may hold
``/file/name`` and ``type:table`` patterns, which are read with ``postmap``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from popauth.localdelivery import (
    Learned,
    LearnError,
    MtaNotFound,
    canonical_domain,
    is_domain_name,
    is_mailer_name,
)
from popauth.localdelivery.commands import (
    CommandResult,
    CommandUnavailable,
    Runner,
    find_tool,
    run_command,
)
from popauth.recipients import DomainSet

# Each domain list with the transport of its address class (None: a fixed word).
ADDRESS_CLASSES: tuple[tuple[str, str | None], ...] = (
    ("mydestination", "local_transport"),
    ("virtual_alias_domains", None),
    ("virtual_mailbox_domains", "virtual_transport"),
    ("relay_domains", "relay_transport"),
)
# trivial-rewrite resolves a virtual alias domain to the error transport; the
# real destination is known only after cleanup's virtual_alias_maps rewrite.
VIRTUAL_ALIAS_MAILER = "error"
PARAMETERS = (
    "config_directory",
    "mydestination",
    "local_transport",
    "virtual_alias_domains",
    "virtual_mailbox_domains",
    "virtual_transport",
    "relay_domains",
    "relay_transport",
    "transport_maps",
    "parent_domain_matches_subdomains",
)
# Table types whose entries postmap -s can list; the others can only be asked
# for a key (and postmap's fatal error on them costs a one-second pause).
LISTABLE_TABLE_TYPES = frozenset(
    {"hash", "btree", "lmdb", "cdb", "dbm", "sdbm", "texthash", "inline"}
)
_FIX_DOMAINS = "set local_domains in popauth's settings to the domains Postfix delivers here"
_FIX_MAILERS = "set local_mailers in popauth's settings to the transports of those domains"


def split_list(text: str) -> list[str]:
    """Split a Postfix list at commas and white space, keeping ``{...}`` whole."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for character in text:
        if character == "{":
            depth += 1
        elif character == "}" and depth:
            depth -= 1
        if depth == 0 and (character == "," or character.isspace()):
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(character)
    if current:
        items.append("".join(current))
    return items


def file_entries(text: str) -> list[str]:
    """The entries of a ``/file/name`` pattern: lists without ``#`` comments."""
    entries: list[str] = []
    for line in text.splitlines():
        entries += split_list(line.split("#", 1)[0])
    return entries


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


def parse_table_dump(text: str) -> dict[str, str]:
    """``key<TAB>value`` lines from ``postmap -s`` or ``postmap -q -``."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(None, 1)
        if parts:
            entries[parts[0].lower()] = parts[1].strip() if len(parts) > 1 else ""
    return entries


def mailer_word(transport: str) -> str | None:
    """The ``{rcpt_mailer}`` of a transport value: ``lmtp:unix:private/x`` -> lmtp.

    None for an empty transport (``:nexthop`` keeps the class's transport).
    """
    word = transport.strip().split(":", 1)[0].strip().lower()
    return word if word and is_mailer_name(word) else None


def is_table(pattern: str) -> bool:
    return ":" in pattern and not pattern.startswith("[")


def _table_for_reading(table: str) -> str:
    # proxymap only answers Postfix's own daemons; read the table underneath.
    return table.removeprefix("proxy:")


class PostfixConfig:
    """One Postfix configuration, read through its own tools."""

    def __init__(self, config_directory: str = "", run: Runner = run_command) -> None:
        self.config_directory = config_directory
        self._run = run
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
            return self._run(argv, stdin)
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

    def dump_table(self, table: str) -> dict[str, str]:
        """Every entry of a table that Postfix can list (hash, lmdb, texthash...)."""
        kind = _table_for_reading(table).split(":", 1)[0]
        if kind not in LISTABLE_TABLE_TYPES:
            raise LearnError(
                f"cannot list the entries of {table}: {kind} tables cannot be listed"
                f" (listable: {', '.join(sorted(LISTABLE_TABLE_TYPES))})"
            )
        result = self._call([*self._tool("postmap"), "-s", _table_for_reading(table)])
        if result.returncode != 0:
            raise LearnError(f"cannot list the entries of {table}: {result.error_text()}")
        return parse_table_dump(result.stdout)

    def query_table(self, table: str, keys: Sequence[str]) -> dict[str, str]:
        """The entries of ``keys`` found in a table (any type Postfix can query)."""
        if not keys:
            return {}
        argv = [*self._tool("postmap"), "-q", "-", _table_for_reading(table)]
        result = self._call(argv, "".join(f"{key}\n" for key in keys))
        # postmap -q exits 1 when no key was found; errors are "fatal:" lines.
        if result.returncode not in (0, 1) or "fatal:" in result.stderr:
            raise LearnError(f"cannot look up keys in {table}: {result.error_text()}")
        return parse_table_dump(result.stdout)

    def read_file(self, path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError as error:
            raise LearnError(f"cannot read {path}: {error.strerror}") from None


def _domain_list(config: PostfixConfig, parameter: str, value: str) -> list[str]:
    """Every domain a Postfix domain list names, through files and tables."""
    domains: list[str] = []
    pending = split_list(value)
    seen_files: set[str] = set()
    while pending:
        item = pending.pop(0)
        if item.startswith("!"):
            continue  # an exclusion; what it excludes is not added either
        if item.startswith("/"):
            if item not in seen_files:
                seen_files.add(item)
                pending = file_entries(config.read_file(item)) + pending
            continue
        if is_table(item):
            try:
                keys = config.dump_table(item)
            except LearnError as problem:
                raise LearnError(f"{parameter}: {problem}; {_FIX_DOMAINS}") from None
            # Keys with an '@' are mailboxes (a table shared with *_maps).
            domains += [key for key in keys if "@" not in key and is_domain_name(key)]
            continue
        if is_domain_name(item):
            domains.append(item)
    return domains


def _transport_keys(domain: str, parent_style: bool) -> list[str]:
    """transport(5)'s search order for a domain (after the full address)."""
    keys = [domain]
    labels = domain.split(".")
    for start in range(1, len(labels)):
        parent = ".".join(labels[start:])
        keys.append(parent if parent_style else "." + parent)
    keys.append("*")
    return keys


def _address_and_domain_keys(domain: str, parent_style: bool) -> list[str]:
    # A sample mailbox first: regular-expression tables see the full address.
    return [f"postmaster@{domain}", *_transport_keys(domain, parent_style)]


def _transport_mailers(
    config: PostfixConfig,
    learned: Learned,
    tables: list[str],
    domains: Sequence[str],
    parent_style: bool,
) -> None:
    """Transport words that ``transport_maps`` gives recipients in local domains."""
    local = DomainSet.of(domains)
    exact = [d for d in domains if not d.startswith(".")]
    probes = sorted(
        {key for domain in exact for key in _address_and_domain_keys(domain, parent_style)}
    )
    contents: list[dict[str, str]] = []
    for table in tables:
        try:
            entries = config.dump_table(table)
        except LearnError:
            try:
                entries = config.query_table(table, probes)
            except LearnError as problem:
                raise LearnError(f"transport_maps: {problem}; {_FIX_MAILERS}") from None
        else:
            # A listed table also names single mailboxes and subdomains.
            for key, value in entries.items():
                domain = key.rpartition("@")[2].lstrip(".")
                word = mailer_word(value)
                if key != "*" and word and domain in local:
                    learned.add_mailer(word, f"postfix transport_maps {table} ({key})")
        contents.append(entries)
    for domain in exact:
        for key in _address_and_domain_keys(domain, parent_style):
            found = next((e[key] for e in contents if key in e), None)
            if found is not None:
                word = mailer_word(found)
                if word:
                    learned.add_mailer(word, f"postfix transport_maps ({key} -> {domain})")
                break


def learn_from_postfix(
    config_directory: str = "",
    configured_domains: Sequence[str] | None = None,
    run: Runner = run_command,
) -> Learned:
    """What Postfix delivers here. ``configured_domains`` replaces its domain lists.

    Raises MtaNotFound when there is no Postfix configuration (and no
    directory was named), LearnError when one is there but cannot be read
    whole: an unreadable list would silently refuse mail to its domains.
    """
    config = PostfixConfig(config_directory, run)
    values = config.parameters(PARAMETERS)
    # The directory named with -c is the one read: Postfix 3.10's postconf can
    # report its built-in default (/etc/postfix) for config_directory then.
    directory = config_directory or values.get("config_directory", "?")
    learned = Learned(f"postfix (config_directory {directory})")
    parent_style = set(split_list(values.get("parent_domain_matches_subdomains", "")))
    for parameter, transport_parameter in ADDRESS_CLASSES:
        value = values.get(parameter, "")
        if not split_list(value):
            continue
        if configured_domains is None:
            for domain in _domain_list(config, parameter, value):
                learned.add_domain(domain, f"postfix {parameter}")
                if parameter in parent_style and not domain.startswith("."):
                    learned.add_domain("." + domain, f"postfix {parameter} (and subdomains)")
        if transport_parameter is None:
            word: str | None = VIRTUAL_ALIAS_MAILER
            origin = f"postfix {parameter} (resolved to Postfix's error transport)"
        else:
            word = mailer_word(values.get(transport_parameter, ""))
            origin = f"postfix {transport_parameter} (for {parameter})"
        if word:
            learned.add_mailer(word, origin)
    domains = (
        [canonical_domain(d) for d in configured_domains]
        if configured_domains is not None
        else list(learned.domains)
    )
    tables = [t for t in split_list(values.get("transport_maps", "")) if is_table(t)]
    if tables and domains:
        _transport_mailers(config, learned, tables, domains, "transport_maps" in parent_style)
    return learned
