"""preload: what the master imports for its children, and the guard that reports the rest."""

from __future__ import annotations

import importlib
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


def test_guard_reports_a_module_the_child_cannot_read(guard, caplog, tmp_path, monkeypatch) -> None:
    """A module that was there when preload() looked, and that a child cannot find after its
    privilege drop (here: removed), is reported although the import fails: `email` catches
    the failure of its codec import, and the late import went unseen."""
    package = tmp_path / "mailerd_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "hidden.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mailerd_probe", raising=False)
    importlib.import_module("mailerd_probe")
    monkeypatch.setattr(preload, "_on_disk", preload._modules_on_disk())
    (package / "hidden.py").unlink()
    importlib.invalidate_caches()
    with caplog.at_level(logging.ERROR, logger="mailerd.preload"), pytest.raises(ImportError):
        importlib.import_module("mailerd_probe.hidden")
    lines = [r.getMessage() for r in caplog.records if "late import" in r.getMessage()]
    assert (
        "late import of mailerd_probe.hidden after dropping privileges"
        " (add it to mailerd/preload.py)" in lines
    )
    sys.modules.pop("mailerd_probe", None)


def test_modules_on_disk_knows_the_standard_library() -> None:
    importlib.import_module("email.mime")  # a loaded package: its submodules are listed
    names = preload._modules_on_disk()
    assert {"colorsys", "encodings.raw_unicode_escape", "_ssl", "email.mime.audio"} <= names
    assert "mailerd_no_such_module" not in names


def test_guard_ignores_what_is_not_installed(guard, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="mailerd.preload"), pytest.raises(ImportError):
        import mailerd_no_such_module  # noqa: F401
    assert not [r for r in caplog.records if "late import" in r.getMessage()]


def test_guard_is_installed_once(guard) -> None:
    preload.guard()
    assert sum(isinstance(f, preload._LateImports) for f in sys.meta_path) == 1
