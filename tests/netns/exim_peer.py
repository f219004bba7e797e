"""A real Exim (Debian's exim4-daemon-light: GnuTLS, and its own DKIM signer and verifier) as a
peer in the test's network namespace: a private instance, never installed.

The binary is the package's, unpacked by scripts/setup into ``.venv/exim`` (``EXIM``); it runs
only with this module's configuration (``-C``), its spool, log and pid file in a directory of
its own (``EximPeer.base``), and with ``ip netns exec``: it reaches only the namespace's
addresses, and resolves names with the namespace's resolv.conf (the test DNS).

Exim looks its user up by the name compiled into Debian's build, ``Debian-exim``, before it
reads any configuration, and gives up root for that user (the configuration named with ``-C``
is no trusted one). The machine need not have that user: every Exim process runs in a mount
namespace of its own (``unshare -m``) where copies of /etc/passwd and /etc/group that add it
(``EXIM_UID``, a free id) are bind-mounted over the real ones; the machine's files are never
written. Whatever Exim reads after giving up root (the spool, its TLS key, DKIM keys) is under
``base``, owned by that id: a directory of its own under /tmp, since pytest's tmp directories
are root's, mode 0700, and so closed to it. So is the binary that runs (``binary``): Exim
executes itself again, as that user, to deliver (``-Mc``), and a checkout in root's home (mode
0700) is closed to it; the unpacked one is copied into ``base``.

``EximPeer(netns, name)``:
- ``write(conf_text)`` → the configuration's path (``{BASE}``, ``{EXIM}``, ``{UID}`` in the
  text are filled in);
- ``start_daemon(conf)``: ``exim -C conf -bdf`` (a receiving server), waits for its log's
  "daemon started" line;
- ``send(conf, sender, rcpts, message, macros)``: ``exim -C conf -odi`` reads the message on
  stdin and delivers it before it returns (``-D`` macros pick key, canonicalization, ...);
- ``mainlog()``, ``lines(pattern)``, ``problems()`` (panic log lines that are not the ones
  every -C run writes), ``stop()``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import wait_until

REPO = Path(__file__).resolve().parents[2]
EXIM_DIR = REPO / ".venv" / "exim"
EXIM = EXIM_DIR / "usr" / "sbin" / "exim4"
EXIM_USER = "Debian-exim"  # compiled into Debian's exim4 (EXIM_USER=ref:Debian-exim)
START_TIMEOUT = 20.0

# Lines every run with -C writes to the panic log, and nothing to fail a test for.
_HARMLESS_PANIC = re.compile(r"exim user lost privilege for using -C option")


def require_exim() -> None:
    """Skip without root; fail (the suite's setup is meant to provide it) without the binary."""
    if os.geteuid() != 0:
        pytest.skip("a private Exim instance needs root (network namespace, mount namespace)")
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} (util-linux) is missing", pytrace=False)
    if not EXIM.exists():
        pytest.fail(
            f"{EXIM} is missing: scripts/setup downloads Debian's exim4-daemon-light and "
            "unpacks it there (apt-get download exim4-daemon-light; dpkg-deb -x …)",
            pytrace=False,
        )


def _free_id() -> int:
    used = {p.pw_uid for p in pwd.getpwall()} | {p.pw_gid for p in pwd.getpwall()}
    return next(i for i in range(64100, 65000) if i not in used)


EXIM_UID = _free_id()


