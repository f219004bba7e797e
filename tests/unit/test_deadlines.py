"""worker/deadlines: which deadline a session meets, and when its timer looks again, as
arithmetic over times (the e2e tests in test_limits and test_capacity run them for real)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailerd.worker.deadlines import Deadlines, Expired

TIMEOUT, SESSION, RATE = 300.0, 3600.0, 1000


def fresh(started: float = 0.0) -> Deadlines:
    return Deadlines(TIMEOUT, SESSION, RATE, started)


def test_no_command_then_a_command_begun_and_not_finished():
    d = fresh()
    assert d.expired(299.9, 0) is None
    assert d.expired(300.0, 0) is Expired.NO_COMMAND
    d.restart(100.0, content=False, mid_command=True, progressed=False)  # "MAI" came
    assert d.expired(399.9, 0) is None and d.expired(400.0, 0) is Expired.COMMAND


def test_a_trickled_byte_does_not_move_a_command_deadline():
    d = fresh()
    d.restart(10.0, content=False, mid_command=True, progressed=False)
    d.restart(200.0, content=False, mid_command=True, progressed=False)  # one byte more
    assert d.expired(310.0, 0) is Expired.COMMAND
    d.restart(250.0, content=False, mid_command=False, progressed=True)  # answered
    assert d.expired(549.0, 0) is None and d.expired(550.0, 0) is Expired.NO_COMMAND


def test_content_earns_time_at_the_minimum_rate():
    d = fresh()
    d.restart(10.0, content=True, mid_command=False, progressed=True)
    # 50,000 octets at 1,000 a second: due 10 + 300 + 50
    assert d.next_due(50_000) == 360.0
    assert d.expired(359.0, 50_000) is None
    assert d.expired(360.0, 50_000) is Expired.CONTENT
    d.restart(30.0, content=True, mid_command=False, progressed=False)  # more content
    assert d.content_since == 10.0  # (its start stays)


def test_the_session_limit_comes_first():
    d = fresh()
    d.restart(3500.0, content=True, mid_command=False, progressed=True)
    assert d.next_due(10**6) == SESSION
    assert d.expired(SESSION, 10**6) is Expired.SESSION


def test_the_next_command_is_due_timeout_after_the_content_however_far_its_deadline_was():
    d = fresh()
    d.restart(1.0, content=True, mid_command=False, progressed=True)
    wait = d.next_check(2.0, 20_000_000)  # the timer looks while fast content comes in
    assert wait == TIMEOUT  # (its deadline is hours away: the cap)
    d.restart(3.0, content=False, mid_command=False, progressed=True)  # 250: the end
    assert d.next_due(0) == 303.0 and 2.0 + wait <= 303.0


def test_a_deadline_due_now_is_looked_at_again_in_50_ms():
    d = fresh()
    assert d.next_check(299.99, 0) == 0.05


@given(
    st.lists(
        st.tuples(
            st.floats(0, 400, allow_nan=False),  # time to the next event
            st.booleans(),  # content
            st.booleans(),  # mid_command
            st.booleans(),  # progressed
            st.integers(0, 10**8),  # content octets
        ),
        max_size=30,
    )
)
def test_the_timer_never_sleeps_past_a_deadline(events):
    """Whatever the session does, a timer armed at a check (for next_check) fires no later
    than the first deadline as it stands when it fires, unless the session was already past
    it: the check would have seen it. (Content ends only with an answer, the 250 or a
    refusal: the session's rule, kept here.)"""
    d = fresh()
    now = 0.0
    armed_for = now + d.next_check(now, 0)
    octets = 0
    for gap, content, mid, progressed, more in events:
        progressed = progressed or (d.content_since is not None and not content)
        now += gap
        if now >= armed_for:  # the timer fired: a check, and it re-arms
            if d.expired(armed_for, octets) is not None:
                return
            armed_for = armed_for + d.next_check(armed_for, octets)
            if now >= armed_for:
                continue
        octets = octets + more if content else 0
        d.restart(now, content=content, mid_command=mid, progressed=progressed)
        assert armed_for <= d.next_due(octets) + 1e-9
