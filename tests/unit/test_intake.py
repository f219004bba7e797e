"""intake: a reply survives the trip through a commit's answer unchanged; local copies are
logged each with its mailbox."""

import asyncio
import logging

from mailerd import intake
from mailerd.ipc.messages import Outcome, Target
from mailerd.smtp.events import Reply


def test_a_reply_round_trips_through_its_answer_fields():
    for reply in (intake.queued("Q1"), Reply(452, "4.3.1", "Insufficient system storage")):
        assert intake.reply_of(Outcome.decode(intake.outcome(reply).encode())) == reply


def test_each_failed_copy_is_logged_with_its_mailbox(caplog):
    """An alias's copies share its address: a failed one is told apart by its mailbox."""
    team = "team@example.org"

    async def write(mailbox: str, head: bytes, body: bytes) -> int:
        if mailbox == "alice":
            raise OSError(28, "No space left on device")
        return 7

    targets = [Target(team, "alice"), Target(team, "bob"), Target("x@example.net", None)]
    with caplog.at_level(logging.INFO, logger="mailerd"):
        failed = asyncio.run(
            intake.write_local(write, "Q1", "z@example.net", b"", b"body", targets)
        )
    assert [(target.mailbox, str(exc)) for target, exc in failed] == [
        ("alice", "[Errno 28] No space left on device")
    ]
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        line.startswith(f"Q1: to=<{team}>, relay=local, status=deferred (mailbox alice: ")
        for line in lines
    ), lines
    assert f"Q1: to=<{team}>, relay=local, status=sent (mailbox bob, message 7)" in lines, lines
