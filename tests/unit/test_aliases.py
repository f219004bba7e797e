"""aliases: reading /etc/aliases and expanding it in advance; policy.route with aliases."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailerd import aliases, policy
from mailerd.aliases import Aliases, Expansion
from mailerd.commands import newaliases
from mailerd.names import Locality
from mailerd.smtp.events import Address

LOCAL = ("example.org",)

DEBIAN_DEFAULT = """\
# /etc/aliases
mailer-daemon: postmaster
postmaster: root
nobody: root
hostmaster: root
usenet: root
news: root
webmaster: root
www: root
ftp: root
abuse: root
noc: root
security: root
root: alice
"""


def table(text: str) -> Aliases:
    entries, problems = aliases.parse(text)
    return aliases.build(entries, Locality(LOCAL), problems=problems)


def test_debian_default_file_resolves_through_root():
    t = table(DEBIAN_DEFAULT)
    for name in ("root", "postmaster", "MAILER-DAEMON", "abuse"):
        assert t.lookup(name) == Expansion(mailboxes=("alice",)), name
    assert t.problems == ()


def test_lists_continuations_quotes_and_comments():
    t = table(
        "team: alice, bob,\n"
        "      carol@example.org\n"
        '"Sales Team": "dave"\n'
        "# a comment\n"
        "\n"
        "ops:\talice,\n\tERIN@Remote.Example\n"
    )
    assert t.lookup("team") == Expansion(mailboxes=("alice", "bob", "carol"))
    assert t.lookup("sales team") == Expansion(mailboxes=("dave",))
    assert t.lookup("ops") == Expansion(mailboxes=("alice",), forwards=("ERIN@remote.example",))


def test_aliases_of_aliases_self_reference_and_tags():
    t = table("a: b\nb: c, b\nc: carol\nkeep: keep, keep@backup.example\n")
    assert t.lookup("a") == Expansion(mailboxes=("carol", "b"))
    assert t.lookup("keep") == Expansion(mailboxes=("keep",), forwards=("keep@backup.example",))
    assert t.lookup("a+tag") == t.lookup("a")  # the +tag is dropped when the whole is unknown
    assert t.lookup("A") == t.lookup("a")


def test_loops_are_found_and_refused():
    t = table("a: b\nb: c\nc: a\nd: a\nok: alice\n")
    for name in ("a", "b", "c", "d"):
        assert t.lookup(name).loop and not t.lookup(name).deliverable, name
    assert t.lookup("ok").deliverable
    assert any("a: alias loop" in p for p in t.problems)
    route = policy.route(
        Address("a", "example.org", False), trusted=False, locality=Locality(LOCAL), aliases=t
    )
    assert isinstance(route, policy.Refused) and route.reply.code == 550
    assert route.reply.status == "5.4.6" and "loop" in route.why


@pytest.mark.parametrize(
    "target", ["|/usr/bin/evil", '"|/usr/bin/evil arg"', "/tmp/file", ":include:/etc/list"]
)
def test_programs_files_and_includes_are_refused(target):
    t = table(f"x: {target}\ny: alice, {target}\n")
    assert not t.lookup("x").deliverable
    assert t.lookup("y") == Expansion(
        mailboxes=("alice",), refused=((target, aliases.refusal(target)),)
    )
    assert sum(target in p for p in t.problems) == 2
    route = policy.route(
        Address("x", "example.org", False), trusted=True, locality=Locality(LOCAL), aliases=t
    )
    assert isinstance(route, policy.Refused) and route.reply.status == "5.1.1"


def test_a_local_domain_target_is_looked_up_again_and_a_remote_one_forwarded():
    t = table("a: root@example.org, sub@mail.example.org, x@other.example\nroot: alice\n")
    assert t.lookup("a") == Expansion(mailboxes=("alice", "sub"), forwards=("x@other.example",))


def test_broken_lines_are_problems_not_errors():
    t = table("no colon here\nempty:\nok: alice\nok: bob\n")
    assert t.lookup("ok") == Expansion(mailboxes=("alice",))
    assert len(t.problems) == 3


def test_load_missing_file_is_empty_and_unreadable_is_an_error(tmp_path: Path):
    assert len(Aliases.load(str(tmp_path / "none"), Locality(LOCAL))) == 0
    with pytest.raises(aliases.AliasError):
        Aliases.load(str(tmp_path), Locality(LOCAL))  # a directory
    path = tmp_path / "aliases"
    path.write_text(DEBIAN_DEFAULT)
    assert Aliases.load(str(path), Locality(LOCAL)).lookup("root") == Expansion(
        mailboxes=("alice",)
    )


def test_route_applies_aliases_to_every_local_domain_and_postmaster():
    t = table("postmaster: root\nroot: alice\nlist: alice, bob@far.example\n")
    for address in (Address("postmaster", "", False), Address("Root", "sub.example.org", False)):
        assert policy.route(address, trusted=False, locality=Locality(LOCAL), aliases=t) == (
            policy.Alias(address.local.lower(), ("alice",), ())
        )
    route = policy.route(
        Address("list", "example.org", False), trusted=False, locality=Locality(LOCAL), aliases=t
    )
    assert route == policy.Alias("list", ("alice",), ("bob@far.example",))
    # the relay rules still come first
    route = policy.route(
        Address("list", "far.example", False), trusted=False, locality=Locality(LOCAL), aliases=t
    )
    assert route == policy.Refused(policy.RELAY_DENIED)


def test_newaliases_reads_the_default_config(tmp_path: Path, monkeypatch, capsys):
    """Without -C: the daemon's config file (as installed), its aliases file and pid file."""
    from mailerd import config

    path = tmp_path / "aliases"
    path.write_text("root: alice\nbad: |/bin/true\n")
    conf = tmp_path / "mailerd.conf"
    conf.write_text(
        f"[mailerd]\naliases = {path}\npidfile = {tmp_path / 'none.pid'}\ndomain = example.org\n"
    )
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(conf))
    assert newaliases.main([]) == 0
    err = capsys.readouterr().err
    assert f"{path}: 2 aliases, 1 problem(s)" in err
    assert f"no mailerd runs with the pid file {tmp_path / 'none.pid'}" in err  # (the config's)
    conf.write_text("[mailerd]\nno-such-key = 1\n")
    assert newaliases.main([]) == 78  # EX_CONFIG


