"""`mailerd queue` (commands/queue.py) in-process, on a queue in tmp_path: the listing of damaged
envelopes and of text from outside, and when a delete may touch the files itself. No daemon is
run: a socket that never answers, or one nobody listens on, stands in for what the tool meets."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time

import pytest

from mailerd.commands import queue as command
from mailerd.delivery.queue import Queue, QueueItem, Recipient
from mailerd.ipc import channel
from mailerd.ipc.messages import Deleted

HEAD = b"Received: from client.test by mx.example.org; Mon, 20 Nov 2023 10:00:00 +0000\r\n"


@pytest.fixture
def q(tmp_path):
    queue = Queue(tmp_path / "queue")
    queue.create_dirs()
    return queue


def queued(q: Queue, queue_id: str, sender: str = "alice@example.org", **fields) -> QueueItem:
    item = QueueItem(queue_id, sender, [Recipient("bob@example.net")], **fields)
    q.put(item, HEAD, b"Subject: s\r\n\r\nbody\r\n")
    return item


def mailq(q: Queue, capsys, *args: str) -> tuple[int, str, str]:
    status = command.main(["-q", str(q.root), *args])
    out, err = capsys.readouterr()
    return status, out, err


# -- damaged envelopes (attacker's pass 7b, F3) ----------------------------------------------


def test_the_listing_names_damaged_envelopes_and_does_not_crash_on_them(q, capsys):
    """A `null` next_attempt made `mailerd queue` die with a TypeError; a truncated envelope
    was left out of the listing without a word."""
    queued(q, "1GOOD")
    bad = json.loads(queued(q, "1NULL").to_json())
    bad["next_attempt"] = None
    (q.root / "env" / "1NULL").write_text(json.dumps(bad))
    (q.root / "env" / "1CUT").write_bytes(b'{"id": "1CUT", "sen')
    (q.root / "corrupt" / "1OLD.env").write_bytes(b"{")
    (q.root / "corrupt" / "1OLD.msg").write_bytes(HEAD)
    status, out, err = mailq(q, capsys)
    assert status == 0, err
    assert "1GOOD" in out and "1 message(s)" in out
    assert "-- 1 KiB in 1 message(s)" in out  # (rounded up: a small message said "0 KiB")
    assert f"-- 1 damaged message(s) set aside in {q.root / 'corrupt'}, not delivered: 1OLD" in out
    [cut] = [line for line in out.splitlines() if "1CUT" in line]
    [null] = [line for line in out.splitlines() if "1NULL" in line]
    assert cut.startswith("-- damaged envelope 1CUT (not JSON")
    assert null.startswith("-- damaged envelope 1NULL (envelope: next_attempt is NoneType")
    assert "set aside in corrupt/ when mailerd starts" in null
    assert (q.root / "env" / "1NULL").exists(), "a look moves nothing"


# -- text from outside (F2) ------------------------------------------------------------------

HOSTILE = "\u009b2J\u009b8mhidden\u009b0m\u202eelpmaxe-knab@evil.test"


def test_the_listing_escapes_what_a_terminal_would_act_on(q, capsys):
    """A remote client's MAIL FROM with U+009B (CSI to xterm) and U+202E (a bidi override)
    reached the administrator's terminal raw; a remote server's reply may carry ESC."""
    item = queued(q, "1EVIL", sender=HOSTILE)
    item.recipients = [Recipient("\u202ebob@example.net", last_error="451 4.3.0 \x1b[2Jgone")]
    q.update(item)
    status, out, err = mailq(q, capsys)
    assert status == 0, err
    assert all(line.isprintable() for line in out.splitlines())
    assert "\\x9b2J\\x9b8mhidden\\x9b0m\\x202eelpmaxe-knab@evil.test" in out
    assert "<\\x202ebob@example.net>" in out
    assert "451 4.3.0 \\x1b[2Jgone" in out


def test_the_listing_keeps_printable_non_ascii_as_it_is(q, capsys):
    queued(q, "1UTF8", sender="josé@exämple.org")
    assert "<josé@exämple.org>" in mailq(q, capsys)[1]


# -- delete: the daemon's files are the daemon's (F6) ----------------------------------------


def test_a_daemon_that_does_not_answer_in_time_keeps_its_files(q, capsys, monkeypatch):
    """The tool took a daemon busy with the message (its attempt at a slow server) for no
    daemon, removed the files under it, said "deleted", and the message went all the same."""
    monkeypatch.setattr(command, "TIMEOUT", 0.3)
    queued(q, "1BUSY")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(q.root / "private" / "delivery.sock"))
        silent.listen()  # (connects succeed; nobody answers)
        began = time.monotonic()
        status, out, err = mailq(q, capsys, "delete", "1BUSY")
    assert status == 1 and out == ""
    assert "no answer from mailerd: no answer in time" in err and "nothing deleted" in err
    assert q.ids() == {"1BUSY"} and q.message_path("1BUSY").exists()
    assert time.monotonic() - began < 5


def test_with_no_daemon_a_delete_removes_the_files(q, capsys):
    queued(q, "1GONE")
    queued(q, "1KEEP")
    status, out, err = mailq(q, capsys, "delete", "1GONE", "1NEVER")
    assert status == 1, err  # (one of them was not in the queue)
    assert out.splitlines() == ["1GONE: deleted", "1NEVER: not in the queue"]
    assert q.ids() == {"1KEEP"}


def test_with_no_daemon_a_delete_takes_only_the_queues_own_ids(q, capsys, tmp_path):
    """A reviewer's finding: the ID was joined to the queue's env/ and msg/ unchecked, so an
    absolute path or one with `..` deleted any file the user may delete (root's, run as
    root), and "" died with a traceback. Only a name the queue lists is one of its IDs."""
    queued(q, "1KEEP")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (q.root / "zz").mkdir()
    (q.root / "zz" / "victim").write_text("keep me too")
    names = [str(victim), "../zz/victim", "", ".", "..", "1KEEP/../1KEEP"]
    status, out, err = mailq(q, capsys, "delete", *names)
    assert status == 1, err
    assert out.splitlines() == [f"{name}: not in the queue" for name in names], out
    assert victim.read_text() == "keep me"
    assert (q.root / "zz" / "victim").exists()
    assert q.ids() == {"1KEEP"} and q.message_path("1KEEP").exists()
    assert "Traceback" not in err
    # An attacker's pass: a name the queue lists that is no envelope (a directory there, a
    # dot file) died with a traceback, or was deleted.
    (q.root / "env" / "1DIR").mkdir()
    (q.root / "env" / ".hidden").write_text("x")
    status, out, err = mailq(q, capsys, "delete", "1DIR", ".hidden")
    assert status == 1 and "Traceback" not in err, err
    lines = out.splitlines()
    assert lines[0].startswith("1DIR: cannot delete: ") and lines[1] == ".hidden: not in the queue"
    assert (q.root / "env" / ".hidden").exists()


def test_a_socket_nobody_listens_on_is_no_daemon(q, capsys):
    """A daemon that died left its socket: connecting is refused, and the tool does it."""
    queued(q, "1GONE")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(q.root / "private" / "delivery.sock"))
    status, out, err = mailq(q, capsys, "delete", "1GONE")
    assert (status, out) == (0, "1GONE: deleted\n"), err
    assert q.ids() == set()


def test_a_list_from_a_daemon_that_does_not_answer_shows_the_files_and_says_so(
    q, capsys, monkeypatch
):
    monkeypatch.setattr(command, "TIMEOUT", 0.3)
    queued(q, "1SLOW")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(q.root / "private" / "delivery.sock"))
        silent.listen()
        status, out, err = mailq(q, capsys)
    assert status == 0 and "1SLOW" in out
    assert (
        "no answer from mailerd: no answer in time" in err
        and "the queue's files, as they are" in err
    )


def test_the_daemon_s_answer_for_a_message_being_delivered_is_said(tmp_path, capsys):
    answer = Deleted.decode(json.loads(json.dumps(Deleted(("1A", "1B"), ("1B",)).encode())))
    assert answer == Deleted(("1A", "1B"), ("1B",))
    assert Deleted.decode({"ids": ["1A"]}) == Deleted(("1A",))  # (an older daemon's answer)
    assert command._delete(tmp_path, ["1A", "1B", "1C"], answer) == 1
    assert capsys.readouterr().out.splitlines() == [
        "1A: deleted",
        "1B: being delivered now; removed when this attempt ends, unless it delivers it",
        "1C: not in the queue",
    ]


@pytest.mark.parametrize("action", [["flush"], ["delete", "1KEEP"]])
def test_a_refusal_from_the_daemon_is_said_and_nothing_is_done(q, capsys, monkeypatch, action):
    """The daemon refuses a flush or a delete it cannot do in time (its queue still the
    previous process's, after a reload): the tool says so and exits 1, and does not take the
    refusal for an answer (it read "flushed: 0", "not in the queue")."""
    queued(q, "1KEEP")

    async def refused(queue_dir, request):
        return {"error": "the previous delivery process still has the queue; nothing done"}

    monkeypatch.setattr(command, "_ask", refused)
    status, out, err = mailq(q, capsys, *action)
    assert (status, out) == (1, ""), (status, out, err)
    said = "the previous delivery process still has the queue; nothing done"
    assert err == f"mailerd queue: mailerd: {said}\n"
    assert q.ids() == {"1KEEP"}


def test_a_daemon_s_listing_of_a_big_queue_is_shown(q, capsys):
    """Thousands of messages for a destination down for days: the daemon's listing is larger
    than a request's header may be (1 MiB, from about 3,000 messages on), and the tool read it
    as a broken channel ("no answer from mailerd: peer process went away") and listed the
    files instead, without what only the daemon knows (a scale pass)."""
    items = [
        dataclasses.asdict(QueueItem(f"1BIG{n:05d}", "alice@example.org", [Recipient("b@x.test")]))
        for n in range(5000)
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as daemon:
        daemon.bind(str(q.root / "private" / "delivery.sock"))
        daemon.listen()

        def answer() -> None:
            conn, _ = daemon.accept()
            with conn:
                length = channel.PREFIX.unpack(conn.recv(channel.PREFIX.size))[0]
                request = json.loads(conn.recv(length, socket.MSG_WAITALL))
                conn.sendall(channel.frame({"id": request["id"], "items": items}))
                conn.recv(1)  # (until the tool has read it and closed)

        thread = threading.Thread(target=answer)
        thread.start()
        status, out, err = mailq(q, capsys)
        thread.join()
    assert len(channel.frame({"items": items})) > channel.MAX_HEADER
    assert (status, err) == (0, "")
    assert "1BIG04999" in out and "in 5000 message(s)" in out
