"""The local services file: pykp's own source of services when no cluster is used.


The format borrows Kubernetes' names (a Service's spec plus its endpoints) so operators
recognise it:

    defaults:
      policy: random                 # random | round-robin | maglev | least-conn
    services:
      - name: web
        namespace: default
        clusterIPs: [10.96.0.10, "fd00:96::10"]
        ports:
          - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}
        endpoints:
          - {ip: 10.244.1.10, ready: true, nodeName: node-a}

Loading never stops at the first mistake: every invalid entry is reported with the
file:line:column of the offending node and skipped, and the rest of the file loads. An
invalid endpoint skips only that endpoint (as with an EndpointSlice); anything else wrong
in a service skips the whole service. Only a file that is not YAML, or whose top level is
not a mapping, is fatal (`ServicesFileError`).
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from importlib import resources
from itertools import accumulate, compress, count
from operator import attrgetter, is_not
from typing import Final, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pykp.model import (
    DEFAULT_AFFINITY_TIMEOUT_SECONDS,
    DEFAULT_POLICY,
    HASH_KEYS,
    MAX_AFFINITY_TIMEOUT_SECONDS,
    MAX_WEIGHT,
    POLICIES,
    PROTOCOLS,
    SESSION_AFFINITIES,
    TRAFFIC_POLICIES,
    Catalog,
    EndpointSpec,
    Problem,
    ServicePort,
    ServiceSpec,
)

BUNDLED_EXAMPLE: Final = "examples/services.yaml"


class ServicesFileError(Exception):
    """The file cannot be read at all: not YAML, or not a mapping at the top."""

    def __init__(self, source: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{source}:{line}:{column}: {message}")
        self.source = source
        self.line = line
        self.column = column
        self.message = message


# --- loading ------------------------------------------------------------------------------


# libyaml's loader when PyYAML has it: ~4x faster on large files (10,000 services: 4 s
# instead of 16 s), with the same node marks for problem locations.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_services_file(
    path: str | os.PathLike[str],
    cache: ServicesFileCache | None = None,
    *,
    default_policy: str = DEFAULT_POLICY,
) -> tuple[Catalog, list[Problem]]:
    """Load a services file; problems name the file as `path` was given. `default_policy`:
    the policy of services when neither they nor the file's `defaults` name one.

    Raises `ServicesFileError` when the file is not YAML or not a mapping, and `OSError`
    when it cannot be read.
    """
    source = os.fspath(path)
    with open(source, "rb") as file:
        data = file.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ServicesFileError(source, 1, 1, f"not UTF-8 text ({error.reason})") from None
    return load_services_text(text, source, cache, default_policy=default_policy)


def load_bundled_example() -> tuple[Catalog, list[Problem]]:
    """The example services file shipped inside the package (`pykp/examples/`)."""
    resource = resources.files("pykp").joinpath(BUNDLED_EXAMPLE)
    return load_services_text(resource.read_text(encoding="utf-8"), f"pykp/{BUNDLED_EXAMPLE}")


def load_services_text(
    text: str,
    source_name: str = "<string>",
    cache: ServicesFileCache | None = None,
    *,
    default_policy: str = DEFAULT_POLICY,
) -> tuple[Catalog, list[Problem]]:
    """Parse services-file text. Raises `ServicesFileError` only for fatal errors.

    With a `cache` (kept from one load of a file to the next), entries whose text did not
    change are not parsed again and come back as the same `ServiceSpec` objects; a cache
    knows only the default `default_policy` (ValueError otherwise).
    """
    if default_policy not in POLICIES:
        raise ValueError(f"{default_policy!r} is not one of {', '.join(POLICIES)}")
    if cache is not None and default_policy != DEFAULT_POLICY:
        raise ValueError("a services-file cache parses with the default policy only")
    if cache is not None:
        loaded = cache.load(text, source_name)
        if loaded is not None:
            return loaded
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        message = error.problem or "syntax error"
        if error.context:
            message += f" ({error.context})"
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ServicesFileError(source_name, line, column, f"invalid YAML: {message}") from None
    if root is None:  # an empty file: no services, nothing wrong
        return Catalog(default_policy=default_policy, traffic_policies=True), []
    if not isinstance(root, MappingNode):
        line, column = _position(root)
        raise ServicesFileError(
            source_name,
            line,
            column,
            f"the top level must be a mapping, not {_kind(root)}",
        )
    parser = _Parser(source_name, default_policy)
    services_file = parser.parse_file(root)
    return services_file, parser.problems


class ServicesFileCache:
    """The entries of the last load of a file, by their exact text, and what the checks
    across entries need, kept up to date edit by edit.

    A file in the plain block style (`services:` at column 0 followed by a block list)
    is split into one text per entry without parsing it; each entry's text is composed
    alone (marks relative to it) and parsed on its own once. The rest of the file is
    composed with the entries blanked out (lines kept, so positions hold). Anything else
    (flow style, directives, several documents, an entry that does not compose alone such
    as an alias of another entry's anchor) falls back to the full parse, which gives the
    same result.

    The checks across entries (a repeated name, a frontend or nodePort two services
    claim) only concern entries that share a name or a claim: the cache counts, for each
    name and each claim, the entry texts that have it (updated only for the texts added
    or removed by an edit), and runs the checks in file order over just the entries that
    share one or have problems of their own; every other entry loads as it parsed alone,
    with no per-entry Python work.
    """

    def __init__(self) -> None:
        self._skeleton: tuple[tuple[str, str, int, str], tuple[str, list[Problem]]] | None = None
        self._parsed_as: tuple[str, int] | None = None  # (default policy, the list's indent)
        self._entries: dict[str, _Entry] = {}  # by text, each in the file
        self._counts: dict[str, int] = {}  # how many times each text is in the file
        self._repeated = False  # some text is in the file more than once
        self._names = _Users()  # namespace/name -> the texts that name it
        self._claims = _Users()  # frontend or nodePort -> the texts that would claim it
        self._own_problems: set[str] = set()  # texts with problems of their own

    def load(self, text: str, source: str) -> tuple[Catalog, list[Problem]] | None:
        split = _split(text)
        if split is None:
            return None
        header, pieces, block_lines, trailer, indent = split
        key = (header, trailer, block_lines, source)
        if self._skeleton is not None and self._skeleton[0] == key:
            default_policy, problems = self._skeleton[1]
        else:
            skeleton = _skeleton(header, indent, block_lines, trailer, source)
            if skeleton is None:
                return None
            default_policy, problems = skeleton
            self._skeleton = (key, skeleton)
        if self._parsed_as != (default_policy, indent):
            self._reset((default_policy, indent))

        # What changed: texts added and removed (a count changed when one is repeated).
        counts = Counter(pieces)
        repeated = len(counts) != len(pieces)
        old = self._counts
        changes: list[tuple[str, int]]
        if repeated or self._repeated:
            changed = {piece for piece, _ in counts.items() ^ old.items()}
            changes = [(piece, counts.get(piece, 0) - old.get(piece, 0)) for piece in changed]
        else:
            changes = [(t, 1) for t in counts.keys() - old.keys()]
            changes += [(t, -1) for t in old.keys() - counts.keys()]

        # Parse the new texts before changing anything: one that does not compose alone
        # leaves the cache as it was (and the caller does a full parse).
        parser = _Parser(source)
        prefix = " " * indent + "-"
        parsed: dict[str, _Entry] = {}
        for piece, change in changes:
            if change > 0 and piece not in self._entries:
                try:
                    root = yaml.compose(prefix + piece + "\n", Loader=_LOADER)
                except yaml.YAMLError:
                    return None
                if not isinstance(root, SequenceNode) or len(root.value) != 1:
                    return None
                entry = parser.parse_entry(root.value[0], default_policy)
                entry.lines = piece.count("\n") + 1
                parsed[piece] = entry

        self._entries.update(parsed)
        for piece, change in changes:
            self._update(piece, self._entries[piece], change, counts.get(piece, 0))
        self._counts, self._repeated = counts, repeated

        entries = list(map(self._entries.__getitem__, pieces))
        specs = list(map(_SPEC, entries))
        parser.problems = list(problems)
        involved = self._own_problems.union(*self._names.shared.values())
        involved.update(*self._claims.shared.values())
        if involved:
            # In file order, the entries that have problems or share a name or a claim (no
            # other entry shares one with them): the same checks as a full parse.
            bases = list(accumulate(map(_LINES, entries), initial=header.count("\n")))
            for index in compress(count(), map(involved.__contains__, pieces)):
                if parser.settle(entries[index], f"services[{index}]", bases[index]) is None:
                    specs[index] = None
        # By key too (valid entries have distinct keys), so no consumer builds that.
        by_key = dict(compress(zip(map(_KEY, entries), specs), map(_IS_SPEC, specs)))
        catalog = Catalog(
            services=tuple(by_key.values()),
            default_policy=default_policy,
            traffic_policies=True,
            invalid=frozenset(parser._invalid_services),
            by_key=by_key,
        )
        return catalog, parser.problems

    def _reset(self, parsed_as: tuple[str, int]) -> None:
        self._parsed_as = parsed_as
        self._entries, self._counts, self._repeated = {}, {}, False
        self._names, self._claims, self._own_problems = _Users(), _Users(), set()

    def _update(self, piece: str, entry: _Entry, change: int, now: int) -> None:
        """`change` more (or fewer) times `piece` in the file, `now` times in all."""
        if entry.name_at is not None:
            self._names.add(entry.key, piece, change)
        if entry.spec is not None:  # valid alone: claims its frontends and nodePorts
            for claim in entry.frontends:
                self._claims.add(claim, piece, change)
            for node_port in entry.node_ports:
                self._claims.add(node_port, piece, change)
        if now == 0:
            del self._entries[piece]
            self._own_problems.discard(piece)
        elif entry.problems or entry.spec is None:  # (no problems: nothing to reach)
            self._own_problems.add(piece)


class _Users:
    """For each thing (a service's name, a frontend, a nodePort), the entry texts that
    have it, with how many times each is in the file: `one` when that is a single text
    once, `shared` otherwise (the entries the checks across entries concern)."""

    __slots__ = ("one", "shared")

    def __init__(self) -> None:
        self.one: dict[object, str] = {}
        self.shared: dict[object, dict[str, int]] = {}

    def add(self, thing: object, text: str, change: int) -> None:
        users = self.shared.get(thing)
        if users is None:
            single = self.one.pop(thing, None)
            users = {} if single is None else {single: 1}
        times = users.get(text, 0) + change
        if times > 0:
            users[text] = times
        else:
            users.pop(text, None)
        total = sum(users.values())
        if total > 1:
            self.shared[thing] = users
            return
        self.shared.pop(thing, None)
        if total == 1:
            (self.one[thing],) = users


_SPEC: Final = attrgetter("spec")
_KEY: Final = attrgetter("key")
_LINES: Final = attrgetter("lines")
_IS_SPEC: Final = partial(is_not, None)

_SERVICES_KEY = re.compile(r"services:[ \t]*(?:#[^\n]*)?\n")
_SERVICES_KEYS = re.compile(r"^services:[ \t]*(?:#[^\n]*)?\n", re.M)
_UNUSUAL = re.compile(r"^(?:%|---|\.\.\.)", re.M)
_FIRST_ITEM = re.compile(r"(?:[ ]*(?:#[^\n]*)?\n)*( *)-[ \n]")
# The line that ends the entries: at column 0, not blank nor a comment (nor, at indent 0,
# an item's dash). Every search starts with a plain line break, which `re` looks for
# quickly; no pattern is tried at each position of the file.
_BLOCK_END: Final = (re.compile(r"\n[^ \n#-]"), re.compile(r"\n[^ \n#]"))


def _split(text: str) -> tuple[str, list[str], int, str, int] | None:
    """(header, each entry's text, the entries' line count, trailer, the list's indent),
    or None when the file is not in the plain block style. An entry's text is what
    follows its item's dash, up to the line break before the next item (excluded)."""
    if "\r" in text or "\t" in text or text.startswith("\ufeff"):
        return None
    # The first `services:` line; any other can only be after the entries (a line at
    # column 0 ends them).
    match = _SERVICES_KEY.match(text)
    at = 0
    while match is None:
        at = text.find("\nservices:", at) + 1
        if at == 0:
            return None
        match = _SERVICES_KEY.match(text, at)
    first = _FIRST_ITEM.match(text, match.end())
    if first is None:
        return None
    indent = len(first.group(1))
    start = first.start(1)
    ended = _BLOCK_END[indent > 0].search(text, start)
    end = ended.start() + 1 if ended is not None else len(text)
    header, trailer = text[:start], text[end:]
    # Directives and document markers are at column 0: not among the entries, except at
    # indent 0 a `---`, which is no item's dash (below).
    if _UNUSUAL.search(header) or _UNUSUAL.search(trailer) or _SERVICES_KEYS.search(trailer):
        return None
    body = text[start : end - 1] if text[end - 1] == "\n" else text[start:end]
    separator = "\n" + " " * indent + "-"
    if re.search(re.escape(separator) + "[^ \n]", body):
        return None  # a dash at the list's indent that starts no item (or a `---`)
    pieces = body.split(separator)
    pieces[0] = pieces[0][indent + 1 :]
    return header, pieces, text.count("\n", start, end), trailer, indent


def _skeleton(
    header: str, indent: int, block_lines: int, trailer: str, source: str
) -> tuple[str, list[Problem]] | None:
    """The default policy and the problems outside the entries: the file with its entries
    replaced by one placeholder item and blank lines; None if that does not hold up."""
    placeholder = " " * indent + "- 0"
    text = header + placeholder + "\n" * block_lines + trailer
    if block_lines == 0:
        return None
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError:
        return None
    if not isinstance(root, MappingNode):
        return None
    parser = _Parser(source)
    fields = parser.fields(root, "", _FILE_FIELDS)
    default_policy = parser.parse_defaults(fields)
    services = parser.optional(fields, "services")
    line = header.count("\n")
    if (
        not isinstance(services, SequenceNode)
        or len(services.value) != 1
        or not isinstance(services.value[0], ScalarNode)
        or services.value[0].value != "0"
        or services.value[0].start_mark.line != line
        or services.value[0].start_mark.column != indent + 2
    ):
        return None
    return default_policy, parser.problems


def _position(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "a scalar"


_FILE_FIELDS: Final = ("defaults", "services")
_DEFAULTS_FIELDS: Final = ("policy",)
_SERVICE_FIELDS: Final = (
    "name",
    "namespace",
    "clusterIP",
    "clusterIPs",
    "externalIPs",
    "loadBalancerIPs",
    "ports",
    "policy",
    "hashKey",
    "sessionAffinity",
    "sessionAffinityTimeoutSeconds",
    "externalTrafficPolicy",
    "internalTrafficPolicy",
    "healthCheckNodePort",
    "endpoints",
)
_PORT_FIELDS: Final = ("name", "port", "targetPort", "protocol", "nodePort")
_ENDPOINT_FIELDS: Final = (
    "ip",
    "ready",
    "serving",
    "terminating",
    "nodeName",
    "zone",
    "weight",
)

# Kubernetes' name rules: service names are DNS-1035 labels, namespaces and port names
# DNS-1123 labels.
_DNS1035_LABEL: Final = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_LABEL_LENGTH: Final = 63


class _Invalid(Exception):
    """A field or entry is invalid; its problem is already recorded."""


_T = TypeVar("_T")
_D = TypeVar("_D")


# The path an entry is parsed under; `settle` replaces it with services[index].
_ENTRY: Final = "@"


class _Entry:
    """One services entry as its text alone says: its problems (0-based line relative to
    the entry, column, path after the entry's, message) in three runs (before the name's
    uniqueness check, up to the frontends' claim, the endpoints'), and what the checks
    against the other entries need. `spec` is set when the entry is valid on its own."""

    __slots__ = (
        "name",
        "key",
        "name_at",
        "problems",
        "first",
        "middle",
        "unreachable_at",
        "ports_at",
        "frontends",
        "node_ports",
        "spec",
        "lines",
    )

    def __init__(self) -> None:
        self.name = ""
        self.key = ""
        self.name_at: tuple[int, int] | None = None
        self.problems: list[tuple[int, int, str, str]] = []
        self.first = 0
        self.middle = 0
        self.unreachable_at: tuple[int, int] | None = None
        self.ports_at: list[tuple[int, int]] = []
        self.frontends: dict[tuple[str, int, str], int] = {}
        self.node_ports: dict[tuple[int, str], int] = {}
        self.spec: ServiceSpec | None = None
        self.lines = 0  # the entry text's lines, when cached

    def set_problems(self, problems: list[Problem], first: int, middle: int) -> None:
        self.problems = [(p.line - 1, p.column, p.path[len(_ENTRY) :], p.message) for p in problems]
        self.first, self.middle = first, middle


class _Parser:
    """Walks the composed YAML nodes (which keep their marks) and records problems.

    Field parsers raise `_Invalid` after recording a problem; an entry is skipped when any
    problem was recorded while parsing it (counted with `len(self.problems)`).
    """

    def __init__(self, source: str, default_policy: str = DEFAULT_POLICY) -> None:
        self.source = source
        self.default_policy = default_policy  # when the file's `defaults` name none
        self.problems: list[Problem] = []
        self._constructor = SafeConstructor()
        # namespace/name -> the path and line of its first definition
        self._service_names: dict[str, tuple[str, int]] = {}
        self._invalid_services: set[str] = set()
        self._frontend_owners: dict[tuple[str, int, str], str] = {}
        self._node_port_owners: dict[tuple[int, str], str] = {}

    # -- reporting and generic field access

    def report(self, node: Node, path: str, message: str) -> None:
        line, column = _position(node)
        self.problems.append(Problem(self.source, line, column, path, message))

    def fail(self, node: Node, path: str, message: str) -> _Invalid:
        self.report(node, path, message)
        return _Invalid()

    def fields(self, node: Node, path: str, known: Sequence[str]) -> dict[str, Node]:
        """The value nodes of a mapping's known keys.

        Unknown and repeated keys are recorded as problems but do not stop the parse, so
        one pass reports every mistake of an entry (the caller still skips the entry).
        """
        if not isinstance(node, MappingNode):
            raise self.fail(
                node,
                path or "(top level)",
                f"expected a mapping, got {self.describe(node)}",
            )
        fields: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node) if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                self.report(
                    key_node,
                    path or "(top level)",
                    f"field names must be strings, got {self.describe(key_node)}",
                )
            elif key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.report(key_node, _join(path, key), f"unknown field{hint}")
            elif key in fields:
                self.report(key_node, _join(path, key), "duplicate field")
            else:
                fields[key] = value_node
        return fields

    def optional(self, fields: dict[str, Node], key: str) -> Node | None:
        """A field's node, or None when absent or null (YAML's way of leaving it unset)."""
        node = fields.get(key)
        return None if node is None or _is_null(node) else node

    def field(
        self,
        fields: dict[str, Node],
        key: str,
        path: str,
        parse: Callable[[Node, str], _T],
        default: _D,
    ) -> _T | _D:
        """An optional field's value; `default` when unset or invalid (the problem is recorded)."""
        node = self.optional(fields, key)
        if node is None:
            return default
        try:
            return parse(node, _join(path, key))
        except _Invalid:
            return default

    def required(
        self,
        fields: dict[str, Node],
        key: str,
        path: str,
        owner: Node,
        parse: Callable[[Node, str], _T],
    ) -> _T:
        node = self.optional(fields, key)
        if node is None:
            # Point at the null value if there is one, else at the entry that lacks the key.
            raise self.fail(fields.get(key, owner), _join(path, key), "required field is missing")
        return parse(node, _join(path, key))

    def scalar(self, node: ScalarNode) -> object:
        return self._constructor.construct_object(node, deep=True)

    def describe(self, node: Node) -> str:
        if not isinstance(node, ScalarNode):
            return _kind(node)
        value = self.scalar(node)
        if value is None:
            return "null"
        if isinstance(value, bool):
            return f"a boolean ({node.value})"
        if isinstance(value, (int, float)):
            return f"a number ({node.value})"
        return f"a string ({node.value!r})"

    # -- typed values

    def string(self, node: Node, path: str) -> str:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str):
            raise self.fail(node, path, f"expected a string, got {self.describe(node)}")
        return value

    def label(self, node: Node, path: str, pattern: re.Pattern[str], what: str) -> str:
        value = self.string(node, path)
        if len(value) > _MAX_LABEL_LENGTH or not pattern.fullmatch(value):
            raise self.fail(node, path, f"{value!r} is not a valid {what}")
        return value

    def service_name(self, node: Node, path: str) -> str:
        return self.label(node, path, _DNS1035_LABEL, "service name (lowercase DNS-1035 label)")

    def namespace(self, node: Node, path: str) -> str:
        return self.label(node, path, _DNS1123_LABEL, "namespace (lowercase DNS-1123 label)")

    def port_name(self, node: Node, path: str) -> str:
        return self.label(node, path, _DNS1123_LABEL, "port name (lowercase DNS-1123 label)")

    def integer(self, node: Node, path: str, low: int, high: int) -> int:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(node, path, f"expected an integer, got {self.describe(node)}")
        if not low <= value <= high:
            raise self.fail(node, path, f"{value} is out of range {low}..{high}")
        return value

    def port_number(self, node: Node, path: str) -> int:
        return self.integer(node, path, 1, 65535)

    def target_port(self, node: Node, path: str) -> int:
        if isinstance(node, ScalarNode) and isinstance(self.scalar(node), str):
            # Kubernetes allows a container port's name here, but this file has no pods.
            raise self.fail(
                node,
                path,
                f"expected a port number, got {self.describe(node)} (named target ports need pods)",
            )
        return self.port_number(node, path)

    def affinity_timeout(self, node: Node, path: str) -> int:
        return self.integer(node, path, 1, MAX_AFFINITY_TIMEOUT_SECONDS)

    def weight(self, node: Node, path: str) -> int:
        return self.integer(node, path, 1, MAX_WEIGHT)

    def boolean(self, node: Node, path: str) -> bool:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, bool):
            raise self.fail(node, path, f"expected true or false, got {self.describe(node)}")
        return value

    def one_of(self, choices: Sequence[str]) -> Callable[[Node, str], str]:
        def parse(node: Node, path: str) -> str:
            value = self.string(node, path)
            if value not in choices:
                raise self.fail(node, path, f"{value!r} is not one of {', '.join(choices)}")
            return value

        return parse

    def ip(self, node: Node, path: str) -> str:
        # The raw text, not the constructed value: YAML 1.1 reads some IPv6 spellings
        # (e.g. 1:2:3:4:5:6:7:8) as base-60 integers.
        if not isinstance(node, ScalarNode) or _is_null(node):
            raise self.fail(node, path, f"expected an IP address, got {self.describe(node)}")
        try:
            address = ipaddress.ip_address(node.value)
        except ValueError:
            raise self.fail(node, path, f"{node.value!r} is not a valid IP address") from None
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise self.fail(node, path, f"{node.value!r}: a zone index (%...) is not allowed")
        return str(address)

    def items(self, node: Node, path: str) -> list[Node]:
        if not isinstance(node, SequenceNode):
            raise self.fail(node, path, f"expected a list, got {self.describe(node)}")
        return list(node.value)

    def ip_list(self, node: Node, path: str) -> tuple[str, ...]:
        problems_before = len(self.problems)
        addresses: list[str] = []
        for index, item in enumerate(self.items(node, path)):
            try:
                address = self.ip(item, f"{path}[{index}]")
            except _Invalid:
                continue
            if address in addresses:
                self.report(item, f"{path}[{index}]", f"duplicate address {address}")
            addresses.append(address)
        if len(self.problems) > problems_before:
            raise _Invalid()
        return tuple(addresses)

    # -- the file

    def parse_file(self, root: MappingNode) -> Catalog:
        fields = self.fields(root, "", _FILE_FIELDS)  # unknown top-level keys are only reported
        default_policy = self.parse_defaults(fields)
        try:
            entries = self.required(fields, "services", "", root, self.items)
        except _Invalid:
            return Catalog(default_policy=default_policy, traffic_policies=True)
        services = []
        for index, entry in enumerate(entries):
            service = self.parse_service(entry, f"services[{index}]", default_policy)
            if service is not None:
                services.append(service)
        return Catalog(
            services=tuple(services),
            default_policy=default_policy,
            traffic_policies=True,
            invalid=frozenset(self._invalid_services),
        )

    def parse_defaults(self, fields: dict[str, Node]) -> str:
        node = self.optional(fields, "defaults")
        if node is None:
            return self.default_policy
        try:
            defaults = self.fields(node, "defaults", _DEFAULTS_FIELDS)
        except _Invalid:
            return self.default_policy
        return self.field(
            defaults, "policy", "defaults", self.one_of(POLICIES), self.default_policy
        )

    # -- one service

    def parse_service(self, node: Node, path: str, default_policy: str) -> ServiceSpec | None:
        """One entry: its own checks (`parse_entry`), then those against the others."""
        return self.settle(self.parse_entry(node, default_policy), path, 0)

    def parse_entry(self, node: Node, default_policy: str) -> _Entry:
        """What an entry says on its own, and its problems (relative to the entry's text
        when the node was composed from that text alone): the same text always gives the
        same `_Entry`, so a cache of them keyed by text is exact."""
        saved, self.problems = self.problems, []
        try:
            return self._parse_entry(node, default_policy)
        finally:
            self.problems = saved

    def _parse_entry(self, node: Node, default_policy: str) -> _Entry:
        path = _ENTRY
        entry = _Entry()
        try:
            fields = self.fields(node, path, _SERVICE_FIELDS)
        except _Invalid:
            entry.set_problems(self.problems, len(self.problems), len(self.problems))
            return entry

        name = ""
        with contextlib.suppress(_Invalid):
            name = self.required(fields, "name", path, node, self.service_name)
        namespace = self.field(fields, "namespace", path, self.namespace, "default")
        entry.name, entry.key = name, f"{namespace}/{name}"
        if name:
            entry.name_at = _position(fields["name"])
        first = len(self.problems)
        cluster_ips = self.cluster_ips(fields, path)
        external_ips = self.field(fields, "externalIPs", path, self.ip_list, ())
        load_balancer_ips = self.field(fields, "loadBalancerIPs", path, self.ip_list, ())
        policy = self.field(fields, "policy", path, self.one_of(POLICIES), default_policy)
        hash_key = self.field(fields, "hashKey", path, self.one_of(HASH_KEYS), None)
        affinity = self.field(
            fields, "sessionAffinity", path, self.one_of(SESSION_AFFINITIES), "None"
        )
        timeout = self.field(
            fields,
            "sessionAffinityTimeoutSeconds",
            path,
            self.affinity_timeout,
            DEFAULT_AFFINITY_TIMEOUT_SECONDS,
        )
        timeout_node = self.optional(fields, "sessionAffinityTimeoutSeconds")
        if timeout_node is not None and affinity != "ClientIP":
            self.report(
                timeout_node,
                _join(path, "sessionAffinityTimeoutSeconds"),
                "only allowed with sessionAffinity: ClientIP",
            )
        traffic_policy = self.one_of(TRAFFIC_POLICIES)
        external_traffic_policy = self.field(
            fields, "externalTrafficPolicy", path, traffic_policy, "Cluster"
        )
        internal_traffic_policy = self.field(
            fields, "internalTrafficPolicy", path, traffic_policy, "Cluster"
        )
        health_check_node_port = self.field(
            fields, "healthCheckNodePort", path, self.port_number, None
        )
        health_check_node = self.optional(fields, "healthCheckNodePort")
        if health_check_node is not None and external_traffic_policy != "Local":
            self.report(
                health_check_node,
                _join(path, "healthCheckNodePort"),
                "only allowed with externalTrafficPolicy: Local",
            )
        ports: list[tuple[ServicePort, Node]] = []
        with contextlib.suppress(_Invalid):
            ports = self.required(fields, "ports", path, node, self.parse_ports)
        self.check_local_endpoints_named(
            fields, path, entry.key, external_traffic_policy, internal_traffic_policy
        )
        middle = len(self.problems)
        addresses = (*cluster_ips, *external_ips, *load_balancer_ips)
        if not addresses and all(port.node_port is None for port, _ in ports):
            entry.unreachable_at = _position(node)
        entry.ports_at = [_position(port_node) for _, port_node in ports]
        entry.frontends = {
            (address, port.port, port.protocol): index
            for index, (port, _) in enumerate(ports)
            for address in addresses
        }
        entry.node_ports = {
            (port.node_port, port.protocol): index
            for index, (port, _) in enumerate(ports)
            if port.node_port is not None
        }

        # Endpoints are checked even when the service is skipped, so one pass finds everything.
        endpoints = self.field(fields, "endpoints", path, self.parse_endpoints, ())
        entry.set_problems(self.problems, first, middle)
        if middle == 0 and entry.unreachable_at is None:
            entry.spec = ServiceSpec(
                name=name,
                namespace=namespace,
                cluster_ips=cluster_ips,
                external_ips=external_ips,
                load_balancer_ips=load_balancer_ips,
                ports=tuple(port for port, _ in ports),
                policy=policy,
                hash_key=hash_key,
                session_affinity=affinity,
                session_affinity_timeout_seconds=timeout if affinity == "ClientIP" else None,
                external_traffic_policy=external_traffic_policy,
                internal_traffic_policy=internal_traffic_policy,
                health_check_node_port=health_check_node_port,
                endpoints=endpoints,
            )
        return entry

    def check_local_endpoints_named(
        self, fields: dict[str, Node], path: str, key: str, external: str, internal: str
    ) -> None:
        """A Local traffic policy sends traffic only to the endpoints on this node, which
        only an endpoint's nodeName tells (matched against the agent's node name,
        --hostname-override): endpoints of which none names its node cannot be meant."""
        endpoints = self.optional(fields, "endpoints")
        if not isinstance(endpoints, SequenceNode) or not endpoints.value:
            return
        if any(_has_key(endpoint, "nodeName") for endpoint in endpoints.value):
            return
        for policy_key, policy in (
            ("externalTrafficPolicy", external),
            ("internalTrafficPolicy", internal),
        ):
            if policy == "Local":
                self.report(
                    fields[policy_key],
                    _join(path, policy_key),
                    f"{key}: Local sends traffic only to endpoints on this node, but no "
                    "endpoint has a nodeName to say which node it is on (add nodeName to "
                    "the endpoints, or use Cluster)",
                )
                return

    def settle(self, entry: _Entry, path: str, base: int) -> ServiceSpec | None:
        """An entry's problems placed (its text starts at 0-based line `base`; its index
        in `path`) and its checks against the entries before it: a repeated name, and
        frontends or nodePorts another service claimed."""
        problems_before = len(self.problems)
        self.emit(entry.problems[: entry.first], path, base)
        if entry.name_at is not None:
            self.check_unique_name(entry.key, entry.name_at, path, base)
        self.emit(entry.problems[entry.first : entry.middle], path, base)
        if len(self.problems) == problems_before and entry.unreachable_at is not None:
            line, column = entry.unreachable_at
            self.problems.append(
                Problem(
                    self.source,
                    base + line,
                    column,
                    path,
                    "nothing to reach: set clusterIPs, externalIPs, loadBalancerIPs or a nodePort",
                )
            )
        if len(self.problems) == problems_before:
            # Only a service that loads claims its frontends; a later one may not reuse them.
            self.claim_frontends(entry, path, base)
        service_is_valid = len(self.problems) == problems_before
        self.emit(entry.problems[entry.middle :], path, base)
        if entry.name and len(self.problems) > problems_before:
            self._invalid_services.add(entry.key)
        return entry.spec if service_is_valid else None

    def emit(self, problems: list[tuple[int, int, str, str]], path: str, base: int) -> None:
        for line, column, suffix, message in problems:
            self.problems.append(
                Problem(self.source, base + line + 1, column, path + suffix, message)
            )

    def check_unique_name(self, key: str, name_at: tuple[int, int], path: str, base: int) -> None:
        line = base + name_at[0]
        first = self._service_names.setdefault(key, (path, line))
        if first[0] != path:
            self.problems.append(
                Problem(
                    self.source,
                    line,
                    name_at[1],
                    _join(path, "name"),
                    f"duplicate service {key} (first defined at line {first[1]})",
                )
            )

    def cluster_ips(self, fields: dict[str, Node], path: str) -> tuple[str, ...]:
        """clusterIP and clusterIPs merged with Kubernetes' rules (at most one per family)."""
        single = self.field(fields, "clusterIP", path, self.ip, None)
        many = self.field(fields, "clusterIPs", path, self.ip_list, ())
        if single is not None and many and many[0] != single:
            self.report(
                fields["clusterIP"],
                _join(path, "clusterIP"),
                f"{single} differs from clusterIPs[0] ({many[0]})",
            )
        if len(many) > 2 or (len(many) == 2 and _family(many[0]) == _family(many[1])):
            self.report(
                fields["clusterIPs"],
                _join(path, "clusterIPs"),
                "at most one IPv4 and one IPv6 address (dual-stack)",
            )
        return many or (() if single is None else (single,))

    def claim_frontends(self, entry: _Entry, path: str, base: int) -> None:
        """Report frontends and nodePorts an earlier service owns; claim the rest."""
        frontends, node_ports = entry.frontends, entry.node_ports
        if self._frontend_owners.keys().isdisjoint(frontends) and (
            self._node_port_owners.keys().isdisjoint(node_ports)
        ):
            self._frontend_owners.update(dict.fromkeys(frontends, entry.key))
            self._node_port_owners.update(dict.fromkeys(node_ports, entry.key))
            return
        ports_path = _join(path, "ports")
        for frontend, index in frontends.items():
            owner = self._frontend_owners.get(frontend)
            if owner is not None:
                line, column = entry.ports_at[index]
                message = f"{_frontend_text(frontend)} is already used by {owner}"
                self.problems.append(
                    Problem(self.source, base + line, column, f"{ports_path}[{index}]", message)
                )
        for (node_port, protocol), index in node_ports.items():
            owner = self._node_port_owners.get((node_port, protocol))
            if owner is not None:
                line, column = entry.ports_at[index]
                message = f"nodePort {node_port}/{protocol} is already used by {owner}"
                self.problems.append(
                    Problem(self.source, base + line, column, f"{ports_path}[{index}]", message)
                )

    # -- ports

    def parse_ports(self, node: Node, path: str) -> list[tuple[ServicePort, Node]]:
        """The ports with their nodes (kept for locating later conflicts)."""
        entries = self.items(node, path)
        if not entries:
            raise self.fail(node, path, "a service needs at least one port")
        problems_before = len(self.problems)
        ports: list[tuple[ServicePort, Node]] = []
        for index, entry in enumerate(entries):
            try:
                ports.append(
                    (
                        self.parse_port(entry, f"{path}[{index}]", len(entries) > 1),
                        entry,
                    )
                )
            except _Invalid:
                ports.append((ServicePort(port=0, target_port=0), entry))  # keeps indexes aligned
        names: set[str] = set()
        numbers: set[tuple[int, str]] = set()
        for index, (port, entry) in enumerate(ports):
            if port.port == 0:
                continue
            if port.name and port.name in names:
                message = f"duplicate port name {port.name!r}"
                self.report(_value_node(entry, "name"), f"{path}[{index}].name", message)
            if (port.port, port.protocol) in numbers:
                message = f"duplicate port {port.port}/{port.protocol}"
                self.report(_value_node(entry, "port"), f"{path}[{index}].port", message)
            names.add(port.name)
            numbers.add((port.port, port.protocol))
        if len(self.problems) > problems_before:
            raise _Invalid()
        return ports

    def parse_port(self, node: Node, path: str, name_required: bool) -> ServicePort:
        problems_before = len(self.problems)
        fields = self.fields(node, path, _PORT_FIELDS)
        name = self.field(fields, "name", path, self.port_name, "")
        if name_required and self.optional(fields, "name") is None:
            self.report(
                fields.get("name", node),
                _join(path, "name"),
                "required when a service has more than one port",
            )
        port = 0
        with contextlib.suppress(_Invalid):
            port = self.required(fields, "port", path, node, self.port_number)
        target_port = self.field(fields, "targetPort", path, self.target_port, port)
        protocol = self.field(fields, "protocol", path, self.one_of(PROTOCOLS), "TCP")
        node_port = self.field(fields, "nodePort", path, self.port_number, None)
        if len(self.problems) > problems_before:
            raise _Invalid()
        return ServicePort(
            port=port,
            target_port=target_port,
            protocol=protocol,
            name=name,
            node_port=node_port,
        )

    # -- endpoints

    def parse_endpoints(self, node: Node, path: str) -> tuple[EndpointSpec, ...]:
        """The valid endpoints; an invalid one is reported and left out, not fatal."""
        endpoints: list[EndpointSpec] = []
        for index, entry in enumerate(self.items(node, path)):
            entry_path = f"{path}[{index}]"
            try:
                endpoint = self.parse_endpoint(entry, entry_path)
            except _Invalid:
                continue
            if any(other.ip == endpoint.ip for other in endpoints):
                message = f"duplicate endpoint {endpoint.ip}"
                self.report(_value_node(entry, "ip"), f"{entry_path}.ip", message)
                continue
            endpoints.append(endpoint)
        return tuple(endpoints)

    def parse_endpoint(self, node: Node, path: str) -> EndpointSpec:
        problems_before = len(self.problems)
        fields = self.fields(node, path, _ENDPOINT_FIELDS)
        ip = ""
        with contextlib.suppress(_Invalid):
            ip = self.required(fields, "ip", path, node, self.ip)
        ready = self.field(fields, "ready", path, self.boolean, True)
        # Kubernetes: serving defaults to ready, terminating to false.
        serving = self.field(fields, "serving", path, self.boolean, ready)
        terminating = self.field(fields, "terminating", path, self.boolean, False)
        node_name = self.field(fields, "nodeName", path, self.string, None)
        zone = self.field(fields, "zone", path, self.string, None)
        weight = self.field(fields, "weight", path, self.weight, 1)
        if len(self.problems) > problems_before:
            raise _Invalid()
        return EndpointSpec(
            ip=ip,
            ready=ready,
            serving=serving,
            terminating=terminating,
            node_name=node_name,
            zone=zone,
            weight=weight,
        )


def _value_node(mapping: Node, key: str) -> Node:
    """The value of `key` in a mapping node that parsed cleanly (the mapping otherwise)."""
    if isinstance(mapping, MappingNode):
        for key_node, value_node in mapping.value:
            if isinstance(key_node, ScalarNode) and key_node.value == key:
                value: Node = value_node
                return value
    return mapping


def _has_key(node: Node, key: str) -> bool:
    return isinstance(node, MappingNode) and any(
        isinstance(key_node, ScalarNode) and key_node.value == key for key_node, _ in node.value
    )


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _frontend_text(frontend: tuple[str, int, str]) -> str:
    address, port, protocol = frontend
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}/{protocol}"
