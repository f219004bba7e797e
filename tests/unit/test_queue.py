"""The durable outbound queue (delivery/queue.py) on real files: what put() stores and read()/load()
give back, atomic envelope updates, crash debris at start-up, and the layout create_dirs() makes
without following a link planted in it. Needs no root."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time

import pytest

from mailerd.delivery import queue as queue_mod
from mailerd.delivery.queue import DEBRIS_AGE, SUBDIRS, Queue, QueueItem, Recipient
from mailerd.ipc.maildrop import MAILDROP, PICKUP_FIFO, PUBLIC

HEAD = b"Received: from client.test by mx.example.org; Mon, 20 Nov 2023 10:00:00 +0000\r\n"
BODY = b"Subject: hello\r\n\r\nbody line\r\n.leading dot\r\n"


@pytest.fixture
def q(tmp_path):
    queue = Queue(tmp_path / "queue")
    queue.create_dirs()
    return queue


def full_item(queue_id: str = "1ABC") -> QueueItem:
    """An item with no field at its default (and non-ASCII text, kept as UTF-8)."""
    return QueueItem(
        id=queue_id,
        sender="josé@example.org",
        recipients=[
            Recipient("bob@example.net", None, "pending", 2, "451 4.3.0 try again later"),
            Recipient("carol@example.org", "carol", "sent", 1, ""),
            Recipient("dave@example.com", None, "bounced", 3, "550 5.1.1 no such user"),
        ],
        created=1700000000.25,
        next_attempt=1700000600.5,
        size=0,  # put() sets it
        smtputf8=True,
        body_8bit=True,
        warned=True,
        inbound=True,
        sender_spf="softfail",
    )


def env_names(q: Queue) -> set[str]:
    return set(os.listdir(q.root / "env"))


def listing(q: Queue) -> dict[str, tuple[bytes, float]]:
    """Every file below env/ and msg/ with its content and mtime."""
    found = {}
    for sub in ("env", "msg"):
        for name in os.listdir(q.root / sub):
            path = q.root / sub / name
            found[f"{sub}/{name}"] = (path.read_bytes(), path.stat().st_mtime)
    return found


def age(path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


# -- put, read, load, update, remove ----------------------------------------------------------


def test_put_then_read_and_load_give_every_field_back(q):
    item = full_item()
    q.put(item, HEAD, BODY)
    assert item.size == len(HEAD) + len(BODY)
    assert q.message_path(item.id).read_bytes() == HEAD + BODY
    expected = full_item()
    expected.size = len(HEAD) + len(BODY)
    assert q.read(item.id) == expected
    assert q.load() == [expected]
    assert q.ids() == {item.id}
    # Every field is in the envelope, and text stays UTF-8 (not \u escapes).
    raw = (q.root / "env" / item.id).read_bytes()
    assert "josé@example.org".encode() in raw
    assert set(json.loads(raw)) == set(QueueItem.__dataclass_fields__)


def test_put_takes_a_body_from_a_file_descriptor(q, tmp_path):
    spill = tmp_path / "spill"
    spill.write_bytes(BODY)
    fd = os.open(spill, os.O_RDONLY)
    try:
        item = QueueItem("1FD", "alice@example.org", [Recipient("bob@example.net")])
        q.put(item, HEAD, fd)
    finally:
        os.close(fd)
    assert q.message_path("1FD").read_bytes() == HEAD + BODY
    assert q.read("1FD").size == len(HEAD) + len(BODY)


def test_load_returns_every_item_in_id_order(q):
    for queue_id in ("1C", "1A", "1B"):
        q.put(QueueItem(queue_id, "a@example.org", [Recipient("b@example.net")]), HEAD, BODY)
    assert [item.id for item in q.load()] == ["1A", "1B", "1C"]
    assert q.ids() == {"1A", "1B", "1C"}


def test_read_of_an_unknown_id_is_none(q):
    assert q.read("NOPE") is None


def test_update_replaces_the_envelope_atomically(q):
    item = full_item()
    q.put(item, HEAD, BODY)
    env = q.root / "env" / item.id
    before = env.read_bytes()
    old_inode = env.stat().st_ino
    with open(env, "rb") as reader:  # opened before the update, read after it
        item.recipients[0].state = "sent"
        item.recipients[0].attempts = 3
        item.recipients[0].last_error = ""
        item.next_attempt = 0.0
        item.warned = False
        q.update(item)
        # A new file renamed over the old one: whoever had the old one open still reads it
        # whole (an in-place rewrite would have truncated it under the reader).
        assert reader.read() == before
    assert env.stat().st_ino != old_inode
    assert env_names(q) == {item.id}, "a temporary file was left behind"
    assert q.read(item.id) == item
    assert q.message_path(item.id).read_bytes() == HEAD + BODY  # the message is untouched


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"{not json",
        b'{"id": "1BAD"}',
        b'{"id": "1BAD", "sender": "", "recipients": [{}]}',
        b"[1, 2]",
        b"\xff\xfe{",
        b"[" * 100_000,
    ],
    ids=["empty", "not-json", "fields-missing", "bad-recipient", "not-object", "not-utf8", "deep"],
)
def test_an_unreadable_envelope_is_set_aside_whole_for_a_human(q, garbage, caplog):
    """A damaged item costs only itself: the others load, and its envelope and message are
    moved, intact, into corrupt/ (never attempted, never deleted), with one log line."""
    good = full_item("1GOOD")
    q.put(good, HEAD, BODY)
    (q.root / "msg" / "1BAD").write_bytes(HEAD + BODY)
    (q.root / "env" / "1BAD").write_bytes(garbage)
    age(q.root / "msg" / "1BAD", 2 * DEBRIS_AGE)  # old, but it has an envelope: not debris
    assert [item.id for item in q.load(clean=True)] == ["1GOOD"]
    assert q.read("1BAD") is None
    assert (q.root / "corrupt" / "1BAD.env").read_bytes() == garbage
    assert (q.root / "corrupt" / "1BAD.msg").read_bytes() == HEAD + BODY
    assert q.ids() == {"1GOOD"}
    assert q.damaged() == ["1BAD"]
    [line] = [r.getMessage() for r in caplog.records if "1BAD" in r.getMessage()]
    assert "damaged envelope" in line and "corrupt" in line
    assert [item.id for item in q.load(clean=True)] == ["1GOOD"]  # (and said once)
    assert len([r for r in caplog.records if "1BAD" in r.getMessage()]) == 1


class _Gone:
    """A field left out of the envelope (None is JSON's null)."""

    def __repr__(self) -> str:
        return "GONE"


GONE = _Gone()


def stored(**changes) -> bytes:
    """A good envelope's JSON (id 1X) with some fields changed, or left out (GONE)."""
    raw = json.loads(full_item("1X").to_json())
    for name, value in changes.items():
        if value is GONE:
            del raw[name]
        else:
            raw[name] = value
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"next_attempt": None},
        {"next_attempt": "soon"},
        {"created": float("nan")},
        {"created": 10**400},  # (a whole number no float holds: once an OverflowError)
        {"created": GONE},
        {"id": 7},
        {"sender": None},
        {"recipients": {}},
        {"recipients": ["bob@example.net"]},
        {"size": 1.5},
        {"size": -1},
        {"smtputf8": 1},
        {"warned": "yes"},
        {"inbound": 1},
        {"sender_spf": None},
        {"id": "1OTHER"},
    ],
    ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()),
)
def test_a_field_of_the_wrong_type_makes_the_envelope_damaged(q, changes):
    """A `null` next_attempt once loaded, and then killed the scheduler's heap (and with it
    all outbound mail) at its first comparison: every field's type is checked at the load."""
    (q.root / "env" / "1X").write_bytes(stored(**changes))
    (q.root / "msg" / "1X").write_bytes(HEAD)
    assert q.load() == []
    assert q.damaged() == ["1X"]


