"""A tiny authoritative DNS server for tests: answers from master-file text over UDP and TCP.

It stands in for "the whole DNS" of a test: the mail server under test is pointed at it
(`--dns-server`), so nothing ever reaches the machine's own resolver or the Internet.

In-process (unit tests)::

    with serve(ZONE_TEXT) as server:      # 127.0.0.1 and a free port, UDP and TCP
        resolver = mx.make_resolver((server.host, server.port), timeout=1.0)
        ...                               # server.queries: what was asked

As a program (end-to-end tests, e.g. inside a network namespace)::

    python tests/dnsserver.py --listen 198.51.100.53 --zone FILE [--zone FILE ...]
                              [--listen ADDR ...] [--port 53] [--verbose]

It prints ``dnsserver: listening on ADDR port PORT`` (one line per address, flushed) once that
address's UDP and TCP sockets are bound, serves until SIGTERM or SIGINT, then exits 0. A zone
that does not parse exits 2 with the file, line and reason on stderr; a socket that cannot be
bound exits 1. ``--port 0`` takes a free port (the line says which). ``--verbose`` logs one
line per query to stderr.

Zone format: RFC 1035 master-file text, parsed by dnspython's zone-file reader, e.g.::

    $ORIGIN example.com.
    @          MX   10 mx1
    @          MX   20 mx2.example.net.
    mx1        A    192.0.2.10
    mx1        AAAA 2001:db8::10
    $ORIGIN example.net.
    mx2        A    192.0.2.20
    nomail     MX   0 .                        ; RFC 7505 null MX
    alias      CNAME mx2                       ; CNAMEs are followed within the data
    broken     TXT  "dnsserver:servfail"       ; every query for this name: SERVFAIL
    slow       TXT  "dnsserver:timeout"        ; every query for this name: no reply at all
    late       TXT  "dnsserver:slow"           ; every query: the answer, SLOW_SECONDS late
    half       A    192.0.2.30
    half       TXT  "dnsserver:servfail AAAA"  ; only AAAA queries fail; A answers normally

- Every file is read with the root as its origin, so one file may hold any number of domains:
  switch with ``$ORIGIN`` (which also makes relative names work), or write absolute names.
  Several ``--zone`` files are merged. ``$TTL 300`` is implied; any record type dnspython
  knows may be used (MX, A, AAAA, TXT, CNAME, PTR, NS, ...) except SOA, which dnspython only
  allows at a zone's origin (here the root); it is not needed. ``$INCLUDE`` is refused.
- Names not present anywhere get NXDOMAIN; a name that exists (or has names below it) but has
  no record of the asked type gets an empty NOERROR answer (NODATA). Negative answers carry no
  SOA (so nothing caches them), unless ``Records(..., negative_ttl=N)`` asks for one: then
  they carry the root's SOA with TTL and minimum N, and resolvers cache them for N seconds
  (RFC 2308), as they do the Internet's.
- Markers are TXT records whose text starts with ``dnsserver:``: ``servfail``, ``refused``,
  ``timeout`` (no reply) or ``slow`` (the answer, after SLOW_SECONDS), optionally followed
  by the record types they apply to (default: all). They apply to that exact name only,
  and are never served as TXT data.
- Replies have AA (authoritative) and RA set. A UDP reply larger than the query allows (512
  bytes, or its EDNS payload) is sent empty with TC set, so clients retry over TCP.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.tokenizer
import dns.zone
import dns.zonefile

MARKER = "dnsserver:"
ACTIONS = ("servfail", "refused", "timeout", "slow")
SLOW_SECONDS = 0.6  # how late a "slow" name's answers come
DEFAULT_TTL = 300
_MAX_CNAME_CHAIN = 8
_TCP_IDLE = 30.0  # seconds a TCP client may stay silent before we hang up


@dataclass
class Result:
    """What to answer for one question; `silent` means send nothing (a timeout)."""

    rcode: int = dns.rcode.NOERROR
    answer: list[dns.rrset.RRset] = field(default_factory=list)
    silent: bool = False
    delay: float = 0.0  # seconds to wait before answering


class Records:
    """The data served: zones merged into one tree under the root, plus the failure markers."""

    def __init__(
        self, *texts: str, filenames: tuple[str, ...] = (), negative_ttl: int | None = None
    ) -> None:
        self.zone = dns.zone.Zone(dns.name.root, relativize=False)
        self.negative_ttl = negative_ttl
        for i, text in enumerate(texts):
            self._read(text, filenames[i] if i < len(filenames) else "<zone>")
        self._check_markers()

    def _read(self, text: str, filename: str) -> None:
        # What dns.zone.from_text does, but adding to the one zone (so files merge) and with a
        # default TTL (so files need no $TTL). The origin is the root: any name may appear.
        with self.zone.writer(replacement=False) as txn:
            tok = dns.tokenizer.Tokenizer(text, filename)
            reader = dns.zonefile.Reader(
                tok, dns.rdataclass.IN, txn, allow_include=False, default_ttl=DEFAULT_TTL
            )
            try:
                reader.read()
            except ValueError as e:
                if "SOA" in str(e):  # dnspython allows SOA only at the origin, here the root
                    raise ValueError(f"{filename}: SOA records are not supported") from None
                raise

    def _check_markers(self) -> None:
        # A misspelt marker would otherwise surface as a confusing answer mid-test.
        for name, node in self.zone.items():
            for rdata in node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.TXT) or ():
                try:
                    _parse_marker(rdata)
                except (ValueError, dns.exception.DNSException) as e:
                    raise ValueError(f"{name}: {e}") from None

    def lookup(self, qname: dns.name.Name, qtype: int) -> Result:
        result = Result()
        if self._marker(qname, qtype) == "slow":
            result.delay = SLOW_SECONDS
        name = qname
        for _ in range(_MAX_CNAME_CHAIN):
            action = self._marker(name, qtype)
            if action == "timeout":
                return Result(silent=True)
            if action not in (None, "slow"):
                rcode = dns.rcode.SERVFAIL if action == "servfail" else dns.rcode.REFUSED
                return Result(rcode=rcode)
            node = self.zone.get_node(name)
            if node is None:
                if not self._has_descendants(name):
                    result.rcode = dns.rcode.NXDOMAIN
                break
            rrset = self._rrset(name, node, qtype)
            if rrset is not None:
                result.answer.append(rrset)
                break
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None or qtype == dns.rdatatype.CNAME:
                break
            result.answer.append(_to_rrset(name, cname))
            name = cname[0].target
        return result

    def _rrset(self, name: dns.name.Name, node, qtype: int) -> dns.rrset.RRset | None:
        rdataset = node.get_rdataset(dns.rdataclass.IN, qtype)
        if rdataset is not None and qtype == dns.rdatatype.TXT:
            rdataset = _plain_txt(rdataset)
        return None if rdataset is None else _to_rrset(name, rdataset)

    def _marker(self, name: dns.name.Name, qtype: int) -> str | None:
        node = self.zone.get_node(name)
        txt = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.TXT) if node else None
        for rdata in txt or ():
            action, types = _parse_marker(rdata)
            if action is not None and (not types or qtype in types):
                return action
        return None

    def _has_descendants(self, name: dns.name.Name) -> bool:
        # An "empty non-terminal" (example.com when only mx.example.com has records) exists.
        return any(other.is_subdomain(name) for other in self.zone.nodes)

    def respond(self, wire: bytes, *, udp: bool) -> bytes | None:
        """The reply to one query in wire format, or None to send nothing."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not even a header we could answer to
        response = dns.message.make_response(query, recursion_available=True)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
        elif len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
        else:
            question = query.question[0]
            result = self.lookup(question.name, question.rdtype)
            if result.silent:
                return None
            time.sleep(result.delay)  # (each query has a thread of its own)
            response.set_rcode(result.rcode)
            response.answer.extend(result.answer)
            negative = result.rcode == dns.rcode.NXDOMAIN or (
                result.rcode == dns.rcode.NOERROR and not result.answer
            )
            if negative and self.negative_ttl is not None:
                response.authority.append(_root_soa(self.negative_ttl))
        return _render(query, response, udp=udp)

    def describe(self, wire: bytes) -> str:
        """One log line naming the question in `wire`."""
        try:
            question = dns.message.from_wire(wire).question[0]
        except (dns.exception.DNSException, IndexError):
            return "unparsable query"
        return f"{question.name} {dns.rdatatype.to_text(question.rdtype)}"


