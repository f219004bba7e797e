"""Configuration: the command-line and INI contract turned into one frozen `Config`.

`load(argv)` parses options (getopt-style, short and long, via argparse), reads the INI file
named by `-c` (or the default one when it exists), lets the command line override it, and
validates every value (one value at a time: `values`). Any problem raises `ConfigError` naming
the option; `cli` turns that into exit status 2. Nothing here binds or opens anything except
the config file itself.
"""

from __future__ import annotations

import argparse
import configparser
import errno
import functools
import ipaddress
import os
import re
import socket
import ssl
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn

from mailerd import __version__, host, names, tls
from mailerd.aliases import AliasError, Aliases
from mailerd.credentials import DEFAULT_PASSWD, Credentials, CredentialsError
from mailerd.names import is_local_domain
from mailerd.values import (
    LABEL,
    is_selector,
    parse_bool,
    parse_choice,
    parse_dns,
    parse_hostname,
    parse_int,
    parse_optional_duration,
    parse_strings,
)

# what other modules use as config.X
from mailerd.values import ConfigError as ConfigError
from mailerd.values import parse_address as parse_address
from mailerd.values import parse_domains as parse_domains
from mailerd.values import parse_duration as parse_duration

DEFAULT_CONFIG = "/etc/mailerd/mailerd.conf"
DEFAULT_ALIASES = "/etc/aliases"
DEFAULT_SPOOL = "/var/spool/mail"
DEFAULT_QUEUE = "/var/spool/mailerd"
DEFAULT_MAX_MESSAGE_SIZE = 26214400
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_ERRORS = 20
DEFAULT_MAX_RECIPIENTS = 100  # RFC 5321 4.5.3.1.8's minimum (Postfix: 1000)
# Recipients at other domains one authenticated account may send to in 24 hours (mox's
# MaxOutgoingMessagesPerDay, which counts recipients too; Gmail allows about 2000): more than a
# person writes, far less than a spammer with a stolen password wants.
DEFAULT_MAX_RECIPIENTS_PER_DAY = 1000
DEFAULT_MAX_SESSIONS = 1000
DEFAULT_MAX_SESSIONS_PER_IP = 50
# Places of --max-sessions kept for each of the owner's pools (the local listeners; the
# submission listeners) when --reserved-sessions is not given: a tenth of the total.
RESERVED_SHARE = 10
# The per-client cap counts an IPv6 client by this prefix: a /64 is what one customer, one
# host, one VM gets (RFC 6177, RIPE-690), so counting single addresses would let one client
# be 2^64 of them.
DEFAULT_IPV6_PREFIX_LENGTH = 64
# A data phase is cut when it falls behind this many octets per second by more than --timeout
# (Postfix 3.7's smtpd_min_data_rate, and its default): a trickle is a few bytes a minute, the
# slowest real link kilobytes a second.
DEFAULT_MIN_DATA_RATE = 500
# No session lasts longer than this: a bulk sender reuses a connection for minutes (Postfix's
# smtp_connection_reuse_time_limit is 300 s), chasquid ends every session after 20 minutes.
DEFAULT_MAX_SESSION_TIME = 3600.0
DEFAULT_USER = "mail"  # the children's user when started as root without -u
DEFAULT_PIDFILE = "/run/mailerd.pid"  # when daemonizing as root without -P
DEFAULT_DNS_TIMEOUT = 10.0  # seconds for one DNS lookup, retries included
SUBMISSION_PORT = 587  # RFC 6409
SUBMISSIONS_PORT = 465  # RFC 8314: submission over implicit TLS

# The listeners' roles: what a client there may do, set by the option that names the address.
LOCAL = "local"  # trusted: may send anywhere (the machine's own programs, on loopback)
NETWORK = "network"  # the Internet's servers: mail for the local domains only
SUBMISSION = "submission"  # mail programs: STARTTLS, then AUTH, then anywhere (port 587)
SUBMISSIONS = "submissions"  # the same over TLS from the first byte (port 465)
ROLES = (LOCAL, NETWORK, SUBMISSION, SUBMISSIONS)


