"""intake: a reply survives the trip through a commit's answer unchanged."""

from mailerd import intake
from mailerd.ipc.messages import Outcome
from mailerd.smtp.events import Reply


def test_a_reply_round_trips_through_its_answer_fields():
    for reply in (intake.queued("Q1"), Reply(452, "4.3.1", "Insufficient system storage")):
        assert intake.reply_of(Outcome.decode(intake.outcome(reply).encode())) == reply
