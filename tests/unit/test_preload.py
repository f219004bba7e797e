"""preload: what the master imports for its children, and the guard that reports the rest."""

from __future__ import annotations

import logging
import sys

import pytest

from mailerd import preload


def test_preload_imports_the_lazy_parts() -> None:
    preload.preload()
    for name in (
        "dns._asyncio_backend",  # dnspython, on the first lookup
        "dns.rdtypes.ANY.MX",  # dnspython, on the first MX answer
        "dns.rdtypes.ANY.SOA",
        "encodings.idna",  # the IDNA codec, on the first non-ASCII domain
        "email.headerregistry",
        "ssl",
        "mailerd.delivery.process",
        "mailerd.delivery.dsn",
    ):
        assert name in sys.modules, name
    assert "mailerd.__main__" not in sys.modules  # importing it would run mailerd


@pytest.fixture
def guard():
    before = list(sys.meta_path)
    preload.guard()
    yield
    sys.meta_path[:] = before


def test_guard_reports_a_late_import_once(guard, caplog) -> None:
    sys.modules.pop("colorsys", None)
    with caplog.at_level(logging.ERROR, logger="mailerd.preload"):
        import colorsys  # noqa: F401

        sys.modules.pop("colorsys")
        import colorsys  # noqa: F401,F811
    lines = [r.getMessage() for r in caplog.records if "late import" in r.getMessage()]
    assert lines == [
        "late import of colorsys after dropping privileges (add it to mailerd/preload.py)"
    ]


def test_guard_ignores_what_is_not_installed(guard, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="mailerd.preload"), pytest.raises(ImportError):
        import mailerd_no_such_module  # noqa: F401
    assert not [r for r in caplog.records if "late import" in r.getMessage()]


def test_guard_is_installed_once(guard) -> None:
    preload.guard()
    assert sum(isinstance(f, preload._LateImports) for f in sys.meta_path) == 1