@dataclass(frozen=True)
class ListenAddress:
    """One listening endpoint and its role (from the option, not the address): what its
    clients may do."""

    host: str
    port: int
    role: str  # one of ROLES

    @property
    def trusted(self) -> bool:
        """Its clients may send anywhere without authenticating (the local listener)."""
        return self.role == LOCAL

    @property
    def implicit_tls(self) -> bool:
        """TLS from the first byte (the submissions listener)."""
        return self.role == SUBMISSIONS

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Config:
    spool: Path
    queue: Path
    domains: tuple[str, ...]
    listeners: tuple[ListenAddress, ...]
    hostname: str
    workers: int
    user: str | None = None
    foreground: bool = False
    pidfile: Path | None = None
    config_file: Path | None = None
    dns_server: tuple[str, int] | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    timeout: float = DEFAULT_TIMEOUT
    max_errors: int = DEFAULT_MAX_ERRORS
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    max_recipients_per_day: int = DEFAULT_MAX_RECIPIENTS_PER_DAY  # 0: no limit
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_sessions_per_ip: int = DEFAULT_MAX_SESSIONS_PER_IP
    reserved_sessions: int = DEFAULT_MAX_SESSIONS // RESERVED_SHARE
    ipv6_prefix_length: int = DEFAULT_IPV6_PREFIX_LENGTH
    min_data_rate: int = DEFAULT_MIN_DATA_RATE
    max_session_time: float = DEFAULT_MAX_SESSION_TIME
    min_free: int = DEFAULT_MAX_MESSAGE_SIZE * 3 // 2  # bytes the spool and queue keep free
    verbose: bool = False
    relayhost: tuple[str, int] | None = None
    relay_auth: Path | None = None  # read by the delivery process only (delivery.secrets)
    outbound_tls: str = "may"
    outbound_ca: Path | None = None  # CA certificates beside the system's (relay.load_trust)
    outbound_ip: str = "both"
    # Where the world reaches the network listeners when their own addresses are private (1:1
    # NAT): what `mailerd dns` publishes and checks in their place; the daemon takes them for
    # its own (own_addresses).
    public_addresses: tuple[str, ...] = ()
    # Why the default network listener (no listen-network given) has no address: the machine
    # had no default route, or its interface no address, when the config was read (a network
    # that comes up late). The master warns of it; a reload reads the interface again.
    unlistened: str = ""
    retry_after: float = 300.0
    max_retry: float = 3600.0
    max_queue_time: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    max_outbound: int = 20
    max_per_domain: int = 4
    log_file: Path | None = None
    aliases_file: Path = Path(DEFAULT_ALIASES)
    # The expanded aliases file: read by the master (load_files) before it forks.
    aliases: Aliases = field(default_factory=Aliases, compare=False, repr=False)
    # Certificate chains and their keys, paired in order; the context the master builds from
    # them (load_files) before it forks: keys stay root's.
    tls_pairs: tuple[tls.Pair, ...] = ()
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    tls_required: bool = False
    passwd_file: Path = Path(DEFAULT_PASSWD)
    # The passwd file as read by the master (load_files); the workers check passwords with it.
    credentials: Credentials = field(default_factory=Credentials, compare=False, repr=False)
    # The addresses that are this machine's (host.own_addresses), read by the master
    # (load_files) before it forks: their literals are local (`locality`), and relaying to
    # them loops.
    own_addresses: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    # --dkim-key DOMAIN:SELECTOR:FILE; the keys are read by the delivery process only
    # (delivery.secrets).
    dkim_specs: tuple[tuple[str, str, Path], ...] = ()
    inbound_auth: str = "header"
    # DNS blocklists the network listeners' clients are looked up in (inbound.blocklists).
    dnsbl: tuple[str, ...] = ()
    dns_timeout: float = DEFAULT_DNS_TIMEOUT
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @functools.cached_property
    def locality(self) -> names.Locality:
        """What is delivered here: mail to `domains`, and to literals of `own_addresses`."""
        return names.Locality(self.domains, self.own_addresses)