@pytest.mark.parametrize(
    "recipient",
    [
        {"address": GONE},
        {"mailbox": 3},
        {"state": "lost"},
        {"attempts": True},
        {"last_error": None},
    ],
    ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()),
)
def test_a_recipient_field_of_the_wrong_type_makes_the_envelope_damaged(q, recipient):
    fields = {"address": "bob@example.net"} | recipient
    fields = {k: v for k, v in fields.items() if v is not GONE}
    (q.root / "env" / "1X").write_bytes(stored(recipients=[fields]))
    assert q.load() == []
    assert q.damaged() == ["1X"]


def test_unknown_fields_are_ignored_and_missing_ones_take_their_default(q):
    """A newer mailerd may write fields this one does not know (a downgrade must not strand
    the queue); an older one wrote fewer."""
    raw = json.loads(stored(warned=GONE, size=GONE, body_8bit=GONE, next_attempt=GONE))
    raw["priority"] = 1
    raw["recipients"][0]["dsn_notify"] = ["FAILURE"]
    del raw["recipients"][0]["attempts"]
    (q.root / "env" / "1X").write_bytes(json.dumps(raw).encode())
    [item] = q.load()
    assert (item.warned, item.size, item.body_8bit, item.next_attempt) == (False, 0, False, 0.0)
    assert item.recipients[0] == Recipient(
        "bob@example.net", None, "pending", 0, "451 4.3.0 try again later"
    )
    assert item.created == 1700000000.25 and item.smtputf8 is True
    assert q.damaged() == []


