"""Everything a child process may import, imported by the master before it forks anything.

Children drop to the `-u` user (`mail`), which may not be able to read the code at all: a
checkout or a virtualenv under root's home (mode 0700), or a pyenv interpreter there. An import
after the drop then fails with ModuleNotFoundError at the worst moment — after a 250, in the
middle of a delivery — so every module a child can need is imported here first, including the
parts that libraries import lazily on first use (dnspython's asyncio backend and record classes,
the IDNA codec, `email`'s header machinery, `ssl`). Forked children share these pages
copy-on-write as well.

`guard()` runs in each child right after its privilege drop: any import that still happens
later is logged (once per module) as a "late import", which the test suite treats as a failure,
so a lazy import that this list misses is found by the tests, not by a user. That includes a
module the child can no longer read: `preload()` notes, as the master sees them, the names of
the standard library's modules and of every loaded package's submodules.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

log = logging.getLogger("mailerd.preload")

# Standard-library modules the children use, or that the libraries below import on first use.
STDLIB = (
    "asyncio",
    "asyncio.sslproto",
    "asyncio.staggered",
    "asyncio.trsock",
    "asyncio.unix_events",
    "base64",
    "concurrent.futures",
    "concurrent.futures.thread",
    "ctypes",
    "email",
    "email._encoded_words",
    "email._header_value_parser",
    "email._parseaddr",
    "email._policybase",
    "email.base64mime",
    "email.charset",
    "email.contentmanager",
    "email.encoders",
    "email.errors",
    "email.feedparser",
    "email.generator",
    "email.header",
    "email.headerregistry",
    "email.iterators",
    "email.message",
    "email.mime.base",
    "email.mime.multipart",
    "email.mime.nonmultipart",
    "email.mime.text",
    "email.parser",
    "email.policy",
    "email.quoprimime",
    "email.utils",
    "encodings.ascii",
    "encodings.idna",
    "encodings.latin_1",
    "encodings.punycode",
    "encodings.raw_unicode_escape",  # (email.header.decode_header, for every encoded-word)
    "encodings.utf_8",
    "hashlib",
    "hmac",
    "json",
    "json.decoder",
    "json.encoder",
    "json.scanner",
    "logging.handlers",
    "quopri",
    "random",
    "secrets",
    "smtplib",
    "ssl",
    "stringprep",
    "textwrap",
    "unicodedata",
)

# Third-party packages (with the submodules they load lazily); missing optional ones are skipped.
LIBRARIES = (
    "argon2",
    "argon2.exceptions",
    "argon2.low_level",
    "authres",
    "authres.dmarc",
    "cryptography.hazmat.primitives.asymmetric.ed25519",
    "cryptography.hazmat.primitives.asymmetric.padding",
    "cryptography.hazmat.primitives.asymmetric.rsa",
    "cryptography.hazmat.primitives.serialization",
    "daemon",
    "dkim",
    "dkim.canonicalization",
    "dkim.crypto",
    "dkim.util",
    "dns.asyncbackend",
    "dns._asyncio_backend",
    "dns.asyncquery",
    "dns.asyncresolver",
    "dns.edns",
    "dns.exception",
    "dns.flags",
    "dns.inet",
    "dns.message",
    "dns.name",
    "dns.rcode",
    "dns.rdata",
    "dns.rdataclass",
    "dns.rdatatype",
    "dns.resolver",
    "dns.reversename",
    "idna",
    "idna.uts46data",  # (imported at the first mapping)
    "psutil",
    "publicsuffix2",
    "setproctitle",
    "spf",
)
# Missing optional ones are skipped: dnspython asks for sniffio on every lookup; dkimpy verifies
# and signs Ed25519 with PyNaCl.
OPTIONAL = ("sniffio", "uvloop", "nacl.encoding", "nacl.signing")

# Imported by the master itself or only by commands that never fork a child.
NOT_FOR_CHILDREN = ("mailerd.__main__",)

_done = False
# The modules that exist as the master sees them (see _modules_on_disk); empty until preload().
_on_disk: frozenset[str] = frozenset()


def preload() -> None:
    """Import every module a child may need (idempotent; call before forking)."""
    global _done
    if _done:
        return
    for name in (*STDLIB, *LIBRARIES):
        importlib.import_module(name)
    for name in OPTIONAL:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    _load_dns_types()
    _load_codecs()
    _import_package("mailerd")
    _warm()
    global _on_disk
    _on_disk = _modules_on_disk()
    _done = True


def _warm() -> None:
    """Data that modules read on first use, read now, once, for every child: the Public Suffix
    List (DMARC's organisational domains). (The CA certificates of outbound STARTTLS are read
    by the master with the configuration's --outbound-ca: `relay.load_trust`.)"""
    from mailerd.inbound import dmarc

    dmarc.organizational_domain("example.org")


def _load_dns_types() -> None:
    """Every DNS record class: dnspython imports one the first time a record of its type is
    parsed (an MX answer, a TXT record, the SOA of a negative answer…)."""
    import dns.rdata

    load_all = getattr(dns.rdata, "load_all_types", None)
    if load_all is not None:
        load_all()
        return
    import dns.rdtypes  # dnspython < 2.2 has no load_all_types()

    _import_package(dns.rdtypes.__name__)


def _load_codecs() -> None:
    """Every codec Python has (about 120, 45 ms, 5 MB shared): a sender names the charset of
    an encoded-word, and a From: a child cannot decode is a From: whose domain DMARC does not
    judge (third attacker's pass: UTF-16 and UTF-7 ones passed enforce). A few are for other
    systems only (mbcs)."""
    import encodings

    for info in pkgutil.iter_modules(encodings.__path__):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"encodings.{info.name}")


def _modules_on_disk() -> frozenset[str]:
    """The names of the standard library's modules and of every loaded package's submodules,
    read while the code is still readable (about 10 ms). After the drop a child may not be able
    to find them: its import of one fails, and a caller that expects failure (`email` asking
    for a codec) hides it, so the guard needs to know that the module is there (a second
    attacker's pass: encoded-words were not decoded, and no late import was reported)."""
    names = set(sys.builtin_module_names)
    stdlib = os.path.dirname(os.__file__)
    names.update(info.name for info in pkgutil.iter_modules([stdlib, f"{stdlib}/lib-dynload"]))
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__path__", None)
        if path is not None:
            names.update(info.name for info in pkgutil.iter_modules(path, prefix=f"{name}."))
    return frozenset(names)


def _import_package(name: str) -> None:
    package = importlib.import_module(name)
    for info in pkgutil.walk_packages(package.__path__, prefix=name + "."):
        if info.name not in NOT_FOR_CHILDREN:
            importlib.import_module(info.name)


class _LateImports(importlib.abc.MetaPathFinder):
    """Sees every import that is not already loaded; never finds anything itself.

    A module that the other finders cannot find either is reported only if it was there
    before the drop (`_on_disk`): libraries probe for optional ones (dnspython for sniffio)
    whether or not they are installed."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> None:
        if fullname not in self.seen:
            self.seen.add(fullname)
            if fullname in _on_disk or self._findable(fullname, path, target):
                log.error(
                    "late import of %s after dropping privileges (add it to mailerd/preload.py)",
                    fullname,
                )
        return None

    def _findable(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> bool:
        return any(
            hasattr(finder, "find_spec") and finder.find_spec(fullname, path, target) is not None
            for finder in sys.meta_path
            if finder is not self
        )


def guard() -> None:
    """In a child that has just dropped privileges: report every import from now on."""
    if not any(isinstance(finder, _LateImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _LateImports())