# (long name, short letter or None, takes a value, repeatable, help)
OPTIONS: tuple[tuple[str, str | None, bool, bool, str], ...] = (
    ("config", "c", True, False, "INI config file (default /etc/mailerd/mailerd.conf if present)"),
    ("spool", "s", True, False, "mailbox root (default /var/spool/mail)"),
    (
        "domain",
        "d",
        True,
        True,
        "a local domain; repeatable (default: /etc/mailname and the FQDN; localhost always)",
    ),
    ("queue", "q", True, False, "outbound queue and state (default /var/spool/mailerd)"),
    ("port", "p", True, False, "default port of the local and network listeners (default 25)"),
    (
        "listen-local",
        "l",
        True,
        True,
        "trusted listener ADDR[:PORT]; repeatable; 'none' for none (default 127.0.0.1 and ::1)",
    ),
    (
        "listen-network",
        "n",
        True,
        True,
        "untrusted listener ADDR[:PORT]; repeatable; 'none' for none (default: the addresses "
        "of the interface, -i)",
    ),
    (
        "listen-submission",
        None,
        True,
        True,
        "submission listener ADDR[:PORT] (STARTTLS, then AUTH; port 587); repeatable",
    ),
    (
        "listen-submissions",
        None,
        True,
        True,
        "submission listener with implicit TLS ADDR[:PORT] (port 465); repeatable",
    ),
    (
        "interface",
        "i",
        True,
        False,
        "interface of the default untrusted listener (default: that of the default route)",
    ),
    (
        "public-address",
        None,
        True,
        True,
        "the public address the world reaches the network listeners at, where theirs are "
        "private (1:1 NAT); repeatable; for `mailerd dns`'s records",
    ),
    (
        "hostname",
        "H",
        True,
        False,
        "name in the banner, EHLO reply and Received headers (default: the FQDN)",
    ),
    ("workers", "w", True, False, "worker processes (default: CPU count)"),
    ("user", "u", True, False, "children run as this user (default mail when started as root)"),
    ("foreground", "f", False, False, "do not daemonize; log to stderr"),
    ("pidfile", "P", True, False, "master's pid file (default /run/mailerd.pid for a root daemon)"),
    ("dns-server", None, True, False, "resolver IP[:PORT] instead of /etc/resolv.conf"),
    ("max-message-size", None, True, False, "SIZE limit in bytes (default 26214400)"),
    (
        "timeout",
        None,
        True,
        False,
        "a command must arrive complete within this, e.g. 30s, 5m (default 5m)",
    ),
    (
        "min-data-rate",
        None,
        True,
        False,
        "message data must keep up this many bytes/s, --timeout to spare (default 500)",
    ),
    ("max-session-time", None, True, False, "no session lasts longer (default 1h)"),
    (
        "max-errors",
        None,
        True,
        False,
        "errors (not our own deferrals) tolerated since the last delivered message (default 20)",
    ),
    (
        "max-recipients",
        None,
        True,
        False,
        "recipients of one message, the rest 452 4.5.3 (default and least "
        f"{DEFAULT_MAX_RECIPIENTS})",
    ),
    (
        "max-recipients-per-day",
        None,
        True,
        False,
        "recipients at other domains one authenticated user may send to in 24 hours, the "
        f"rest 450 4.7.1 (default {DEFAULT_MAX_RECIPIENTS_PER_DAY}; 0 = no limit)",
    ),
    ("max-sessions", None, True, False, "total concurrent sessions (default 1000)"),
    (
        "reserved-sessions",
        None,
        True,
        False,
        "of --max-sessions, kept for the local, the submission (half for addresses that "
        "logged in lately) and the network listeners, each (default: a tenth)",
    ),
    (
        "max-sessions-per-ip",
        None,
        True,
        False,
        "sessions per client (IPv4 address, IPv6 prefix) on network and submission listeners "
        f"(default {DEFAULT_MAX_SESSIONS_PER_IP})",
    ),
    (
        "ipv6-prefix-length",
        None,
        True,
        False,
        "an IPv6 client is its address's /N for --max-sessions-per-ip (default 64)",
    ),
    (
        "min-free",
        None,
        True,
        False,
        "free bytes the spool and queue keep: MAIL gets 452 below (default 1.5 x max size; 0: off)",
    ),
    ("verbose", "v", False, False, "log more, including the SMTP dialogue"),
    ("relayhost", None, True, False, "smarthost for all outbound mail instead of each domain's MX"),
    (
        "relay-auth",
        None,
        True,
        False,
        "file holding 'username:password' for AUTH at the relayhost (with --relayhost only)",
    ),
    (
        "outbound-tls",
        None,
        True,
        False,
        "may (default; verify for a relayhost with --relay-auth), encrypt, verify or none",
    ),
    (
        "outbound-ca",
        None,
        True,
        False,
        "PEM CA certificates outbound servers' certificates may chain to, beside the system's "
        "(a private relayhost's CA)",
    ),
    (
        "outbound-ip",
        None,
        True,
        False,
        "ipv4, ipv6 or both (default): address families to send over",
    ),
    ("retry-after", None, True, False, "first retry of deferred mail (default 5m; doubles to 1h)"),
    (
        "max-queue-time",
        None,
        True,
        False,
        "bounce what is still undelivered after this (default 5d)",
    ),
    ("delay-warning", None, True, False, "warn the sender after this (default 4h; 0 = never)"),
    ("max-outbound", None, True, False, "concurrent outbound deliveries in all (default 20)"),
    ("max-per-domain", None, True, False, "concurrent outbound deliveries per domain (default 4)"),
    ("log-file", None, True, False, "log to FILE instead of syslog/stderr (reopened on SIGUSR1)"),
    ("aliases", None, True, False, "aliases file (default /etc/aliases)"),
    ("tls-cert", None, True, True, "certificate chain (PEM) for TLS; repeatable, with --tls-key"),
    ("tls-key", None, True, True, "private key (PEM) of the --tls-cert given in the same place"),
    ("tls-required", None, False, False, "refuse MAIL before STARTTLS on the network listeners"),
    ("passwd", None, True, False, f"passwords for AUTH (default {DEFAULT_PASSWD})"),
    (
        "dkim-key",
        None,
        True,
        True,
        "DOMAIN:SELECTOR:FILE: DKIM-sign mail from DOMAIN with this key (PEM); repeatable",
    ),
    (
        "inbound-auth",
        None,
        True,
        False,
        "off, header (default: add Authentication-Results) or enforce (and apply DMARC reject)",
    ),
    (
        "dnsbl",
        None,
        True,
        True,
        "DNS blocklist ZONE whose listed clients the network listeners refuse at RCPT (554 "
        "5.7.1); repeatable (default none)",
    ),
    (
        "dns-timeout",
        None,
        True,
        False,
        "bound on each DNS lookup, and on one message's checks (default 10s)",
    ),
)