def test_an_envelope_from_before_inbound_and_sender_spf_is_the_owner_s_mail(q):
    """Envelopes an older mailerd wrote have neither field: their mail is taken for the
    owner's (bounced as before), with no SPF result."""
    (q.root / "env" / "1X").write_bytes(stored(inbound=GONE, sender_spf=GONE))
    [item] = q.load()
    assert (item.inbound, item.sender_spf) == (False, "")
    assert q.damaged() == []


def test_an_integer_time_is_read_as_a_number(q):
    (q.root / "env" / "1X").write_bytes(stored(created=1700000000, next_attempt=0))
    [item] = q.load()
    assert item.created == 1700000000.0 and isinstance(item.next_attempt, float)


def test_a_look_without_clean_moves_nothing_and_says_what_it_could_not_read(q):
    q.put(full_item("1GOOD"), HEAD, BODY)
    (q.root / "env" / "1BAD").write_bytes(stored(next_attempt="soon"))
    assert [item.id for item in q.load(clean=False)] == ["1GOOD"]
    assert (q.root / "env" / "1BAD").exists() and q.damaged() == []
    assert list(q.unreadable) == ["1BAD"] and "next_attempt" in q.unreadable["1BAD"]


def test_remove_deletes_both_files(q):
    keep = QueueItem("1KEEP", "a@example.org", [Recipient("b@example.net")])
    gone = QueueItem("1GONE", "a@example.org", [Recipient("b@example.net")])
    q.put(keep, HEAD, BODY)
    q.put(gone, HEAD, BODY)
    q.remove("1GONE")
    assert not (q.root / "env" / "1GONE").exists()
    assert not q.message_path("1GONE").exists()
    assert q.ids() == {"1KEEP"}
    assert [item.id for item in q.load()] == ["1KEEP"]
    assert q.message_path("1KEEP").exists()
    q.remove("1GONE")  # again, and an id never queued: no error
    q.remove("NEVER")


def test_ids_leaves_out_temporary_files(q):
    q.put(QueueItem("1A", "a@example.org", [Recipient("b@example.net")]), HEAD, BODY)
    (q.root / "env" / "1B.tmp4242").write_bytes(b"{")
    assert q.ids() == {"1A"}


# -- crash debris -----------------------------------------------------------------------------


