"""The virtual clock (vmm/clock.py): timer ordering, re-arming, cancelling, ManualClock.advance, HostClock."""
import random
import time

import pytest

from vmm.clock import HostClock, ManualClock


class Log:
    """Timers on a ManualClock whose callbacks record (name, now_ns)."""

    def __init__(self, start_ns=0):
        self.clock = ManualClock(start_ns)
        self.fired = []

    def timer(self, name, then=None):
        def callback():
            self.fired.append((name, self.clock.now_ns()))
            if then:
                then()
        return self.clock.timer(callback, name)


@pytest.fixture
def log():
    return Log()


def test_fire_in_deadline_order_ties_in_arming_order(log):
    a, b, c, d = (log.timer(n) for n in "abcd")
    c.arm(30)
    b.arm(20)           # b, a and d tie at 20: armed in that order
    a.arm(20)
    d.arm(20)
    assert log.clock.advance(100) == 4
    assert log.fired == [("b", 20), ("a", 20), ("d", 20), ("c", 30)]


def test_rearming_at_the_same_deadline_moves_to_the_back_of_the_tie(log):
    a, b = log.timer("a"), log.timer("b")
    a.arm(10)
    b.arm(10)
    a.arm(10)
    log.clock.advance(10)
    assert log.fired == [("b", 10), ("a", 10)]


def test_periodic_self_rearm(log):
    t = log.timer("tick", then=lambda: t.arm(log.clock.now_ns() + 10))
    t.arm(10)
    assert log.clock.advance(35) == 3
    assert log.fired == [("tick", 10), ("tick", 20), ("tick", 30)]
    assert t.armed and log.clock.next_deadline() == 40
    assert log.clock.now_ns() == 35
    log.clock.advance(5)
    assert log.fired[-1] == ("tick", 40)


def test_cancel_before_due(log):
    t = log.timer("t")
    t.arm(10)
    assert t.armed and t.deadline_ns == 10
    t.cancel()
    assert not t.armed and t.deadline_ns is None
    assert log.clock.next_deadline() is None
    assert log.clock.advance(100) == 0 and log.fired == []


@pytest.mark.parametrize("first, second", [(10, 50), (50, 10)])
def test_rearm_replaces_previous_deadline(log, first, second):
    t = log.timer("t")
    t.arm(first)
    t.arm(second)
    log.clock.advance(second - 1)
    assert log.fired == []
    log.clock.advance(1000)
    assert log.fired == [("t", second)]
    assert not t.armed


def test_cancel_then_rearm_fires_once(log):
    t = log.timer("t")
    t.arm(10)
    t.cancel()
    t.arm(10)
    assert log.clock.advance(20) == 1 and log.fired == [("t", 10)]


def test_next_deadline_skips_cancelled_and_stale_entries(log):
    a, b, c = log.timer("a"), log.timer("b"), log.timer("c")
    assert log.clock.next_deadline() is None
    a.arm(10)
    b.arm(30)
    c.arm(20)
    assert log.clock.next_deadline() == 10
    a.cancel()
    assert log.clock.next_deadline() == 20
    c.arm(40)                         # c's entry at 20 is now stale
    assert log.clock.next_deadline() == 30
    a.arm(5)
    a.arm(60)                         # a's entry at 5 is stale
    assert log.clock.next_deadline() == 30
    b.cancel()
    c.cancel()
    assert log.clock.next_deadline() == 60
    a.cancel()
    assert log.clock.next_deadline() is None
    assert log.clock.advance(100) == 0


def test_advance_runs_each_timer_at_its_own_deadline(log):
    late = log.timer("late")
    first = log.timer("first", then=lambda: late.arm(log.clock.now_ns() + 3))   # armed mid-advance
    other = log.timer("other")
    first.arm(5)
    other.arm(7)
    assert log.clock.advance(100) == 3
    assert log.fired == [("first", 5), ("other", 7), ("late", 8)]
    assert log.clock.now_ns() == 100


def test_advance_stops_short_of_later_deadlines(log):
    t = log.timer("t")
    t.arm(101)
    assert log.clock.advance(100) == 0 and t.armed
    assert log.clock.advance(1) == 1 and log.fired == [("t", 101)]


def test_overdue_timer_fires_at_current_time_never_earlier():
    log = Log(start_ns=1000)
    t = log.timer("t")
    t.arm(500)
    assert log.clock.now_ns() == 1000
    assert log.clock.advance(0) == 1
    assert log.fired == [("t", 1000)]


def test_advance_backwards_raises(log):
    t = log.timer("t")
    t.arm(0)
    with pytest.raises(ValueError, match="backwards"):
        log.clock.advance(-1)
    assert log.clock.now_ns() == 0 and log.fired == [] and t.armed


def test_callback_cancelling_a_tied_timer(log):
    b = log.timer("b")
    a = log.timer("a", then=b.cancel)
    a.arm(10)
    b.arm(10)
    assert log.clock.advance(10) == 1
    assert log.fired == [("a", 10)]