METAVARS = {
    "config": "FILE", "spool": "DIR", "domain": "SUFFIX", "queue": "DIR", "port": "PORT",
    "listen-local": "ADDR[:PORT]", "listen-network": "ADDR[:PORT]", "interface": "NAME",
    "public-address": "ADDR",
    "hostname": "NAME", "workers": "N", "user": "NAME", "pidfile": "FILE",
    "dns-server": "IP[:PORT]", "max-message-size": "BYTES", "timeout": "DURATION",
    "max-errors": "N", "max-recipients": "N", "max-sessions": "N", "max-sessions-per-ip": "N",
    "max-recipients-per-day": "N",
    "min-free": "BYTES",
    "reserved-sessions": "N", "ipv6-prefix-length": "N", "min-data-rate": "BYTES",
    "max-session-time": "DURATION",
    "relayhost": "HOST[:PORT]", "relay-auth": "FILE", "outbound-tls": "POLICY",
    "outbound-ca": "FILE",
    "outbound-ip": "FAMILY", "retry-after": "DURATION", "max-queue-time": "DURATION",
    "delay-warning": "DURATION", "max-outbound": "N", "max-per-domain": "N", "log-file": "FILE",
    "aliases": "FILE", "listen-submission": "ADDR[:PORT]", "listen-submissions": "ADDR[:PORT]",
    "tls-cert": "FILE", "tls-key": "FILE", "passwd": "FILE",
    "dkim-key": "DOMAIN:SELECTOR:FILE", "inbound-auth": "MODE", "dns-timeout": "DURATION",
    "dnsbl": "ZONE",
}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 2, as the contract says."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mailerd",
        description="A lightweight personal mail server.",
        epilog="Subcommands: mailerd queue [-c FILE] [-q DIR] [list | flush | delete ID... | init] "
        "shows and manages the outbound queue; mailerd sendmail [options] [recipient...] is "
        "the machine's mail command (also run as sendmail, mailq = sendmail -bp, and "
        "newaliases); mailerd passwd [--delete] USER sets the password USER authenticates with; "
        "mailerd dkim keygen DOMAIN makes a DKIM key; mailerd dns [--check] prints (and checks) "
        "the DNS records to publish; mailerd reload [-c FILE] [-P PIDFILE] has the running "
        "mailerd reload and says how it went (exit 0 done, 1 not, 7 not running, 77 not "
        "permitted, 78 a configuration file it cannot use). "
        "Signals: HUP reloads, TERM stops, USR1 reopens logs.",
        argument_default=argparse.SUPPRESS,
    )
    for name, short, takes_value, repeatable, text in OPTIONS:
        flags = [f"-{short}", f"--{name}"] if short else [f"--{name}"]
        dest = name.replace("-", "_")
        if not takes_value:
            parser.add_argument(*flags, dest=dest, action="store_true", help=text)
        elif repeatable:
            parser.add_argument(
                *flags, dest=dest, action="append", metavar=METAVARS[name], help=text
            )
        else:
            parser.add_argument(*flags, dest=dest, metavar=METAVARS[name], help=text)
    parser.add_argument("-V", "--version", action="version", version=f"mailerd {__version__}")
    return parser


def load(argv: list[str]) -> Config:
    """Parse argv (without the program name) and the config file into a validated Config."""
    args = vars(build_parser().parse_args(argv))
    config_path = args.get("config")
    raw: dict[str, object] = {}
    if config_path is not None or os.path.exists(DEFAULT_CONFIG):
        raw.update(read_ini(config_path or DEFAULT_CONFIG))
    from_file = raw.keys() - args.keys() - {"config"}
    raw.update(args)
    try:
        return from_values(raw, Path(str(raw["config"])) if raw.get("config") else None)
    except ConfigError as exc:
        raise _placed(exc, str(raw.get("config")), from_file) from exc


def _placed(exc: ConfigError, path: str, from_file: set[str]) -> ConfigError:
    """A bad value the config file gave is named as its key in that file, not as the option
    (the operator who wrote 'workers = many' looks for no '-w' or '--workers')."""
    option, sep, why = str(exc).partition(": ")
    if sep and option.startswith("--") and option[2:].replace("-", "_") in from_file:
        return ConfigError(f"config file {path}: {option[2:]}: {why}")
    return exc


MAX_CONFIG_SIZE = 1 << 20  # octets: a config file is a few KB