class EximPeer:
    """One private Exim instance (see the module's docstring)."""

    def __init__(self, ns, name: str) -> None:
        self.ns = ns
        self.name = name
        self.base = Path(tempfile.mkdtemp(prefix=f"mailerd-test-exim-{name}-"))
        os.chmod(self.base, 0o755)
        for sub in ("spool", "log", "mail"):
            (self.base / sub).mkdir()
        (self.base / "passwd").write_text(
            Path("/etc/passwd").read_text()
            + f"{EXIM_USER}:x:{EXIM_UID}:{EXIM_UID}:Exim test peer:/nonexistent:/bin/false\n"
        )
        (self.base / "group").write_text(
            Path("/etc/group").read_text() + f"{EXIM_USER}:x:{EXIM_UID}:\n"
        )
        self.binary = self.base / "exim4"
        shutil.copyfile(EXIM, self.binary)
        os.chmod(self.binary, 0o755)
        self.own(self.base)
        self.daemon: subprocess.Popen | None = None

    # -- files ------------------------------------------------------------------------------
    def own(self, path: Path) -> Path:
        """Give path (a directory: everything in it) to Exim's user, which reads it."""
        for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
            os.chown(p, EXIM_UID, EXIM_UID)
        return path

    def copy_in(self, path: Path, mode: int = 0o600) -> Path:
        """A copy of path (a key) under base that Exim's user can read."""
        dest = self.base / path.name
        shutil.copyfile(path, dest)
        os.chmod(dest, mode)
        return self.own(dest)

    def write(self, conf_name: str, text: str) -> Path:
        path = self.base / conf_name
        path.write_text(text.replace("{BASE}", str(self.base)).replace("{EXIM}", str(self.binary)))
        return path

    # -- running ----------------------------------------------------------------------------
    def argv(self, *args: str) -> list[str]:
        """`exim ARGS` in the namespace, with the passwd and group that name EXIM_USER."""
        return self.ns.cmd(*self._exim(*args))

    def _exim(self, *args: str) -> list[str]:
        """`exim ARGS` with the passwd and group that name EXIM_USER (`Netns.cmd` puts it in
        the namespace)."""
        script = (
            f'mount --bind "{self.base}/passwd" /etc/passwd && '
            f'mount --bind "{self.base}/group" /etc/group && exec "$0" "$@"'
        )
        return ["unshare", "-m", "sh", "-c", script, str(self.binary), *args]

    def version(self) -> str:
        proc = subprocess.run(
            self.argv("-C", "/dev/null", "-bV"), capture_output=True, text=True, timeout=30
        )
        if proc.returncode != 0 or "Exim version" not in proc.stdout:
            ldd = subprocess.run(["ldd", str(EXIM)], capture_output=True, text=True).stdout
            missing = [line.strip() for line in ldd.splitlines() if "not found" in line]
            pytest.fail(
                f"{EXIM} -bV failed ({proc.returncode}): {proc.stderr.strip()}\n"
                f"libraries not found: {missing} (scripts/setup installs them)",
                pytrace=False,
            )
        return proc.stdout

    def start_daemon(self, conf: Path) -> EximPeer:
        log = self.base / "daemon.out"
        self.daemon = self.ns.popen(self._exim("-C", str(conf), "-bdf"), log)
        started = wait_until(
            lambda: "daemon started" in self.mainlog() or self.daemon.poll() is not None,
            START_TIMEOUT,
        )
        if not started or self.daemon.poll() is not None:
            raise RuntimeError(
                f"exim -bdf did not start (exit {self.daemon.poll()}):\n"
                f"{log.read_text('utf-8', 'replace')}\n{self.mainlog()}\n{self.paniclog()}"
            )
        return self

    def send(
        self, conf: Path, sender: str, rcpts: list[str], message: bytes, **macros: str
    ) -> subprocess.CompletedProcess:
        """Hand a message to Exim as a local program would; -odi: delivered (or deferred)
        before it returns. macros: -DNAME=value for the configuration."""
        defines = [f"-D{k}={v}" for k, v in macros.items()]
        return subprocess.run(
            self.argv("-C", str(conf), *defines, "-odi", "-oi", "-f", sender, "--", *rcpts),
            input=message,
            capture_output=True,
            timeout=120,
        )

    def stop(self) -> list[str]:
        if self.daemon is not None and self.daemon.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.daemon.pid, signal.SIGTERM)
            try:
                self.daemon.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.daemon.pid, signal.SIGKILL)
                self.daemon.wait(5)
        problems = self.problems()
        shutil.rmtree(self.base, ignore_errors=True)
        return problems

    # -- its logs ---------------------------------------------------------------------------
    def _read(self, name: str) -> str:
        try:
            return (self.base / "log" / name).read_text("utf-8", "replace")
        except OSError:
            return ""

    def mainlog(self) -> str:
        return self._read("mainlog")

    def paniclog(self) -> str:
        return self._read("paniclog")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.mainlog().splitlines()[-n:])

    def lines(self, pattern: str) -> list[re.Match[str]]:
        regex = re.compile(pattern)
        return [m for line in self.mainlog().splitlines() if (m := regex.search(line))]

    def problems(self) -> list[str]:
        return [
            f"exim {self.name} panic log: {line}"
            for line in self.paniclog().splitlines()
            if line.strip() and not _HARMLESS_PANIC.search(line)
        ]
