"""What the package tests share: the package itself, built once for the session (test_deb.py
and test_systemd_unit.py install the same .deb)."""

from __future__ import annotations

import email.utils
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def version() -> str:
    text = (REPO / "mailerd" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert match, "no __version__ in mailerd/__init__.py"
    return match.group(1)


def private_clone(home: Path) -> Path:
    """The checkout's files (tracked, and new ones not ignored) copied below `home`, made mode
    0700 as root's home is: what `git clone` into /root gives, with this tree's changes."""
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    clone = home / "mailerd"
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


UPGRADE_SUFFIX = "+upgradetest1"  # the upgraded package's version: the same code, later


@pytest.fixture(scope="session")
def deb(tmp_path_factory) -> Path:
    """Built from a private clone: lintian runs as nobody, who cannot enter root's home."""
    clone = private_clone(tmp_path_factory.mktemp("private") / "home")
    return build_deb(clone, tmp_path_factory.mktemp("deb"), version())


@pytest.fixture(scope="session")
def upgrade_deb(tmp_path_factory) -> Path:
    """The same package at a later version (mailerd.__version__ and a debian/changelog entry
    of its own, UPGRADE_SUFFIX added): what an upgrade installs over `deb`."""
    clone = private_clone(tmp_path_factory.mktemp("private-upgrade") / "home")
    later = version() + UPGRADE_SUFFIX
    init = clone / "mailerd" / "__init__.py"
    text = init.read_text()
    init.write_text(re.sub(r'^__version__ = "[^"]+"', f'__version__ = "{later}"', text, flags=re.M))
    changelog = clone / "debian" / "changelog"
    text = changelog.read_text()
    # (signed as the last entry is: lintian takes another name for a non-maintainer upload)
    # and dated now (lintian: a later entry must have a later date)
    signer = next(line for line in text.splitlines() if line.startswith(" -- "))
    trailer = signer.split("  ")[0] + "  " + email.utils.formatdate()
    entry = (
        f"mailerd ({later}) unstable; urgency=medium\n\n"
        "  * The same code at a later version: tests/package's upgrade.\n\n"
        f"{trailer}\n\n"
    )
    changelog.write_text(entry + text)
    return build_deb(clone, tmp_path_factory.mktemp("deb-upgrade"), later)


def build_deb(clone: Path, out: Path, expected_version: str) -> Path:
    """scripts/build-deb of `clone` into `out`; the .deb's path."""
    # A TMPDIR of its own, that nobody, who runs lintian, may not enter (root's with
    # libpam-tmpdir: /tmp/user/0, 0700): the build goes elsewhere.
    temporary = Path(tempfile.mkdtemp(prefix="mailerd-test-tmpdir."))
    lintian_leftovers = set(Path("/tmp").glob("mldbm-*"))
    try:
        result = subprocess.run(
            [str(clone / "scripts" / "build-deb"), str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "TMPDIR": str(temporary)},
        )
        left = list(temporary.iterdir())
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/build-deb took more than 10 minutes")
    finally:
        shutil.rmtree(temporary)
    assert result.returncode == 0, f"scripts/build-deb failed:\n{result.stderr[-6000:]}"
    # It leaves nothing in the temporary directory, nor lintian's files in /tmp.
    assert not left, left
    new = set(Path("/tmp").glob("mldbm-*")) - lintian_leftovers
    assert not new, new
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.name == f"mailerd_{expected_version}_all.deb", path
    assert path.is_file(), path
    return path