def _config_text(path: str) -> str:
    """The file's text: a regular file of at most MAX_CONFIG_SIZE octets. The master reads it
    at every reload, so a FIFO in its place must not block the master (no reaping, no
    SIGTERM) nor /dev/zero fill its memory (an attacker's pass, /tmp/atk7c)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > MAX_CONFIG_SIZE:
            raise OSError(errno.EFBIG, f"over {MAX_CONFIG_SIZE} octets")
        data = os.read(fd, MAX_CONFIG_SIZE + 1)
    finally:
        os.close(fd)
    return data.decode("utf-8")


def read_ini(path: str) -> dict[str, object]:
    """Read the [mailerd] section; keys are long option names, lists split on commas/space."""
    # " # ..." and " ; ..." after a value are comments, as the README's examples write them
    # (otherwise "queue = /tmp/q  # mine" names a directory "/tmp/q  # mine"). Only after
    # whitespace: no value mailerd takes contains one.
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string(_config_text(path), source=path)
    except OSError as exc:  # (the system's words, not Python's "[Errno 2] ...: 'path'")
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text") from exc
    except configparser.Error as exc:
        raise ConfigError(f"config file {path}: {exc}".replace("\n", " ")) from exc
    if not parser.has_section("mailerd"):
        raise ConfigError(f"config file {path}: no [mailerd] section")
    known = {name: (takes, rep) for name, _, takes, rep, _ in OPTIONS}
    values: dict[str, object] = {"config": path}
    for key, value in parser.items("mailerd"):
        if key not in known or key == "config":
            raise ConfigError(f"config file {path}: unknown key '{key}'")
        takes_value, repeatable = known[key]
        dest = key.replace("-", "_")
        if not takes_value:
            try:
                values[dest] = parse_bool(key, value)
            except ConfigError as exc:
                raise _placed(exc, path, {dest}) from exc
        elif repeatable:
            values[dest] = [v for v in re.split(r"[,\s]+", value) if v]
        else:
            values[dest] = value.strip()
    return values


def local_domains(raw: dict[str, object], default: list[str] | None = None) -> tuple[str, ...]:
    """The local domains of a configuration: its `domain`s, else `default` (the machine's
    mail name, `host.identity`, when not given), and localhost always, as in Debian's Postfix
    (mydestination): mail for it can go nowhere else, and fail2ban, logcheck and scripts write
    to root@localhost."""
    given = raw.get("domain") or (host.identity()[0] if default is None else default)
    return tuple(dict.fromkeys([*parse_domains(given), names.LOCALHOST]))


def from_values(raw: dict[str, object], config_file: Path | None) -> Config:
    """Validate merged raw values (strings, lists, bools) into a Config."""
    port = parse_int("port", raw.get("port", "25"), 1, 65535)
    local = _listen_list("listen-local", raw.get("listen_local"), port, LOCAL)
    network = _listen_list("listen-network", raw.get("listen_network"), port, NETWORK)
    if local is None:
        local = [ListenAddress(h, port, LOCAL) for h in host.loopback_addresses()]
    unlistened = ""
    if network is None:
        iface = str(raw.get("interface") or host.default_interface() or "")
        try:
            addresses = host.interface_addresses(iface)
        except OSError as exc:  # (netlink refused: a sandbox, RestrictAddressFamilies=)
            raise ConfigError(
                f"listen-network: cannot read the addresses of interface {iface} ({exc}); "
                "name the addresses to listen on"
            ) from None
        network = [ListenAddress(h, port, NETWORK) for h in addresses]
        if not network:
            unlistened = f"interface {iface} has no address" if iface else "no default route"
    submission = _listen_list(
        "listen-submission", raw.get("listen_submission"), SUBMISSION_PORT, SUBMISSION
    )
    submissions = _listen_list(
        "listen-submissions", raw.get("listen_submissions"), SUBMISSIONS_PORT, SUBMISSIONS
    )
    listeners = tuple(local + network + (submission or []) + (submissions or []))
    if len(set((a.host, a.port) for a in listeners)) != len(listeners):
        raise ConfigError("listen-*: the same address is given twice")
    pairs = _tls_pairs(raw.get("tls_cert"), raw.get("tls_key"))
    if not pairs and (submission or submissions):
        raise ConfigError("listen-submission(s): submission needs TLS: give --tls-cert/--tls-key")
    if not pairs and raw.get("tls_required"):
        raise ConfigError("tls-required: give --tls-cert/--tls-key to offer STARTTLS")
    if raw.get("relay_auth") and not raw.get("relayhost"):
        # Without a smarthost the delivery process would offer its password to whatever MX a
        # recipient's domain names: an attacker's domain would be handed it.
        raise ConfigError(
            "relay-auth: needs --relayhost (the credentials are for the smarthost; without one "
            "they would be offered to each recipient domain's MX)"
        )
    default_domains, default_hostname = (
        ([], "") if raw.get("domain") and raw.get("hostname") else host.identity()
    )
    domains = local_domains(raw, default_domains)
    dkim_specs = _dkim_specs(raw.get("dkim_key"), domains)
    max_sessions = parse_int(
        "max-sessions", raw.get("max_sessions", DEFAULT_MAX_SESSIONS), 1, 10**7
    )
    return Config(
        spool=Path(str(raw.get("spool", DEFAULT_SPOOL))),
        queue=Path(str(raw.get("queue", DEFAULT_QUEUE))),
        domains=domains,
        listeners=listeners,
        hostname=parse_hostname(str(raw.get("hostname") or default_hostname)),
        workers=parse_int("workers", raw.get("workers", os.cpu_count() or 1), 1, 256),
        user=str(raw["user"]) if raw.get("user") else None,
        foreground=bool(raw.get("foreground", False)),
        pidfile=Path(str(raw["pidfile"])) if raw.get("pidfile") else None,
        config_file=config_file,
        dns_server=parse_dns(raw["dns_server"]) if raw.get("dns_server") else None,
        max_message_size=parse_int(
            "max-message-size", raw.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE), 1, 2**40
        ),
        timeout=parse_duration("timeout", raw.get("timeout", DEFAULT_TIMEOUT)),
        max_errors=parse_int("max-errors", raw.get("max_errors", DEFAULT_MAX_ERRORS), 0, 10**6),
        max_recipients=parse_int(
            "max-recipients", raw.get("max_recipients", DEFAULT_MAX_RECIPIENTS), 100, 100_000
        ),
        max_recipients_per_day=parse_int(
            "max-recipients-per-day",
            raw.get("max_recipients_per_day", DEFAULT_MAX_RECIPIENTS_PER_DAY),
            0,
            10**9,
        ),
        max_sessions=max_sessions,
        max_sessions_per_ip=parse_int(
            "max-sessions-per-ip",
            raw.get("max_sessions_per_ip", DEFAULT_MAX_SESSIONS_PER_IP),
            1,
            10**7,
        ),
        reserved_sessions=_reserved_sessions(raw.get("reserved_sessions"), max_sessions, listeners),
        ipv6_prefix_length=parse_int(
            "ipv6-prefix-length",
            raw.get("ipv6_prefix_length", DEFAULT_IPV6_PREFIX_LENGTH),
            1,
            128,
        ),
        min_data_rate=parse_int(
            "min-data-rate", raw.get("min_data_rate", DEFAULT_MIN_DATA_RATE), 1, 2**40
        ),
        max_session_time=parse_duration(
            "max-session-time", raw.get("max_session_time", DEFAULT_MAX_SESSION_TIME)
        ),
        min_free=parse_int(
            "min-free",
            raw.get("min_free", _default_min_free(raw.get("max_message_size"))),
            0,
            2**50,
        ),
        verbose=bool(raw.get("verbose", False)),
        relayhost=_parse_relayhost(str(raw["relayhost"])) if raw.get("relayhost") else None,
        relay_auth=Path(str(raw["relay_auth"])) if raw.get("relay_auth") else None,
        outbound_tls=parse_choice("outbound-tls", raw.get("outbound_tls", "may"), TLS_CHOICES),
        outbound_ca=Path(str(raw["outbound_ca"])) if raw.get("outbound_ca") else None,
        outbound_ip=parse_choice("outbound-ip", raw.get("outbound_ip", "both"), IP_CHOICES),
        public_addresses=_public_addresses(raw.get("public_address")),
        unlistened=unlistened,
        retry_after=parse_duration("retry-after", raw.get("retry_after", 300.0)),
        max_queue_time=parse_duration("max-queue-time", raw.get("max_queue_time", "5d")),
        delay_warning=parse_optional_duration("delay-warning", raw.get("delay_warning", "4h")),
        max_outbound=parse_int("max-outbound", raw.get("max_outbound", 20), 1, 10000),
        max_per_domain=parse_int("max-per-domain", raw.get("max_per_domain", 4), 1, 10000),
        log_file=Path(str(raw["log_file"])) if raw.get("log_file") else None,
        aliases_file=Path(str(raw.get("aliases") or DEFAULT_ALIASES)),
        tls_pairs=pairs,
        tls_required=bool(raw.get("tls_required", False)),
        passwd_file=Path(str(raw.get("passwd") or DEFAULT_PASSWD)),
        dkim_specs=dkim_specs,
        inbound_auth=parse_choice("inbound-auth", raw.get("inbound_auth", "header"), AUTH_MODES),
        dnsbl=_zones(raw.get("dnsbl")),
        dns_timeout=parse_duration("dns-timeout", raw.get("dns_timeout", DEFAULT_DNS_TIMEOUT)),
    )


def absolute(cfg: Config, base: Path) -> Config:
    """The same Config with every relative path made absolute against `base` (the start-up
    directory), so that it still means the same after the daemon's chdir("/")."""

    def fix(path: Path | None) -> Path | None:
        return None if path is None else base / path

    return replace(
        cfg,
        spool=base / cfg.spool,
        queue=base / cfg.queue,
        pidfile=fix(cfg.pidfile),
        config_file=fix(cfg.config_file),
        relay_auth=fix(cfg.relay_auth),
        outbound_ca=fix(cfg.outbound_ca),
        log_file=fix(cfg.log_file),
        aliases_file=base / cfg.aliases_file,
        tls_pairs=tuple((base / cert, base / key) for cert, key in cfg.tls_pairs),
        passwd_file=base / cfg.passwd_file,
        dkim_specs=tuple((d, s, base / path) for d, s, path in cfg.dkim_specs),
    )