def test_run_due_uses_explicit_or_current_time(log):
    a, b = log.timer("a"), log.timer("b")
    a.arm(0)
    b.arm(50)
    assert log.clock.run_due() == 1            # now_ns() == 0
    assert log.clock.run_due(49) == 0
    assert log.clock.run_due(50) == 1
    assert [n for n, _ in log.fired] == ["a", "b"]


def test_firing_deadline_is_visible_only_inside_the_callback(log):
    seen = []
    t = log.clock.timer(lambda: seen.append(log.clock.firing_deadline_ns))
    t.arm(40)
    assert log.clock.firing_deadline_ns is None
    log.clock.run_due(100)                     # fires late: the deadline, not the time, is reported
    assert seen == [40] and log.clock.firing_deadline_ns is None

    def boom():
        raise RuntimeError("device bug")
    log.clock.timer(boom).arm(50)
    with pytest.raises(RuntimeError):
        log.clock.run_due(100)
    assert log.clock.firing_deadline_ns is None


def test_random_schedule_matches_reference_model():
    rng = random.Random(1234)
    log = Log()
    timers = [log.timer(i) for i in range(8)]
    armed = {}                                # name -> (deadline, arm order)
    expected = []
    order = 0
    for _ in range(400):
        op = rng.random()
        i = rng.randrange(len(timers))
        if op < 0.5:
            order += 1
            deadline = log.clock.now_ns() + rng.randrange(0, 60)
            timers[i].arm(deadline)
            armed[i] = (deadline, order)
        elif op < 0.65:
            timers[i].cancel()
            armed.pop(i, None)
        else:
            target = log.clock.now_ns() + rng.randrange(0, 40)
            due = sorted((d, o, n) for n, (d, o) in armed.items() if d <= target)
            expected += [(n, d) for d, _, n in due]
            for _, _, n in due:
                del armed[n]
            log.clock.advance(target - log.clock.now_ns())
        assert log.clock.next_deadline() == min((d for d, _ in armed.values()), default=None)
    assert log.fired == expected and len(expected) > 50


def test_host_clock_starts_near_zero_and_never_goes_back():
    clock = HostClock()
    first = clock.now_ns()
    assert 0 <= first < 1_000_000_000
    samples = [clock.now_ns() for _ in range(1000)]
    assert all(x <= y for x, y in zip([first] + samples, samples))
    time.sleep(0.01)
    assert clock.now_ns() - samples[-1] >= 10_000_000


def test_host_clock_runs_due_timers_at_current_time():
    clock = HostClock()
    fired = []
    clock.timer(lambda: fired.append("now")).arm(0)
    clock.timer(lambda: fired.append("later")).arm(clock.now_ns() + 3_600_000_000_000)
    assert clock.run_due() == 1 and fired == ["now"]


# -- engine clocks ----------------------------------------------------------

from vmm.clock import IcountClock, SampledClock


class Counter:
    def __init__(self):
        self.n = 0

    def __call__(self):
        return self.n


def test_icount_clock_is_a_function_of_the_instruction_count():
    c = Counter()
    clock = IcountClock(c, ps_per_instr=1500, base_ns=100)
    assert clock.now_ns() == 100
    c.n = 1000
    assert clock.now_ns() == 100 + 1500
    c.n = 1001
    assert clock.now_ns() == 100 + 1501   # 1001 * 1.5 ns, rounded down


def test_icount_clock_sync_rebases_and_never_goes_back():
    c = Counter()
    clock = IcountClock(c, ps_per_instr=1000)
    c.n = 5000
    clock.sync(1_000_000, 2000)
    assert clock.now_ns() == 1_000_000
    c.n = 6000
    assert clock.now_ns() == 1_000_000 + 2000
    clock.sync(0, 1000)                   # an older time does not move the clock back
    assert clock.now_ns() == 1_002_000
    with pytest.raises(ValueError):
        clock.sync(0, 0)


@pytest.mark.parametrize("ps", [1, 999, 1000, 610_000])
def test_icount_at_is_the_first_count_reaching_a_deadline(ps):
    c = Counter()
    clock = IcountClock(c, ps_per_instr=ps, base_ns=50)
    for deadline in (50, 51, 1000, 123_457):
        at = clock.icount_at(deadline)
        c.n = at
        assert clock.now_ns() >= deadline
        if at > 0:
            c.n = at - 1
            assert clock.now_ns() < deadline
        c.n = 0


def test_icount_clock_fires_timers_at_their_instruction():
    c = Counter()
    clock = IcountClock(c, ps_per_instr=1000)
    fired = []
    clock.timer(lambda: fired.append(c.n)).arm(10)
    c.n = clock.icount_at(clock.next_deadline())
    clock.run_due()
    assert fired == [10]


def test_sampled_clock_samples_once_per_point():
    values = iter([100, 250, 200])
    clock = SampledClock(lambda: next(values))
    assert clock.peek_ns() == 0 and not clock.fresh
    assert clock.now_ns() == 100
    assert clock.now_ns() == 100          # same point: no new sample
    clock.new_point()
    assert clock.now_ns() == 250
    clock.new_point()
    assert clock.now_ns() == 250          # a smaller sample never moves it back
    clock.set(300)
    assert clock.peek_ns() == 300 and clock.fresh