def test_newaliases_reads_localhost_as_local_as_the_daemon_does(tmp_path: Path, capsys):
    """localhost is always a local domain of the daemon's, beside the configured ones, so
    `newaliases` reads the file with it too: a loop through @localhost, which the daemon
    refuses mail for, passed its check as "0 problem(s)" (an audit of the docs against the
    code found it)."""
    from mailerd import config

    path = tmp_path / "aliases"
    path.write_text("a: b@localhost\nb: a@localhost\n")
    conf = tmp_path / "mailerd.conf"
    conf.write_text(
        f"[mailerd]\naliases = {path}\npidfile = {tmp_path / 'none.pid'}\ndomain = example.org\n"
    )
    assert newaliases.main(["-C", str(conf)]) == 0
    err = capsys.readouterr().err
    daemons = config.load(["-c", str(conf), "-n", "none", "--dns-server", "127.0.0.1:9"])
    assert "localhost" in daemons.domains
    assert len(Aliases.load(str(path), Locality(daemons.domains)).problems) == 2  # (both loop)
    assert f"{path}: 2 aliases, 2 problem(s)" in err, err


def test_a_missing_file_is_no_aliases_and_is_said(tmp_path, caplog):
    """As Postfix, a missing aliases file is no aliases, not an error; but a mistyped
    --aliases must show in the log (it started without a word: found by a tester)."""
    import logging

    table = Aliases.load(str(tmp_path / "typo-aliases"), Locality(("example.org",)))
    assert len(table) == 0 and table.missing
    with caplog.at_level(logging.INFO):
        aliases.report(table)
    assert f"aliases {tmp_path / 'typo-aliases'}: no such file; no aliases" in caplog.text


def test_overlapping_nested_lists_are_expanded_once_each():
    """Two names a level, each listing both of the next level's: expanded afresh along every
    path that is 2**depth expansions (a 500-byte file held the master 11 s at depth 19, an
    attacker's pass found); each name is expanded once."""
    depth = 19
    lines = [f"m{i}: m{i + 1}, n{i + 1}\nn{i}: m{i + 1}, n{i + 1}\n" for i in range(depth)]
    text = "".join(lines) + f"m{depth}: alice\nn{depth}: bob, far@remote.example\n"
    started = time.process_time()
    t = table(text)
    assert time.process_time() - started < 1.0
    want = Expansion(mailboxes=("alice", "bob"), forwards=("far@remote.example",))
    assert t.lookup("m0") == want and t.lookup("n5") == want
    assert t.problems == ()


def test_an_expansion_past_max_targets_is_refused_as_a_loop():
    many = ", ".join(f"u{i}@remote.example" for i in range(aliases.MAX_TARGETS + 1))
    t = table(f"big: {many}\nvia: big\nok: alice\n")
    assert t.lookup("big").loop and t.lookup("via").loop
    assert t.lookup("ok").deliverable
    assert any(f"big: more than {aliases.MAX_TARGETS} targets" in p for p in t.problems)
