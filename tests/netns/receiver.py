"""A scriptable receiving SMTP server for the outbound tests (aiosmtpd), one per address.

    python tests/netns/receiver.py --listen ADDR:PORT --spool DIR --script FILE

``ADDR`` may be ``[2001:db8::12]``. It records, under DIR:

- ``transactions/<seq>.json``: one file per DATA that completed (accepted or not), written
  atomically: ``mail_from`` ("" for ``<>``), ``mail_options``, ``rcpt_tos`` (accepted RCPTs),
  ``data`` (latin-1 text of the exact bytes), ``reply`` (what we answered to the data),
  ``accepted`` (bool), ``peer``, ``helo``, ``tls`` (bool), ``auth_user`` (or null), ``conn``.
- ``events.jsonl``: one line per connection and per MAIL/RCPT/AUTH/STARTTLS/DATA/QUIT with our
  reply (and a ``drop`` line where a rule dropped the connection).
- ``ready``: written once the socket is listening.

The script (JSON) is re-read whenever its mtime changes, at each connection and each MAIL:

    {
      "hostname": "mx1.pref.test",          # name in our banner and EHLO reply
      "tarpit": false,                      # accept TCP, then send nothing at all
      "8bitmime": true,                     # false: EHLO does not offer 8BITMIME
      "smtputf8": true,                     # false: EHLO does not offer SMTPUTF8
      "tls": {"cert": "c.pem", "key": "k.pem"},           # offer STARTTLS (optional)
      "auth": {"user": "u", "password": "p",             # require AUTH before MAIL (optional)
               "mechanisms": ["PLAIN", "LOGIN"], "require_tls": true},
      "rules": [                            # first matching active rule wins
        {"id": "r1", "match": "bad*@partial.test", "at": "rcpt",
         "reply": "550 5.1.1 <{rcpt}>: no such user (mx1 marker)"},
        {"id": "r2", "match": "*@retry.test", "at": "data", "first": 2,
         "reply": "451 4.3.0 try again later"}
      ]
    }

A rule's ``match`` is an fnmatch pattern on the lower-cased address (the recipient; the sender
for ``"at": "mail"``). ``at`` is ``mail``, ``rcpt`` or ``data`` (``data``: answered after the
data of a transaction with a matching accepted recipient). ``first: N`` makes the rule apply to
the first N transactions it matches and then never again (counted per rule ``id``); without it
the rule always applies. A rule whose reply is ``"drop"`` closes the connection instead of
answering (at ``mail`` or ``rcpt``).
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import itertools
import json
import logging
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword


class Script:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.mtime: int | None = None
        self.data: dict[str, Any] = {}
        self.hits: dict[str, int] = {}  # rule id -> transactions it applied to
        self.reload()

    def reload(self) -> dict[str, Any]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return self.data
        if mtime != self.mtime:
            self.data = json.loads(self.path.read_text())
            self.mtime = mtime
        return self.data

    def rule_for(self, at: str, address: str, counted: set[str]) -> dict[str, Any] | None:
        """The first active rule for this address at this stage; counts it once per transaction."""
        for index, rule in enumerate(self.data.get("rules", [])):
            if rule.get("at", "rcpt") != at:
                continue
            if not fnmatch.fnmatchcase(address.lower(), rule["match"].lower()):
                continue
            rid = str(rule.get("id", index))
            first = rule.get("first")
            if first is not None and rid not in counted and self.hits.get(rid, 0) >= first:
                continue
            if rid not in counted:
                counted.add(rid)
                self.hits[rid] = self.hits.get(rid, 0) + 1
            return rule
        return None


class Recorder:
    def __init__(self, spool: Path) -> None:
        self.spool = spool
        (spool / "transactions").mkdir(parents=True, exist_ok=True)
        self.events = open(spool / "events.jsonl", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.seq = itertools.count(1)

    def event(self, conn: int, kind: str, **fields: Any) -> None:
        record = {"t": time.time(), "conn": conn, "event": kind, **fields}
        self.events.write(json.dumps(record) + "\n")

    def transaction(self, record: dict[str, Any]) -> None:
        name = f"{next(self.seq):06d}.json"
        tmp = self.spool / "transactions" / f".{name}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.spool / "transactions" / name)


def _reply_text(rule: dict[str, Any], address: str) -> str:
    return str(rule["reply"]).replace("{rcpt}", address)


class Handler:
    def __init__(self, script: Script, recorder: Recorder) -> None:
        self.script = script
        self.rec = recorder

    @staticmethod
    def _state(server: SMTP) -> dict[str, Any]:
        state = getattr(server, "_test_state", None)
        if state is None:
            state = server._test_state = {"counted": set(), "rejected": []}  # type: ignore[attr-defined]
        return state

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.script.reload()
        state = self._state(server)
        state["counted"] = set()
        state["rejected"] = []
        sender = "" if address in ("<>", "") else address
        rule = self.script.rule_for("mail", sender, state["counted"])
        if rule and rule["reply"] == "drop":
            return self._drop(server, "MAIL", sender)
        reply = _reply_text(rule, sender) if rule else "250 2.1.0 OK"
        if not rule:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        self.rec.event(server._test_conn, "MAIL", arg=sender, options=mail_options, reply=reply)
        return reply

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        state = self._state(server)
        rule = self.script.rule_for("rcpt", address, state["counted"])
        if rule and rule["reply"] == "drop":
            return self._drop(server, "RCPT", address)
        if rule:
            reply = _reply_text(rule, address)
            state["rejected"].append([address, reply])
        else:
            reply = "250 2.1.5 OK"
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        self.rec.event(server._test_conn, "RCPT", arg=address, reply=reply)
        return reply

    def _drop(self, server, at: str, arg: str) -> str:
        """Close the connection without an answer (what we return is never sent)."""
        self.rec.event(server._test_conn, "drop", at=at, arg=arg)
        server.transport.close()
        return "421 4.4.2 dropped"

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname  # (this form of the hook must set it itself)
        if not self.script.data.get("8bitmime", True):
            responses = [r for r in responses if r[4:].upper() != "8BITMIME"]
        return responses

    async def handle_QUIT(self, server, session, envelope):
        self.rec.event(server._test_conn, "QUIT", reply="221 Bye")
        return MISSING

    async def handle_RSET(self, server, session, envelope):
        self.rec.event(server._test_conn, "RSET", reply="250 OK")
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        state = self._state(server)
        reply = "250 2.0.0 OK: stored"
        for address in envelope.rcpt_tos:
            rule = self.script.rule_for("data", address, state["counted"])
            if rule:
                reply = _reply_text(rule, address)
                break
        sender = "" if envelope.mail_from in ("<>", "") else envelope.mail_from
        auth = session.auth_data
        self.rec.transaction(
            {
                "t": time.time(),
                "conn": server._test_conn,
                "peer": list(session.peer) if session.peer else None,
                "helo": session.host_name,
                "tls": session.ssl is not None,
                "auth_user": auth.login.decode() if isinstance(auth, LoginPassword) else None,
                "mail_from": sender,
                "mail_options": envelope.mail_options,
                "rcpt_tos": list(envelope.rcpt_tos),
                "rejected_rcpts": state["rejected"],
                "data": envelope.original_content.decode("latin-1"),
                "reply": reply,
                "accepted": reply.startswith("2"),
            }
        )
        self.rec.event(server._test_conn, "DATA", reply=reply, rcpt_tos=list(envelope.rcpt_tos))
        return reply

    async def handle_AUTH(self, server, session, envelope, args):
        self.rec.event(server._test_conn, "AUTH", mechanism=args[0] if args else None)
        return MISSING  # let aiosmtpd run the mechanism with our authenticator


class Tarpit(asyncio.Protocol):
    """Accepts and then says nothing; holds the connection until the peer gives up."""

    def __init__(self, rec: Recorder, conn: int) -> None:
        self.rec = rec
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.rec.event(self.conn, "tarpit", peer=list(transport.get_extra_info("peername")))

    def data_received(self, data: bytes) -> None:
        self.rec.event(self.conn, "tarpit-data", size=len(data))


def make_factory(script: Script, rec: Recorder, handler: Handler):
    counter = itertools.count(1)

    def authenticator(server, session, envelope, mechanism, auth_data):
        conf = script.data.get("auth") or {}
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == conf.get("user")
            and auth_data.password.decode() == conf.get("password")
        )
        rec.event(
            server._test_conn,
            "AUTH-RESULT",
            mechanism=mechanism,
            user=auth_data.login.decode() if isinstance(auth_data, LoginPassword) else None,
            tls=session.ssl is not None,
            ok=ok,
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def factory() -> asyncio.Protocol:
        conf = script.reload()
        conn = next(counter)
        if conf.get("tarpit"):
            return Tarpit(rec, conn)
        tls_context = None
        if conf.get("tls"):
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_context.load_cert_chain(conf["tls"]["cert"], conf["tls"]["key"])
        auth = conf.get("auth")
        kwargs: dict[str, Any] = {}
        if auth:
            mechanisms = {m.upper() for m in auth.get("mechanisms", ["PLAIN", "LOGIN"])}
            kwargs = {
                "auth_required": True,
                "auth_require_tls": bool(auth.get("require_tls", True)),
                "authenticator": authenticator,
                "auth_exclude_mechanism": [m for m in ("PLAIN", "LOGIN") if m not in mechanisms],
            }
        server = SMTP(
            handler,
            hostname=conf.get("hostname", "receiver.test"),
            ident="test receiver",
            tls_context=tls_context,
            enable_SMTPUTF8=bool(conf.get("smtputf8", True)),
            timeout=60,
            **kwargs,
        )
        server._test_conn = conn  # type: ignore[attr-defined]
        original = server.connection_made

        def connection_made(transport: asyncio.BaseTransport) -> None:
            if getattr(server, "_test_seen", False):
                rec.event(conn, "STARTTLS-done")
            else:
                server._test_seen = True  # type: ignore[attr-defined]
                rec.event(conn, "connect", peer=list(transport.get_extra_info("peername")))
            original(transport)

        server.connection_made = connection_made  # type: ignore[method-assign]
        return server

    return factory


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def main_async(args: argparse.Namespace) -> None:
    spool = Path(args.spool)
    spool.mkdir(parents=True, exist_ok=True)
    script = Script(Path(args.script))
    rec = Recorder(spool)
    handler = Handler(script, rec)
    host, port = parse_listen(args.listen)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        make_factory(script, rec, handler), host=host, port=port, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    (spool / "ready").write_text(str(os.getpid()))
    await stop.wait()
    server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="ADDR:PORT ([v6]:PORT)")
    parser.add_argument("--spool", required=True, help="directory for what is received")
    parser.add_argument("--script", required=True, help="JSON behaviour script")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
