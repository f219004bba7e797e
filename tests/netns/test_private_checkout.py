"""mailerd installed where its children cannot read it: a virtualenv under a mode-0700
directory, as a checkout in root's home is.

The children drop to `mail`, which cannot enter that directory, so any module they import after
the drop fails (dnspython imports its asyncio backend on the first lookup, `email` and the IDNA
codec load parts on first use…). The master imports everything first (`mailerd/preload.py`);
these tests run every child path from such an installation: local delivery, a message with a
local and a remote recipient, outbound delivery after an MX lookup (the namespace's DNS
server), a bounce, a large message (its body crosses as a descriptor), `mailerd queue`, and a
reload. Any traceback or late import in the log fails the test (`finish`).

Also: when the children cannot read a file they must open by name (here the resolver's
configuration), mailerd refuses to start with one line that names it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    REPO,
    Internet,
    Mailerd,
    finish,
    finish_or_fail,
    make_message,
    token,
    wait_until,
)

CHILD_USER = "mail"


def _dependencies(name: str) -> list[importlib.metadata.Distribution]:
    """The installed distributions `name` needs (not its extras), recursively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            wanted = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]
            key = wanted.lower().replace("_", "-")
            if key not in found:
                try:
                    found[key] = importlib.metadata.distribution(wanted)
                except importlib.metadata.PackageNotFoundError:
                    continue  # an optional dependency that is not installed
                todo.append(wanted)
    return list(found.values())


def make_private_install(root: Path) -> Path:
    """A virtualenv in `root` (made mode 0700) holding mailerd and copies of its dependencies;
    its python."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    for dist in _dependencies("mailerd"):
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            if source.is_file() and "__pycache__" not in file.parts:
                target = site / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    shutil.copytree(
        REPO / "mailerd", site / "mailerd", ignore=shutil.ignore_patterns("__pycache__")
    )
    return venv / "bin" / "python"


def _readable_by(user: str, path: Path) -> bool:
    probe = subprocess.run(["runuser", "-u", user, "--", "test", "-r", str(path)], check=False)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def private_python(tmp_path_factory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root: the children drop to another user")
    python = make_private_install(tmp_path_factory.mktemp("private") / "home")
    package = python.parents[1]
    assert not _readable_by(CHILD_USER, package), f"{CHILD_USER} can read {package}: no test"
    return python


@pytest.fixture
def private_mailerd(internet: Internet, private_python: Path) -> Iterator[Mailerd]:
    home = private_python.parents[2]
    base = home / "run"  # the spool and queue under the private directory too
    base.mkdir()
    m = Mailerd(
        internet.netns, base, port=2600, untrusted="none", python=str(private_python), cwd=home
    )
    m.start()
    yield m
    finish_or_fail(m)


def test_every_child_path_works_from_a_private_install(
    private_mailerd: Mailerd, internet: Internet
) -> None:
    m = private_mailerd
    user = token("pu")
    local = m.add_user(user)
    remote = f"{token('r')}@pref.test"
    refused = f"bad{token('x')}@pref.test"  # mx1 answers 550: a bounce back to `local`

    # Local delivery (the worker straight to the mailbox writer).
    m.submit(local, [local], subject="local only")
    assert wait_until(lambda: len(m.mailbox(user)) == 1, 10), m.log_tail()

    # Local and remote at once (the delivery process: queue, MX lookup, relay), and a bounce.
    m.submit(local, [local, remote, refused], subject="mixed")
    m.wait_delivery(remote, "sent")
    m.wait_delivery(refused, "bounced")
    assert internet.receivers["mx1"].delivered(remote)
    assert wait_until(lambda: len(m.mailbox(user)) == 3, 15), m.log_tail()
    assert any(b"multipart/report" in raw for raw in m.mailbox(user)), "no bounce delivered"

    # A large body travels between the processes as a descriptor.
    big = make_message(local, [local, remote], "big", "\r\n".join(["y" * 76] * 6000))
    m.submit(local, [local, remote], body=big)
    assert wait_until(lambda: len(m.mailbox(user)) == 4, 15), m.log_tail()

    # `mailerd queue` from the same installation: through the delivery process, then offline.
    listing = m.queue_cli()
    assert listing.returncode == 0, listing.stderr
    assert "Mail queue is empty" in listing.stdout or "Queue ID" in listing.stdout, listing.stdout

    # A reload starts new children from the same (unreadable) installation.
    assert m.proc is not None
    m.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "configuration reloaded" in m.log_text(), 15), m.log_tail()
    again = f"{token('r')}@pref.test"
    m.submit(local, [local, again], subject="after the reload")
    m.wait_delivery(again, "sent")
    assert wait_until(lambda: len(m.mailbox(user)) == 5, 15), m.log_tail()


def test_refuses_to_start_when_the_children_cannot_read_the_resolver_config(
    internet: Internet, private_python: Path, tmp_path: Path
) -> None:
    """The namespace's resolv.conf (bind-mounted by `ip netns exec`) made unreadable for
    `mail`: without --dns-server, mailerd says so in one line and exits 1, before forking."""
    resolv = internet.netns.etc_dir / "resolv.conf"
    mode = resolv.stat().st_mode
    os.chmod(resolv, 0o600)
    try:
        home = private_python.parents[2]
        base = home / "refused"
        base.mkdir()
        m = Mailerd(
            internet.netns, base, port=2601, untrusted="none", python=str(private_python), cwd=home
        )
        proc = internet.netns.run(m.argv(), timeout=30, cwd=home)
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "/etc/resolv.conf" in lines[0] and "--dns-server" in lines[0], lines[0]
        # …and with --dns-server it does not need the file at all.
        m.extra = ["--dns-server", "198.51.100.53"]
        m.start()
        assert finish(m) == []
    finally:
        os.chmod(resolv, mode)
