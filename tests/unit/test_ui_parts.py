"""rrstub ui without a browser or KVM: the console index, symbols, the branch tree's file names."""
from __future__ import annotations

from hypothesis import given, strategies as st

from rrstub.ui.console import ConsoleIndex
from rrstub.ui.tasks import free_path
from rrstub.ui.view import Symbols
from vmm.boot.symbols import Symbol


def test_the_console_before_a_position_excludes_that_instructions_write():
    c = ConsoleIndex(0)
    c.wrote(10, b"a")
    c.wrote(10, b"b")       # one instruction, two writes (rep outsb)
    c.wrote(20, b"c")
    c.ran(0, 30)
    assert c.before(10) == (b"", True)
    assert c.before(11) == (b"ab", True)
    assert c.before(20) == (b"ab", True)
    assert c.before(21) == (b"abc", True)
    assert c.before(30) == (b"abc", True)
    assert c.before(31) == (b"abc", False)


def test_a_replay_that_starts_past_the_known_prefix_teaches_nothing():
    c = ConsoleIndex(0)
    c.wrote(5, b"x")
    c.ran(0, 8)
    c.wrote(50, b"late")            # a replay from a restored marker at 40
    c.ran(40, 60)
    assert c.covered == 8
    assert c.before(55) == (b"x", False)
    c.wrote(3, b"x")                # a replay again over known ground, then on
    c.wrote(50, b"late")
    c.ran(0, 60)
    assert c.before(55) == (b"xlate", True)


@given(st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=3)), max_size=40),
       st.lists(st.integers(0, 200), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_any_order_of_straight_replays_gives_the_bytes_before_each_position(writes, cuts, rnd):
    """Replays over [a, b) in any order, then in order: the index answers exactly what one replay
    from 0 wrote, and never more than is known."""
    writes = sorted(writes, key=lambda w: w[0])
    end = 201
    c = ConsoleIndex(0)
    bounds = sorted(set([0, end] + cuts))
    spans = list(zip(bounds, bounds[1:]))
    shuffled = spans[:]
    rnd.shuffle(shuffled)
    for a, b in shuffled + spans:
        for pos, data in writes:
            if a <= pos < b:
                c.wrote(pos, data)
        c.ran(a, b)
        for p in range(0, end + 1, 7):
            text, complete = c.before(p)
            assert text == b"".join(d for pos, d in writes if pos < min(p, c.covered))
            assert complete == (p <= c.covered)
    for p in range(end + 1):
        assert c.before(p) == (b"".join(d for pos, d in writes if pos < p), True)


def test_symbols_name_an_address_by_its_function_and_offset():
    s = Symbols([Symbol(0x1000, "T", "start"), Symbol(0x1040, "t", "helper"), Symbol(0x2000, "D", "data"),
                 Symbol(0, "A", "zero")])
    assert s.name(0x1000) == "start"
    assert s.name(0x1012) == "start+0x12"
    assert s.name(0x1041) == "helper+0x1"
    assert s.name(0x2004) == "helper+0xfc4"       # data symbols do not name code
    assert s.name(0xfff) is None
    assert s.name(0x1040 + (1 << 16) + 1) is None  # far past the last function


def test_free_paths_never_name_an_existing_file(tmp_path):
    rec = tmp_path / "race.rrr"
    first = free_path(str(rec), "live")
    assert first == str(tmp_path / "race-live-1.rrr")
    open(first, "w").close()
    assert free_path(str(rec), "live") == str(tmp_path / "race-live-2.rrr")