def _root_soa(ttl: int) -> dns.rrset.RRset:
    """The SOA of a negative answer that may be cached for `ttl` seconds (RFC 2308 5)."""
    return dns.rrset.from_text(
        dns.name.root, ttl, "IN", "SOA", f". hostmaster. 1 3600 600 86400 {ttl}"
    )


def _parse_marker(rdata) -> tuple[str | None, set[int]]:
    text = b"".join(rdata.strings).decode("utf-8", "replace")
    if not text.startswith(MARKER):
        return None, set()
    words = text[len(MARKER) :].split()
    if not words or words[0].lower() not in ACTIONS:
        raise ValueError(f"unknown dnsserver marker {text!r}")
    return words[0].lower(), {dns.rdatatype.from_text(w) for w in words[1:]}


def _plain_txt(rdataset: dns.rdataset.Rdataset) -> dns.rdataset.Rdataset | None:
    """The TXT records that are data, without our markers (None if nothing is left)."""
    kept = [r for r in rdataset if _parse_marker(r)[0] is None]
    if not kept:
        return None
    return dns.rdataset.from_rdata_list(rdataset.ttl, kept)


def _to_rrset(name: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    return dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset))


def _render(query: dns.message.Message, response: dns.message.Message, *, udp: bool) -> bytes:
    limit = 65535
    if udp:
        limit = max(512, query.payload) if query.edns >= 0 else 512
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        # Too big for UDP: an empty answer with TC tells the client to ask again over TCP.
        truncated = dns.message.make_response(query, recursion_available=True)
        truncated.flags |= dns.flags.AA | dns.flags.TC
        return truncated.to_wire(max_size=limit)