def test_load_cleans_crash_debris(q):
    committed = QueueItem("1OK", "a@example.org", [Recipient("b@example.net")])
    q.put(committed, HEAD, BODY)
    age(q.message_path("1OK"), 2 * DEBRIS_AGE)  # an old message of a committed item stays
    old = q.root / "msg" / "1OLD"  # a crash between the message and its envelope, long ago
    old.write_bytes(HEAD)
    age(old, DEBRIS_AGE + 60)
    fresh = q.root / "msg" / "1FRESH"  # maybe a put() between its two writes right now
    fresh.write_bytes(HEAD)
    age(fresh, DEBRIS_AGE - 60)
    tmp = q.root / "env" / "1OK.tmp999"  # an update that never got renamed, long ago
    tmp.write_bytes(b'{"id": "1OK"')
    age(tmp, DEBRIS_AGE + 60)
    other_tmp = q.root / "env" / "1NEW.tmp1"
    other_tmp.write_bytes(b"")
    age(other_tmp, DEBRIS_AGE + 60)
    writing = q.root / "env" / "1NOW.tmp2"  # a worker's put() about to rename it: not debris
    writing.write_bytes(b'{"id": "1NOW"')

    items = q.load(clean=True)

    assert [item.id for item in items] == ["1OK"]
    assert not old.exists()
    assert fresh.read_bytes() == HEAD
    assert not tmp.exists() and not other_tmp.exists()
    assert writing.exists()
    assert env_names(q) == {"1OK", "1NOW.tmp2"}
    assert set(os.listdir(q.root / "msg")) == {"1OK", "1FRESH"}
    assert q.message_path("1OK").read_bytes() == HEAD + BODY


def test_clean_says_how_many_files_went_and_logs_it(q, caplog):
    old = q.root / "msg" / "1OLD"  # a kill between a remove()'s two unlinks, long ago
    old.write_bytes(HEAD)
    age(old, DEBRIS_AGE + 60)
    tmp = q.root / "env" / "1OLD.tmp7"
    tmp.write_bytes(b"{")
    age(tmp, DEBRIS_AGE + 60)
    fresh = q.root / "msg" / "1FRESH"
    fresh.write_bytes(HEAD)
    with caplog.at_level(logging.INFO, logger="mailerd.queue"):
        assert q.clean() == 2
        assert q.clean() == 0
    assert not old.exists() and not tmp.exists() and fresh.exists()
    said = [r.getMessage() for r in caplog.records]
    assert said == ["queue: removed 2 file(s) an interrupted write left over an hour ago"]


def test_load_without_clean_changes_nothing(q):
    q.put(QueueItem("1OK", "a@example.org", [Recipient("b@example.net")]), HEAD, BODY)
    (q.root / "msg" / "1OLD").write_bytes(HEAD)
    age(q.root / "msg" / "1OLD", 10 * DEBRIS_AGE)
    (q.root / "env" / "1OK.tmp999").write_bytes(b"{")
    (q.root / "env" / "1BAD").write_bytes(b"garbage")
    before = listing(q)
    assert [item.id for item in q.load(clean=False)] == ["1OK"]
    assert listing(q) == before


# -- the layout -------------------------------------------------------------------------------


