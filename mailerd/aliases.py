"""/etc/aliases: local names that deliver to other mailboxes or addresses, resolved in advance.

The file is Debian's (sendmail's) format, read by the master as root at start-up and on every
reload (SIGHUP; `newaliases` sends one):

    # comment
    postmaster:    root
    root:          alice
    team:          alice, bob,
                   carol@example.net          (a line that starts with a space continues)
    "quoted name": alice

A name applies to every local domain and is matched without regard to case, first as given and
then without its `+tag` (`team+x` finds `team`). A target is a local name (itself looked up
again: aliases of aliases), an address in a local domain or at an address literal of this
machine's (`root: admin@[127.0.0.1]`; the same), or a remote address (the
message is forwarded there). A name that lists itself (`alice: alice, alice@backup.example`)
delivers to its own mailbox, as sendmail does. Any other cycle is a loop: mail for every name in
it is refused (550 5.4.6) and the loop is logged when the file is read.

Targets that are programs (`|command`), files (`/path`) or includes (`:include:`) are refused
and logged, never run or written: mailerd runs no program and writes no file on behalf of mail.
A name whose every target is refused is unknown (550 5.1.1).

Everything is expanded once, when the file is read (`Aliases.load`), so that the RCPT check is
one dictionary lookup (`policy.route`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mailerd.names import Locality, mailbox_name

log = logging.getLogger("mailerd.aliases")

MAX_DEPTH = 20  # aliases of aliases of ...
MAX_TARGETS = 1000  # what one name may expand to


class AliasError(Exception):
    """The aliases file cannot be read at all; the message says why."""


@dataclass(frozen=True)
class Expansion:
    """Where mail for one alias goes."""

    mailboxes: tuple[str, ...] = ()  # local mailbox names
    forwards: tuple[str, ...] = ()  # remote addresses
    refused: tuple[tuple[str, str], ...] = ()  # (target, why) never used
    loop: bool = False  # the name is part of a cycle: nothing is delivered

    @property
    def deliverable(self) -> bool:
        return not self.loop and bool(self.mailboxes or self.forwards)


@dataclass(frozen=True)
class Aliases:
    """The expanded table: name → Expansion. Empty when there is no file."""

    table: Mapping[str, Expansion] = field(default_factory=dict)
    path: str | None = None
    problems: tuple[str, ...] = ()  # what was refused or broken, one line each
    missing: bool = False  # the file is not there (a mistyped --aliases, say)

    def lookup(self, local_part: str) -> Expansion | None:
        found = self.find(local_part)
        return None if found is None else found[1]

    def find(self, local_part: str) -> tuple[str, Expansion] | None:
        """The alias a local part names, as (its name in the table, its expansion): the
        whole local part, or failing that the part before a `+tag`."""
        name = local_part.lower()
        found = self.table.get(name)
        if found is None and "+" in name:
            name = name.split("+", 1)[0]
            found = self.table.get(name)
        return None if found is None else (name, found)

    def __len__(self) -> int:
        return len(self.table)

    @classmethod
    def load(cls, path: str, locality: Locality) -> Aliases:
        """Read and expand `path`; a missing file is an empty table. Raises AliasError when the
        file exists but cannot be read. `locality`: see `build`."""
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except FileNotFoundError:
            return cls(path=path, missing=True)
        except OSError as exc:
            raise AliasError(f"cannot read {path}: {exc.strerror}") from exc
        entries, problems = parse(text)
        return build(entries, locality, path=path, problems=problems)


# -- reading the file -------------------------------------------------------------------------

_NAME = re.compile(r'\s*("(?:[^"\\]|\\.)*"|[^:\s]+)\s*:(.*)', re.S)


def parse(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """Entries (name → raw targets, in order) and the problems found, with line numbers."""
    entries: dict[str, list[str]] = {}
    problems: list[str] = []
    for number, logical in _logical_lines(text):
        match = _NAME.match(logical)
        if match is None:
            problems.append(f"line {number}: not 'name: target, ...'")
            continue
        name = match[1].strip('"').lower()
        targets = [t for t in _split_targets(match[2]) if t]
        if not targets:
            problems.append(f"line {number}: {name} has no target")
            continue
        if name in entries:
            problems.append(f"line {number}: {name} is defined again (the first one counts)")
            continue
        entries[name] = targets
    return entries, problems


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """Lines with their continuations joined (a line starting with blank continues the last);
    comments and blank lines dropped. Yields (first line's number, text)."""
    current: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" and current:
            current.append(line.strip())
            continue
        if current:
            yield start, " ".join(current)
        current, start = [line.strip()], number
    if current:
        yield start, " ".join(current)


def _split_targets(text: str) -> list[str]:
    """Comma-separated targets; commas inside double quotes do not split."""
    targets: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            targets.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    targets.append("".join(current).strip())
    return targets


# -- expanding --------------------------------------------------------------------------------


def refusal(target: str) -> str | None:
    """Why a target is never used, or None."""
    bare = target.strip('"').strip()
    if bare.startswith("|"):
        return "a program: mailerd never runs programs for mail"
    if bare.startswith("/"):
        return "a file: mailerd never writes files for mail"
    if bare.lower().startswith(":include:"):
        return "an :include: list: not supported"
    if not bare or any(c.isspace() or ord(c) < 32 for c in bare):
        return "not an address"
    return None


@dataclass
class _Expanded:
    """One name's expansion while the table is built: each name is expanded once (names
    reached by many paths reuse it), targets kept in order without duplicates."""

    mailboxes: dict[str, None] = field(default_factory=dict)
    forwards: dict[str, None] = field(default_factory=dict)
    refused: dict[tuple[str, str], None] = field(default_factory=dict)
    loop: bool = False
    too_many: bool = False

    def add(self, other: _Expanded) -> None:
        self.mailboxes.update(other.mailboxes)
        self.forwards.update(other.forwards)
        self.refused.update(other.refused)
        self.loop = self.loop or other.loop
        self.too_many = self.too_many or other.too_many

    def full(self) -> bool:
        return len(self.mailboxes) + len(self.forwards) > MAX_TARGETS


def build(
    entries: Mapping[str, list[str]],
    locality: Locality,
    *,
    path: str | None = None,
    problems: Iterable[str] = (),
) -> Aliases:
    """Expand every entry in advance; loops and refused targets become logged problems. A
    target is local as `locality` says, as it is everywhere else: one at an address literal
    of this machine's (`root: admin@[127.0.0.1]`) too, not a forward that loops back.

    Each name is expanded once and its expansion reused wherever it is a target: expanded
    afresh along every path, overlapping nested lists cost twice as much per level (an
    attacker's pass, /tmp/atk7b F4: a 500-byte file held the master for 11 s at start-up,
    and each level more doubled it). A name met again while it is being expanded closes a
    cycle: every name on it is a loop, and so is every name whose expansion reaches one. A
    chain deeper than MAX_DEPTH counts as a loop too, and an expansion is cut short once it
    has more than MAX_TARGETS targets."""
    found = list(problems)
    done: dict[str, _Expanded] = {}
    expanding: set[str] = set()  # the names on the current path

    def expand(name: str, depth: int) -> _Expanded:
        known = done.get(name)
        if known is not None:
            return known
        expanding.add(name)
        result = _Expanded()
        for target in entries[name]:
            _expand_target(name, target, depth, result)
            if result.full():
                result.too_many = True
                break
        expanding.discard(name)
        done[name] = result
        return result

    def _expand_target(name: str, target: str, depth: int, result: _Expanded) -> None:
        why = refusal(target)
        if why is not None:
            result.refused[(target, why)] = None
            return
        bare = target.strip('"').strip()
        local, at, domain = bare.rpartition("@")
        if at and not locality.is_local(domain):
            result.forwards[normal_address(bare)] = None
            return
        key = (local if at else bare).lower()
        if key == name or key not in entries:  # itself (its own mailbox), or a mailbox
            box = mailbox_name(key)
            if box is None:
                result.refused[(target, "not a mailbox name")] = None
            else:
                result.mailboxes[box] = None
        elif key in expanding or depth >= MAX_DEPTH:
            result.loop = True
        else:
            result.add(expand(key, depth + 1))

    table: dict[str, Expansion] = {}
    for name in entries:
        result = expand(name, 1)
        loop = result.loop
        if result.too_many:
            found.append(f"{name}: more than {MAX_TARGETS} targets; treated as a loop")
            loop = True
        table[name] = Expansion(
            tuple(result.mailboxes), tuple(result.forwards), tuple(result.refused), loop
        )
        if loop:
            found.append(f"{name}: alias loop; mail for it is refused")
        for target, why in result.refused:
            found.append(f"{name}: target {target} refused ({why})")
    return Aliases(table, path, tuple(dict.fromkeys(found)))


def normal_address(address: str) -> str:
    """The form two addresses are compared in: the domain's case does not count, the local
    part's may (RFC 5321 2.4)."""
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


def report(aliases: Aliases) -> None:
    """Log what the file held and every problem, once (at start-up and at each reload)."""
    for problem in aliases.problems:
        log.warning("aliases %s: %s", aliases.path, problem)
    if aliases.missing:  # (not an error, as for Postfix; but a mistyped path must show)
        log.info("aliases %s: no such file; no aliases", aliases.path)
    elif aliases.table or aliases.problems:
        log.info("aliases %s: %d name(s)", aliases.path, len(aliases))