def load_files(cfg: Config) -> Config:
    """The same Config with the files it names read (as root, by the master, at start-up and
    on every reload): the aliases expanded, the TLS context built from the certificates and
    keys, the passwords; and the machine's own addresses (`own_addresses`: not a file, but read
    here so that the workers and the delivery process share one reading, renewed at each
    reload). ConfigError names the file that cannot be used. (The secret files are read by
    the delivery process only: `delivery.secrets`.)"""
    return _with_files(cfg, _tls_context(cfg))


def reload_files(cfg: Config, running: Config) -> tuple[Config, str | None]:
    """load_files at a reload, beside the `running` configuration: certificates that do not
    load leave the running ones in use, and the rest of the reload goes on (certbot replaces
    the files unattended, and a password deleted meanwhile must not wait for them to be
    mended). Then the second value says why they did not load. Any other file that cannot be
    used fails the reload (ConfigError), as do certificates when none is in use."""
    try:
        context = _tls_context(cfg)
    except ConfigError as exc:
        if running.tls_context is None:
            raise
        kept = replace(cfg, tls_pairs=running.tls_pairs)
        return _gone_aliases(_with_files(kept, running.tls_context), running), str(exc)
    return _gone_aliases(_with_files(cfg, context), running), None


def _gone_aliases(cfg: Config, running: Config) -> Config:
    """`cfg`, unless its aliases file is gone since the running configuration read it: that
    fails the reload, as a file that cannot be read does (a reviewer's finding: read as none,
    with an info line, it had every alias refused, the postmaster's too). A file absent from
    the start means no aliases, as for Postfix."""
    if (
        cfg.aliases.missing
        and not running.aliases.missing
        and cfg.aliases_file == running.aliases_file
    ):
        raise ConfigError(
            f"--aliases: {cfg.aliases_file}: no such file, since it was last read; the aliases "
            "in use are kept (to have none, leave the file empty)"
        )
    return cfg