@pytest.fixture
def strict_umask():
    """A umask that takes bits from every mode mkdir/mkfifo are given: only an explicit chmod
    gives the layout its modes."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def check_layout(root) -> None:
    for sub, mode in SUBDIRS.items():
        st = os.lstat(root / sub)
        assert stat.S_ISDIR(st.st_mode), sub
        assert stat.S_IMODE(st.st_mode) == mode, f"{sub}: {oct(stat.S_IMODE(st.st_mode))}"
    fifo = os.lstat(root / PUBLIC / PICKUP_FIFO)
    assert stat.S_ISFIFO(fifo.st_mode)
    assert stat.S_IMODE(fifo.st_mode) == queue_mod.PICKUP_MODE == 0o622
    assert stat.S_ISREG(os.lstat(root / "private" / "scheduler.lock").st_mode)


def test_create_dirs_gives_each_directory_its_mode(tmp_path, strict_umask):
    q = Queue(tmp_path / "a" / "queue")  # parents made too
    q.create_dirs()
    check_layout(q.root)
    assert SUBDIRS[MAILDROP] == 0o1733 and SUBDIRS[PUBLIC] == 0o755
    assert q.pickup_fifo == q.root / PUBLIC / PICKUP_FIFO


def test_create_dirs_again_repairs_modes_and_keeps_content(tmp_path, strict_umask):
    q = Queue(tmp_path / "queue")
    q.create_dirs()
    q.put(QueueItem("1A", "a@example.org", [Recipient("b@example.net")]), HEAD, BODY)
    for sub in SUBDIRS:
        os.chmod(q.root / sub, 0o777)
    os.chmod(q.pickup_fifo, 0o666)
    q.create_dirs()
    check_layout(q.root)
    assert q.read("1A") is not None and q.message_path("1A").read_bytes() == HEAD + BODY


def test_create_dirs_replaces_a_file_where_the_fifo_belongs(tmp_path, strict_umask):
    q = Queue(tmp_path / "queue")
    q.create_dirs()
    q.pickup_fifo.unlink()
    q.pickup_fifo.write_bytes(b"leftover")
    q.create_dirs()
    check_layout(q.root)


def _outcome(q: Queue) -> str:
    try:
        q.create_dirs()
    except OSError:
        return "refused"
    return "done"


@pytest.mark.parametrize("sub", sorted(SUBDIRS))
def test_create_dirs_does_not_follow_a_link_in_place_of_a_directory(tmp_path, strict_umask, sub):
    q = Queue(tmp_path / "queue")
    q.create_dirs()
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.chmod(target, 0o750)  # none of the layout's modes
    (target / "inside").write_bytes(b"x")
    planted = q.root / sub
    os.rename(planted, tmp_path / "moved-away")
    os.symlink(target, planted)

    outcome = _outcome(q)

    assert mode_of(target) == 0o750, f"create_dirs chmod'ed the target of a link ({outcome})"
    assert os.listdir(target) == ["inside"]
    if sub == PUBLIC:
        assert not (target / PICKUP_FIFO).exists()
    if sub == "private":
        assert not (target / "scheduler.lock").exists()
    if outcome == "done":  # replaced: then the layout is whole again
        check_layout(q.root)


@pytest.mark.parametrize("kind", ["file", "fifo", "dangling"])
def test_create_dirs_does_not_follow_a_link_in_place_of_the_fifo(tmp_path, strict_umask, kind):
    q = Queue(tmp_path / "queue")
    q.create_dirs()
    target = tmp_path / "target"
    if kind == "file":
        target.write_bytes(b"precious")
        os.chmod(target, 0o600)
    elif kind == "fifo":
        os.mkfifo(target, 0o600)
        os.chmod(target, 0o600)
    q.pickup_fifo.unlink()
    os.symlink(target, q.pickup_fifo)

    outcome = _outcome(q)

    if kind == "dangling":
        assert not os.path.lexists(target), "create_dirs made the target of a dangling link"
    else:
        assert mode_of(target) == 0o600, f"create_dirs chmod'ed the link's target ({outcome})"
    if kind == "file":
        assert target.read_bytes() == b"precious"
    if outcome == "done":
        check_layout(q.root)  # replaced by a FIFO of its own
    else:
        assert os.path.islink(q.pickup_fifo)


def test_create_dirs_does_not_follow_a_link_in_place_of_the_lock(tmp_path, strict_umask):
    q = Queue(tmp_path / "queue")
    q.create_dirs()
    target = tmp_path / "made-by-root"
    q.scheduler_lock.unlink()
    os.symlink(target, q.scheduler_lock)  # dangling: O_CREAT through it would make the target
    _outcome(q)
    assert not os.path.lexists(target)


def test_put_of_an_item_that_cannot_be_written_leaves_nothing(q):
    """An envelope with a lone surrogate cannot be UTF-8: refused before the message is written
    (which would stay, without an envelope, until the next start-up an hour later)."""
    item = QueueItem("1BAD", "a@\udcff", [Recipient("bob@example.net")])
    with pytest.raises(UnicodeEncodeError):
        q.put(item, HEAD, BODY)
    assert listing(q) == {}


def test_put_whose_envelope_cannot_be_written_removes_its_message(q, monkeypatch):
    """A full disk (or no inode left) after the message was written: the message file goes
    at once, not at the clean an hour later, for it holds the very space a retry needs (a
    scale pass: on a queue out of inodes, each 452 could leave one message file behind)."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(queue_mod.durable, "replace_synced", full)
    with pytest.raises(queue_mod.QueueWriteError):
        q.put(QueueItem("1FULL", "a@example.org", [Recipient("bob@example.net")]), HEAD, BODY)
    assert listing(q) == {}