# --- sockets ------------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: DNSServer) -> None:
        self.address_family = _family(address[0])  # read by UDPServer.__init__
        self.owner = owner
        super().__init__(address, _UDPHandler)


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restarted server must not wait out TIME_WAIT

    def __init__(self, address: tuple[str, int], owner: DNSServer) -> None:
        self.address_family = _family(address[0])
        self.owner = owner
        super().__init__(address, _TCPHandler)


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        owner = self.server.owner
        owner.note("udp", self.client_address[0], data)
        reply = owner.records.respond(data, udp=True)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        owner = self.server.owner
        sock.settimeout(_TCP_IDLE)
        with contextlib.suppress(OSError):
            while (header := _recv_exactly(sock, 2)) is not None:
                data = _recv_exactly(sock, struct.unpack("!H", header)[0])
                if data is None:
                    return
                owner.note("tcp", self.client_address[0], data)
                reply = owner.records.respond(data, udp=False)
                if reply is not None:  # a "timeout" name: stay silent, keep the connection
                    sock.sendall(struct.pack("!H", len(reply)) + reply)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class DNSServer:
    """UDP and TCP listeners on one address and port, answering from `records`.

    `records` may be replaced while running (one attribute assignment) to change the data.
    `queries` lists every query received as (transport, "name. TYPE"), e.g.
    ("udp", "example.com. MX").
    """

    def __init__(
        self, records: Records, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False
    ) -> None:
        self.records = records
        self.host = host
        self.port = port
        self.verbose = verbose
        self.queries: list[tuple[str, str]] = []
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    def note(self, transport: str, client: str, wire: bytes) -> None:
        """Remember (and with `verbose`, log) one query, for tests to inspect."""
        question = self.records.describe(wire)
        self.queries.append((transport, question))
        if self.verbose:
            print(f"dnsserver: {transport} {client} {question}", file=sys.stderr, flush=True)

    def start(self) -> tuple[str, int]:
        udp, tcp = self._bind()
        self._servers = [udp, tcp]
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self.host, self.port

    def _bind(self) -> tuple[_UDPServer, _TCPServer]:
        # With port 0 the kernel picks a free UDP port; TCP must then get the same number,
        # which someone else may hold, so try a few.
        for _attempt in range(20):
            udp = _UDPServer((self.host, self.port), self)
            port = udp.server_address[1]
            try:
                tcp = _TCPServer((self.host, port), self)
            except OSError:
                udp.server_close()
                if self.port:
                    raise
                continue
            self.port = port
            return udp, tcp
        raise OSError(f"no free port for both UDP and TCP on {self.host}")

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []


@contextlib.contextmanager
def serve(*zone_texts: str, host: str = "127.0.0.1") -> Iterator[DNSServer]:
    """Serve the zone texts on `host` and a free port for the duration of a `with` block."""
    server = DNSServer(Records(*zone_texts), host)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- command line ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--listen",
        action="append",
        required=True,
        metavar="ADDR",
        help="IPv4 or IPv6 address to serve on (repeatable)",
    )
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument(
        "--zone",
        action="append",
        required=True,
        metavar="FILE",
        help="master-format zone file (repeatable)",
    )
    parser.add_argument("--verbose", action="store_true", help="log each query to stderr")
    args = parser.parse_args(argv)
    try:
        records = Records(
            *(Path(f).read_text(encoding="utf-8") for f in args.zone), filenames=tuple(args.zone)
        )
    except (OSError, ValueError, dns.exception.DNSException) as e:
        print(f"dnsserver: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    servers = []
    try:
        for host in args.listen:
            server = DNSServer(records, host, args.port, verbose=args.verbose)
            server.start()
            servers.append(server)
            print(f"dnsserver: listening on {host} port {server.port}", flush=True)
    except (OSError, ValueError) as e:
        print(f"dnsserver: cannot listen: {e}", file=sys.stderr)
        for server in servers:
            server.stop()
        return 1
    stop.wait()
    for server in servers:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