def _tls_context(cfg: Config) -> ssl.SSLContext | None:
    try:
        return tls.server_context(cfg.tls_pairs, cfg.hostname)
    except tls.TLSError as exc:
        raise ConfigError(f"{exc.option}: {exc}") from exc


def _with_files(cfg: Config, context: ssl.SSLContext | None) -> Config:
    """`cfg` with `context` and its other files read (see load_files)."""
    own = host.own_addresses([listen.host for listen in cfg.listeners], cfg.public_addresses)
    cfg = replace(cfg, own_addresses=own)  # (first: the aliases' targets are local by it)
    try:
        table = Aliases.load(str(cfg.aliases_file), cfg.locality)
    except AliasError as exc:
        raise ConfigError(f"--aliases: {exc}") from exc
    try:
        passwords = Credentials.load(str(cfg.passwd_file))
    except CredentialsError as exc:
        raise ConfigError(f"--passwd: {exc}") from exc
    return replace(cfg, aliases=table, tls_context=context, credentials=passwords)


def _reserved_sessions(
    value: object, max_sessions: int, listeners: tuple[ListenAddress, ...]
) -> int:
    """--reserved-sessions (default: a tenth of --max-sessions), checked to leave the network
    listeners a place: each owner pool that has a listener keeps that many for itself (and the
    network pool as many, or what the owners leave: `admission.Caps`)."""
    if value is None:
        return max_sessions // RESERVED_SHARE
    reserved = parse_int("reserved-sessions", value, 0, 10**7)
    roles = {listen.role for listen in listeners}
    owners = (LOCAL in roles) + bool(roles & {SUBMISSION, SUBMISSIONS})
    if NETWORK in roles and reserved * owners >= max_sessions:
        raise ConfigError(
            f"--reserved-sessions: {owners} × {reserved} leave the network listeners no place "
            f"of --max-sessions {max_sessions}"
        )
    return reserved


AUTH_MODES = ("off", "header", "enforce")


def _default_min_free(max_message_size: object) -> int:
    """1.5 times the largest message, as Postfix's queue_minfree defaults to."""
    try:
        size = int(str(max_message_size)) if max_message_size is not None else 0
    except ValueError:
        size = 0  # (the size's own check names the bad value)
    return (size or DEFAULT_MAX_MESSAGE_SIZE) * 3 // 2


