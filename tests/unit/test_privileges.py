"""privileges: the probe that tells whether the children's user can read a file."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mailerd import privileges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the probe becomes `mail`")


def test_unreadable_tries_as_the_user() -> None:
    """A 0600 file of root's is unreadable for `mail`, a 0644 one is readable, a missing one
    is reported with its reason."""
    here = Path(tempfile.mkdtemp(prefix="mailerd-probe-"))
    try:
        here.chmod(0o755)
        shut, open_, missing = here / "shut", here / "open", here / "missing"
        for path, mode in ((shut, 0o600), (open_, 0o644)):
            path.write_text("x")
            path.chmod(mode)
        found = dict(privileges.unreadable("mail", [shut, open_, missing]))
    finally:
        shutil.rmtree(here)
    assert set(found) == {shut, missing}
    assert "denied" in found[shut].lower()
    assert "no such file" in found[missing].lower()


def test_nothing_to_check_without_a_user() -> None:
    assert privileges.unreadable(None, [Path("/nonexistent")]) == []