def _dkim_specs(values: object, domains: tuple[str, ...]) -> tuple[tuple[str, str, Path], ...]:
    """--dkim-key DOMAIN:SELECTOR:FILE, each for a local domain (or one below it)."""
    specs = []
    for text in parse_strings(values) if values is not None else []:
        domain, sep1, rest = text.partition(":")
        selector, sep2, path = rest.partition(":")
        domain = domain.strip().lower().rstrip(".")
        if not (sep1 and sep2 and domain and is_selector(selector.strip()) and path):
            raise ConfigError(f"--dkim-key: not DOMAIN:SELECTOR:FILE: '{text}'")
        selector = selector.strip()
        if not is_local_domain(domain, domains):
            raise ConfigError(
                f"--dkim-key: {domain} is not a local domain: mailerd signs only its own mail"
            )
        specs.append((domain, selector, Path(path)))
    if len({(d, s) for d, s, _ in specs}) != len(specs):
        raise ConfigError("--dkim-key: the same domain and selector are given twice")
    return tuple(specs)


def _tls_pairs(certs: object, keys: object) -> tuple[tls.Pair, ...]:
    """--tls-cert and --tls-key, paired in the order given."""
    cert_list = parse_strings(certs) if certs is not None else []
    key_list = parse_strings(keys) if keys is not None else []
    if len(cert_list) != len(key_list):
        raise ConfigError(
            f"tls-cert/tls-key: {len(cert_list)} certificate(s) but {len(key_list)} key(s): "
            "give one key for each certificate, in the same order"
        )
    return tuple(
        (Path(c.strip()), Path(k.strip())) for c, k in zip(cert_list, key_list, strict=True)
    )


TLS_CHOICES = ("may", "encrypt", "verify", "none")


IP_CHOICES = ("ipv4", "ipv6", "both")


def _parse_relayhost(value: str) -> tuple[str, int]:
    """HOST[:PORT], [IPv6]:PORT or an IP; default port 25."""
    text = value.strip()
    try:
        return parse_address("relayhost", text, 25)
    except ConfigError:
        pass
    host, _, port = text.partition(":")
    host = host.strip("[]")
    if not host or not all(LABEL.match(label) for label in host.lower().rstrip(".").split(".")):
        raise ConfigError(f"--relayhost: not HOST[:PORT]: '{value}'")
    return host.lower().rstrip("."), parse_int("relayhost", port, 1, 65535) if port else 25


def _zones(values: object) -> tuple[str, ...]:
    """--dnsbl: DNS zones, each once, in the order given."""
    out: list[str] = []
    for value in parse_strings(values) if values is not None else []:
        zone = value.strip().lower().rstrip(".")
        if "." not in zone or not all(LABEL.match(label) for label in zone.split(".")):
            raise ConfigError(f"--dnsbl: not a DNS zone: '{value}'")
        if zone not in out:
            out.append(zone)
    return tuple(out)


def _public_addresses(values: object) -> tuple[str, ...]:
    """--public-address: addresses the world can reach (not loopback, link-local, a wildcard,
    multicast, or one of the private ranges a NAT hides)."""
    out: list[str] = []
    for item in parse_strings(values) if values is not None else []:
        try:
            ip = ipaddress.ip_address(item.strip("[]"))
        except ValueError:
            raise ConfigError(f"--public-address: not an IP address: '{item}'") from None
        if host.behind_nat(ip) or not host.reachable(ip):
            raise ConfigError(f"--public-address: {ip} is not an address the world can reach")
        if isinstance(ip, ipaddress.IPv6Address) and _holds_ipv4(ip):
            # (whose IPv4 address, private or not, the NAT check above does not see)
            raise ConfigError(
                f"--public-address: {ip} is an IPv6 form of an IPv4 address: give the IPv4 "
                "address the world reaches this machine at"
            )
        if str(ip) not in out:
            out.append(str(ip))
    return tuple(out)


_IPV4_FORMS = tuple(
    ipaddress.ip_network(n)
    for n in ("::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48")
)  # IPv4-compatible, -mapped, -translated (RFC 4291 2.5.5, RFC 2765), NAT64 (RFC 6052, 8215)


def _holds_ipv4(ip: ipaddress.IPv6Address) -> bool:
    """An IPv6 address that stands for an IPv4 one (those above, 6to4, Teredo)."""
    return bool(ip.sixtofour or ip.teredo) or any(ip in net for net in _IPV4_FORMS)


def _listen_list(name: str, values: object, port: int, role: str) -> list[ListenAddress] | None:
    if values is None:
        return None
    items = parse_strings(values)
    if [v.lower() for v in items] == ["none"]:
        return []
    found = [ListenAddress(*parse_address(name, item, port), role) for item in items]
    for listen in found:
        mapped = host.mapped_ipv4(ipaddress.ip_address(listen.host.partition("%")[0]))
        if mapped is not None:  # (the bind would fail at start, EINVAL)
            raise ConfigError(
                f"--{name}: [{listen.host}] is an IPv4 address in IPv6 form, which an IPv6 "
                f"socket cannot listen on: give {mapped}"
            )
    return found
