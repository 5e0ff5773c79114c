"""The scheduler core (taskrunner._graph.Graph) checked against the pure-Python
reference model in graph_model.py.

A hypothesis state machine builds random DAGs (upstreams are always earlier
runs), with random `allow` subsets, and drives the real Graph through its
Python test view and the model side by side: takes, completions, failures,
crashes, cancels, cancel_all and forget (so slots get reused).  After every
step the two must agree on the state of every run, on the counters and on
what each operation returned; at the end everything is drained and every
slot must come back.  Plain example tests below pin down specific cases.
"""

import os
import sys
import threading

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from taskrunner._graph import STATES, Graph

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import graph_model as gm  # noqa: E402
from graph_model import (  # noqa: E402
    CANCELLED,
    COMPLETED,
    CRASHED,
    FAILED,
    FINAL,
    FINISH_STATES,
    NOT_READY,
    PENDING,
    READY,
    GraphModel,
)

# 300 s for the CI profile's 200 examples; scaled with the profile's count
# (the long profile's 20,000 take an hour or more on a shared 2-core machine).
pytestmark = pytest.mark.timeout(300 * max(1, settings().max_examples // 200))


# -- the harness: one real Graph, one model, and the map between them --------

class Pair:
    """Drives a Graph and a GraphModel together and compares them.

    Runs are named by model ids.  `num[id]` is the run's slot number in the
    Graph for as long as the slot is the run's; once a forgotten run's slot is
    seen free it leaves the map, and its number may come back for a new run.
    """

    def __init__(self, max_running, autocheck=True):
        self.g = Graph(max_running)
        self.m = GraphModel(max_running)
        self.num = {}           # model id -> slot number
        self.at = {}            # slot number -> model id
        self.autocheck = autocheck
        self.on_event = lambda name: None     # hypothesis.event in the machine
        self.used = set()       # every slot number handed out so far
        self.reuses = 0
        self.peak_live = 0

    # mapping

    def ids(self, nums, what):
        out = []
        for n in nums:
            assert n in self.at, f"{what} reported slot {n}, which holds no run"
            out.append(self.at[n])
        assert len(set(out)) == len(out), f"{what} reported a run twice: {out}"
        return out

    def _release_slot(self, rid):
        del self.at[self.num.pop(rid)]

    # operations

    def add(self, ups=(), allow=()):
        ups = list(ups)
        allow = sorted(set(allow))
        num, ended = self.g.add([self.num[u] for u in ups], [self.num[a] for a in allow])
        if num in self.at:
            old = self.at[num]
            assert self.m.runs[old].forgotten and self.m.slot_status(old) != gm.SLOT_HELD, (
                f"add gave slot {num}, still held by run {old} ({self.m.runs[old]})")
            self._release_slot(old)
        if num in self.used:
            self.reuses += 1
            self.on_event("add reused a freed slot")
        self.used.add(num)
        # Freed slots must actually come back: the core hands out a number
        # it never used only when every lower one is live, so no number
        # reaches the peak count of live slots.
        self.peak_live = max(self.peak_live, self.g.n_live)
        assert num < self.peak_live, (
            f"add gave slot {num} with only {self.g.n_live} live (peak {self.peak_live}): "
            f"freed slots are not being reused")
        rid, m_ended = self.m.add(ups, allow)
        self.num[rid] = num
        self.at[num] = rid
        if m_ended:
            self.on_event("add was NOT_READY at once")
        assert sorted(self.ids(ended, "add")) == sorted(m_ended), (
            f"add({ups}, allow={allow}) ended {self.ids(ended, 'add')}, model {m_ended}")
        self._after()
        return rid

    def take(self):
        """Take the next ready run; None if there is none to take."""
        candidates = self.m.take_candidates()
        num = self.g.take_ready()
        if not candidates:
            if self.m.n_ready:
                self.on_event("take held back by max_running")
            assert num is None, (
                f"take_ready gave run {self.at.get(num)} (slot {num}); model: nothing to take")
            self._after()
            return None
        assert num is not None, f"take_ready gave nothing; model expects one of {sorted(candidates)}"
        rid = self.ids([num], "take_ready")[0]
        if len(candidates) > 1:
            self.on_event("take had several runs ready at the same moment")
        assert rid in candidates, (
            f"take_ready gave run {rid}; FIFO order allows only {sorted(candidates)}")
        self.m.take(rid)
        self._after()
        return rid

    def finish(self, rid, state):
        ended = self.g.finish(self.num[rid], state)
        n_batches = len(self.m.batches)
        m_ended = self.m.finish(rid, state)
        if len(self.m.batches) > n_batches:
            batch = self.m.batches[-1]
            if len(batch.ordered) >= 2:
                self.on_event("finish released an ordered fan-out")
            if batch.loose:
                self.on_event("finish released runs through a NOT_READY cascade")
        if m_ended:
            self.on_event(f"finish made {min(len(m_ended), 3)}{'+' if len(m_ended) >= 3 else ''} NOT_READY")
        assert sorted(self.ids(ended, "finish")) == sorted(m_ended), (
            f"finish({rid}, {gm.STATE_NAMES[state]}) made NOT_READY "
            f"{self.ids(ended, 'finish')}, model {m_ended}")
        self._after()
        return m_ended

    def cancel(self, rid):
        ok, ended = self.g.cancel(self.num[rid])
        m_ok, m_ended = self.m.cancel(rid)
        assert ok == m_ok, f"cancel({rid}) returned {ok}, model {m_ok}"
        got = self.ids(ended, "cancel")
        if ok:
            # The view's list ("not_ready_runs") starts with the cancelled
            # run itself, then the runs made NOT_READY: the engine needs the
            # cancelled run in that list to let go of it.  See the report.
            assert got[:1] == [rid], f"cancel({rid}) returned {got}"
            got = got[1:]
        assert sorted(got) == sorted(m_ended), (
            f"cancel({rid}) made NOT_READY {got}, model {m_ended}")
        self._after()
        return ok

    def cancel_all(self):
        ended = self.g.cancel_all()
        m_ended = self.m.cancel_all()
        assert sorted(self.ids(ended, "cancel_all")) == sorted(m_ended), (
            f"cancel_all cancelled {self.ids(ended, 'cancel_all')}, model {m_ended}")
        self._after()
        return m_ended

    def forget(self, rid):
        self.g.forget(self.num[rid])
        self.m.forget(rid)
        self._after()

    # comparing

    def _after(self):
        if self.autocheck:
            self.check()

    def check(self):
        g, m = self.g, self.m
        for rid in list(self.num):
            run = m.runs[rid]
            num = self.num[rid]
            if not run.forgotten:
                state = g.state(num)
                assert state == run.state, (
                    f"run {rid} (slot {num}) is {gm.STATE_NAMES.get(state, state)}, "
                    f"model {gm.STATE_NAMES[run.state]}")
                continue
            status = m.slot_status(rid)
            try:
                state = g.state(num)
            except ValueError:
                assert status != gm.SLOT_HELD, (
                    f"forgotten run {rid}'s slot {num} is free, but something still "
                    f"points at it ({run})")
                self._release_slot(rid)
                continue
            assert status != gm.SLOT_FREE, (
                f"forgotten run {rid}'s slot {num} is still held, though nothing points "
                f"at it ({run}): a leaked slot")
            assert state == run.state, (
                f"forgotten run {rid} (slot {num}) is {gm.STATE_NAMES.get(state, state)}, "
                f"model {gm.STATE_NAMES[run.state]}")
        assert g.n_unfinished == m.n_unfinished, (g.n_unfinished, m.n_unfinished)
        assert g.n_ready == m.n_ready, (g.n_ready, m.n_ready)
        assert g.n_running == m.n_running, (g.n_running, m.n_running)
        assert g.n_live == len(self.at), (g.n_live, len(self.at))

    def drain(self, state=COMPLETED):
        """Take and finish everything; then every run must be final."""
        while True:
            while self.take() is not None:
                pass
            running = self.m.running()
            if not running:
                break
            for rid in running:
                self.finish(rid, state)
        self.check()
        assert all(r.state in FINAL for r in self.m.runs), [
            r for r in self.m.runs if r.state not in FINAL]
        assert self.g.n_unfinished == 0
        assert self.g.n_ready == 0
        assert self.g.n_running == 0

    def release_everything(self):
        """Forget every run, then let the ready queue pass any entries left
        by cancelled runs: afterwards every slot must be free."""
        for r in self.m.runs:
            if not r.forgotten:
                self.forget(r.id)
        sweep = self.add()
        assert self.take() == sweep
        self.finish(sweep, COMPLETED)
        self.forget(sweep)
        self.check()
        assert not self.num, f"slots never came back: {sorted(self.num)}"
        assert self.g.n_live == 0


# -- the state machine -------------------------------------------------------

class GraphMachine(RuleBasedStateMachine):
    @initialize(max_running=st.sampled_from([1, 2, 3, 1000]))
    def start(self, max_running):
        self.p = Pair(max_running)
        self.p.on_event = event

    def live(self):
        return [r.id for r in self.p.m.runs if not r.forgotten]

    def _upstreams(self, data, max_size=4):
        live = self.live()
        if not live:
            return []
        # Mostly recent runs, so chains get deep; sometimes any run.
        pick = st.one_of(st.sampled_from(live[-4:]), st.sampled_from(live))
        return data.draw(st.lists(pick, max_size=max_size), label="upstreams")

    @staticmethod
    def _allow(data, ups):
        if not ups:
            return []
        return sorted(data.draw(st.sets(st.sampled_from(ups)), label="allow"))

    @rule(data=st.data())
    def add(self, data):
        ups = self._upstreams(data)
        self.p.add(ups, self._allow(data, ups))

    @precondition(lambda self: self.live())
    @rule(data=st.data(), n=st.integers(2, 5))
    def fan_out(self, data, n):
        """Several runs on one upstream (plus maybe others): a fan-out whose
        release order take_ready must keep."""
        up = data.draw(st.sampled_from(self.live()), label="fan-out upstream")
        for _ in range(n):
            ups = [up] + self._upstreams(data, max_size=1)
            self.p.add(ups, self._allow(data, ups))

    @rule(data=st.data(), n=st.integers(2, 5))
    def chain(self, data, n):
        """A chain, each run on the one before (plus maybe another): deep
        NOT_READY cascades, and runs that allow a failure part-way down."""
        prev = self._upstreams(data, max_size=1)
        for _ in range(n):
            ups = prev + self._upstreams(data, max_size=1)
            allow = [u for u in ups if data.draw(st.booleans(), label="allow")]
            prev = [self.p.add(ups, allow)]

    @rule()
    def take(self):
        self.p.take()

    @precondition(lambda self: self.p.m.running())
    @rule(data=st.data(), state=st.sampled_from([COMPLETED, COMPLETED, FAILED, CRASHED]))
    def finish(self, data, state):
        rid = data.draw(st.sampled_from(self.p.m.running()), label="run")
        self.p.finish(rid, state)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def cancel(self, data):
        # Any live run: those already started must refuse.
        self.p.cancel(data.draw(st.sampled_from(self.live()), label="run"))

    @rule()
    def cancel_all(self):
        self.p.cancel_all()

    def _final_live(self):
        return [r.id for r in self.p.m.runs if not r.forgotten and r.state in FINAL]

    @precondition(lambda self: self._final_live())
    @rule(data=st.data())
    def forget(self, data):
        self.p.forget(data.draw(st.sampled_from(self._final_live()), label="run"))

    @invariant()
    def agree(self):
        if hasattr(self, "p"):
            self.p.check()

    def teardown(self):
        if hasattr(self, "p"):
            self.p.drain()
            self.p.release_everything()


# Examples: the hypothesis profile's (conftest.py: 200 in CI, 20,000 with
# --hypothesis-profile=long).
GraphMachine.TestCase.settings = settings(
    stateful_step_count=50,
    deadline=None,
    # Shrink one failure, not every distinct assertion site: a broken core
    # trips several checks, and shrinking each would outlast the timeout.
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGraphMachine = GraphMachine.TestCase


# -- examples ----------------------------------------------------------------

def test_state_numbers_match_the_model():
    assert STATES == {name: getattr(gm, name) for name in STATES}
    assert set(STATES.values()) == set(gm.STATE_NAMES)


def _diamond(p, d_allows_both=False):
    a = p.add()
    b = p.add([a])
    c = p.add([a])
    d = p.add([b, c], [b, c] if d_allows_both else [])
    return a, b, c, d


def test_diamond_completes():
    p = Pair(4)
    a, b, c, d = _diamond(p)
    assert p.take() == a
    assert p.take() is None
    assert p.finish(a, COMPLETED) == []
    assert [p.take(), p.take(), p.take()] == [b, c, None]
    p.finish(b, COMPLETED)
    assert p.m.state(d) == PENDING and p.take() is None
    p.finish(c, COMPLETED)
    assert p.g.state(p.num[d]) == READY
    assert p.take() == d
    p.finish(d, COMPLETED)
    p.drain()
    p.release_everything()


@pytest.mark.parametrize("state", FINISH_STATES[1:])
def test_diamond_failure_makes_everything_below_not_ready(state):
    p = Pair(4)
    a, b, c, d = _diamond(p)
    p.take()
    na, nb, nc, nd = (p.num[x] for x in (a, b, c, d))
    assert sorted(p.g.finish(na, state)) == sorted([nb, nc, nd])
    assert [p.g.state(n) for n in (na, nb, nc, nd)] == [state, NOT_READY, NOT_READY, NOT_READY]
    assert p.g.n_unfinished == 0 and p.g.n_ready == 0


def test_diamond_bottom_allowing_both_sides_still_runs():
    p = Pair(4)
    a, b, c, d = _diamond(p, d_allows_both=True)
    p.take()
    assert sorted(p.finish(a, FAILED)) == sorted([b, c])
    assert p.m.state(d) == READY
    assert p.take() == d


def test_transitive_not_ready_down_a_chain():
    p = Pair(1)
    chain = [p.add()]
    for _ in range(20):
        chain.append(p.add([chain[-1]]))
    assert p.take() == chain[0]
    assert sorted(p.finish(chain[0], CRASHED)) == chain[1:]
    assert all(p.g.state(p.num[r]) == NOT_READY for r in chain[1:])
    assert p.g.n_unfinished == 0
    p.drain()
    p.release_everything()


def test_allow_at_depth():
    # a -> b -> c (allows b) -> d: a fails, b never runs, c runs anyway and
    # d follows c.
    p = Pair(2)
    a = p.add()
    b = p.add([a])
    c = p.add([b], [b])
    d = p.add([c])
    e = p.add([b])                  # does not allow b
    p.take()
    assert sorted(p.finish(a, FAILED)) == sorted([b, e])
    assert [p.m.state(x) for x in (b, c, d, e)] == [NOT_READY, READY, PENDING, NOT_READY]
    assert p.g.state(p.num[c]) == READY and p.g.state(p.num[d]) == PENDING
    assert p.take() == c
    p.finish(c, COMPLETED)
    assert p.take() == d
    p.finish(d, COMPLETED)
    p.drain()
    p.release_everything()


def test_allow_covers_only_the_allowed_upstream():
    # c allows a but not b: a failing is fine, b failing is not.
    p = Pair(3)
    a = p.add()
    b = p.add()
    c = p.add([a, b], [a])
    assert [p.take(), p.take()] == [a, b]
    assert p.finish(a, FAILED) == []
    assert p.m.state(c) == PENDING
    assert p.finish(b, CRASHED) == [c]
    assert p.g.state(p.num[c]) == NOT_READY


@pytest.mark.parametrize("bad", ["FAILED", "CRASHED", "CANCELLED", "NOT_READY"])
def test_adding_below_an_ended_upstream(bad):
    # (Pair compares every return value and state with the model, so the
    # asserts on its results below are asserts on the core's.)
    p = Pair(2)
    if bad == "CANCELLED":
        a = p.add()
        assert p.cancel(a)
    elif bad == "NOT_READY":
        root = p.add()
        a = p.add([root])
        assert p.take() == root
        assert p.finish(root, FAILED) == [a]
    else:
        a = p.add()
        assert p.take() == a
        p.finish(a, STATES[bad])
    assert p.g.state(p.num[a]) == STATES[bad]
    n_unfinished = p.g.n_unfinished
    b = p.add([a])
    assert p.m.state(b) == NOT_READY
    assert p.g.n_unfinished == n_unfinished
    c = p.add([a], [a])
    assert p.m.state(c) == READY
    # Raw view: add returns the new run as the one run it made NOT_READY.
    num, ended = p.g.add([p.num[a]])
    assert ended == [num] and p.g.state(num) == NOT_READY


def test_adding_below_a_completed_upstream_is_ready_at_once():
    p = Pair(1)
    a = p.add()
    p.take()
    p.finish(a, COMPLETED)
    b = p.add([a, a])
    assert p.g.state(p.num[b]) == READY


def test_cancel():
    p = Pair(2)
    a = p.add()
    b = p.add([a])
    c = p.add([b])                  # made NOT_READY by b's cancel
    d = p.add([b], [b])             # allows it: released
    e = p.add()
    assert p.take() == a
    assert p.cancel(a) is False     # running
    assert p.cancel(b) is True      # Pair checks c is the one made NOT_READY
    assert [p.m.state(x) for x in (b, c, d)] == [CANCELLED, NOT_READY, READY]
    assert p.cancel(b) is False     # already final
    assert p.cancel(e) is True      # READY
    assert p.take() == d            # e's queue entry is skipped
    assert p.finish(a, COMPLETED) == []
    p.drain()
    p.release_everything()


def test_cancel_reports_the_cancelled_run_first():
    # The view's second value, documented as "not_ready_runs", holds the
    # cancelled run itself (CANCELLED, not NOT_READY) ahead of the runs its
    # cancel made NOT_READY.  The engine relies on that list to let go of
    # every run it ended; see the report.
    g = Graph(1)
    a, _ = g.add()
    b, _ = g.add([a])
    c, _ = g.add([a], [a])
    assert g.cancel(a) == (True, [a, b])
    assert [g.state(x) for x in (a, b, c)] == [CANCELLED, NOT_READY, READY]


def test_cancel_all_cancels_rather_than_not_ready():
    p = Pair(2)
    a = p.add()
    assert p.take() == a            # running: survives cancel_all
    b = p.add([a])
    c = p.add([b])
    d = p.add()                     # READY
    e = p.add([d])
    f = p.add([c, d], [c])
    cancelled = p.cancel_all()
    assert sorted(cancelled) == sorted([b, c, d, e, f])
    assert all(p.g.state(p.num[x]) == CANCELLED for x in (b, c, d, e, f))
    assert p.g.n_ready == 0 and p.g.n_unfinished == 1
    assert p.take() is None
    # a's failure finds nothing left to make NOT_READY.
    assert p.finish(a, FAILED) == []
    assert all(p.g.state(p.num[x]) == CANCELLED for x in (b, c, d, e, f))
    assert p.g.n_unfinished == 0
    # Runs added afterwards are scheduled as usual.
    g = p.add([b], [b])
    assert p.take() == g
    p.drain()
    p.release_everything()


def test_fan_out_releases_in_edge_order():
    p = Pair(100)
    a = p.add()
    assert p.take() == a
    first = [p.add([a]) for _ in range(3)]
    x = p.add()                     # ready now: ahead of the whole fan-out
    rest = [p.add([a]) for _ in range(4)]
    late = p.add([a, x])            # x has not ended: not part of the ordered fan-out
    assert p.finish(a, COMPLETED) == []
    nums = [p.g.take_ready() for _ in range(1 + len(first) + len(rest))]
    assert nums == [p.num[r] for r in [x] + first + rest]
    assert p.g.take_ready() is None
    assert p.g.state(p.num[late]) == PENDING


def test_fan_out_with_failure_keeps_edge_order_of_tolerant_runs():
    p = Pair(100)
    a = p.add()
    p.take()
    b1 = p.add([a], [a])
    b2 = p.add([a])
    b3 = p.add([a], [a])
    b4 = p.add([a], [a])
    assert p.finish(a, FAILED) == [b2]
    assert [p.g.take_ready() for _ in range(3)] == [p.num[b] for b in (b1, b3, b4)]


def test_max_running_limits_take():
    p = Pair(2)
    runs = [p.add() for _ in range(5)]
    assert [p.take(), p.take(), p.take()] == [runs[0], runs[1], None]
    assert p.g.n_ready == 3 and p.g.n_running == 2
    p.finish(runs[1], COMPLETED)
    assert [p.take(), p.take()] == [runs[2], None]
    p.drain()
    p.release_everything()


def test_reused_slot_is_a_fresh_run():
    p = Pair(1)
    a = p.add()
    p.take()
    b = p.add([a])
    p.finish(a, COMPLETED)
    p.take()
    p.finish(b, FAILED)
    old_a = p.num[a]
    p.forget(a)
    assert p.g.n_live == 1
    c = p.add()                     # may take a's slot: must behave as new
    d = p.add([c])
    assert p.g.state(p.num[c]) == READY and p.g.state(p.num[d]) == PENDING
    assert p.take() == c
    p.finish(c, COMPLETED)
    assert p.take() == d
    p.finish(d, COMPLETED)
    assert old_a not in p.at or p.at[old_a] in (c, d)
    p.drain()
    p.release_everything()


def test_slot_of_cancelled_ready_run_waits_for_its_queue_entry():
    p = Pair(1)
    a = p.add()
    old = p.num[a]
    assert p.cancel(a)
    p.forget(a)
    # a's entry is still in the ready queue: its slot must not come back yet.
    assert p.g.n_live == 1
    x = p.add()
    assert p.num[x] != old
    assert p.take() == x            # passes a's entry: the slot is free now
    assert p.g.n_live == 1
    y = p.add()
    assert p.take() is None         # max_running 1
    p.finish(x, COMPLETED)
    assert p.take() == y
    p.finish(y, COMPLETED)
    assert p.take() is None
    p.drain()
    p.release_everything()


def test_slot_of_not_ready_run_waits_for_pending_edges():
    p = Pair(2)
    bad = p.add()
    up = p.add()
    p.take()
    p.take()
    p.finish(bad, FAILED)
    b = p.add([bad, up])            # NOT_READY at once, still has an edge from up
    assert p.m.state(b) == NOT_READY
    p.forget(b)
    assert p.m.slot_status(b) == gm.SLOT_HELD
    old = p.num[b]
    c = p.add()
    assert p.num[c] != old
    p.finish(up, COMPLETED)         # fires the edge: b's slot is free now
    assert b not in p.num
    p.drain()
    p.release_everything()


def test_ring_wraps_and_grows():
    # Enough runs to wrap the ready ring and to grow the run table (1024
    # slots at first) while the ring is wrapped; FIFO order must survive.
    p = Pair(2000, autocheck=False)
    first = [p.add() for _ in range(1000)]
    for r in first[:900]:
        assert p.take() == r
        p.finish(r, COMPLETED)
        p.forget(r)
    p.check()
    more = [p.add() for _ in range(900)]       # reuse freed slots; ring wraps
    grow = [p.add() for _ in range(300)]       # past 1024 live runs: grows
    p.check()
    assert p.g.n_live == 100 + 900 + 300
    for r in first[900:] + more + grow:
        assert p.take() == r
    p.check()
    p.drain()
    p.release_everything()


def test_model_and_core_agree_on_a_long_random_walk():
    # A deterministic, larger walk than the state machine's, as a smoke test.
    import random

    rng = random.Random(1234)
    p = Pair(3, autocheck=False)
    for step in range(3000):
        live = [r.id for r in p.m.runs if not r.forgotten]
        roll = rng.random()
        if roll < 0.35 or not live:
            ups = rng.sample(live[-10:], k=min(len(live[-10:]), rng.randint(0, 3))) if live else []
            allow = [u for u in ups if rng.random() < 0.3]
            p.add(ups, allow)
        elif roll < 0.6:
            p.take()
        elif roll < 0.8:
            running = p.m.running()
            if running:
                p.finish(rng.choice(running), rng.choice([COMPLETED] * 4 + [FAILED, CRASHED]))
        elif roll < 0.87:
            p.cancel(rng.choice(live))
        elif roll < 0.88:
            p.cancel_all()
        else:
            final = [r for r in live if p.m.state(r) in FINAL]
            if final:
                p.forget(rng.choice(final))
        if step % 50 == 0:
            p.check()
    p.check()
    p.drain()
    p.release_everything()


# -- the same model against real runners ---------------------------------------
#
# The Graph machine above drives the core directly; this one drives two
# ThreadPoolTaskRunners through the public API, so that what the core's
# Python view cannot show is covered too: a run whose upstreams are runs of
# the *other* runner (the engine holds it until their futures end),
# allow_failure in wait_for and in the parameters, TaskFuture.cancel() and
# one runner's cancel_all() while the other's runs depend on its runs.  One
# GraphModel holds the runs of both runners.
#
# Each task blocks on a gate of its own, so the machine decides when and how
# every run ends; after each step it waits until every run the model calls
# READY has started (the runners have more threads than an example has
# runs), so that each run the model holds RUNNING is running in the runner
# too, and only then compares.

MAX_RUNS = 24            # runs per example; each runner has more threads
STEP_TIMEOUT = 10.0      # a run that should start or end and does not: a bug


class _Gated:
    """One run's task: says it started, waits for its gate, then returns
    its own number or raises."""

    def __init__(self):
        import threading

        self.started = threading.Event()
        self.gate = threading.Event()
        self.fail = False

    def __call__(self, key, seen=None):
        self.started.set()
        if not self.gate.wait(30):
            raise TimeoutError(f"run {key}'s gate was never opened")
        if self.fail:
            raise ValueError(f"run {key} failed")
        return key


def _future_state(future):
    from taskrunner import StateType

    state = future.state
    if state.type == StateType.FAILED:
        return NOT_READY if state.name == "NotReady" else FAILED
    return {StateType.PENDING: PENDING, StateType.RUNNING: gm.RUNNING,
            StateType.COMPLETED: COMPLETED, StateType.CANCELLED: CANCELLED,
            StateType.CRASHED: CRASHED}[state.type]


class RunnerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        from taskrunner import ThreadPoolTaskRunner

        self.runners = [ThreadPoolTaskRunner(max_workers=MAX_RUNS + 4) for _ in range(2)]
        for runner in self.runners:
            runner.__enter__()
        self.m = GraphModel(max_running=1 << 20)
        self.futures = []       # by model id
        self.owner = []         # runner index by model id
        self.tasks = []         # _Gated by model id
        self.seen = {}          # model id -> (upstream id passed as allow_failure param)

    # -- keeping the model in step ------------------------------------------

    def _settle(self):
        """Wait until every run the model calls READY has started in its
        runner, and record those takes in the model."""
        while True:
            ready = sorted(self.m.take_candidates())
            if not ready:
                return
            for rid in ready:
                assert self.tasks[rid].started.wait(STEP_TIMEOUT), (
                    f"run {rid} is ready in the model but never started "
                    f"({self.futures[rid].state!r})")
                self.m.take(rid)

    def _running(self):
        return self.m.running()

    # -- rules ------------------------------------------------------------------

    @precondition(lambda self: len(self.futures) < MAX_RUNS)
    @rule(data=st.data(), which=st.integers(0, 1))
    def submit(self, data, which):
        from taskrunner import allow_failure

        n = len(self.futures)
        ups = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=3), label="upstreams")) if n else []
        allow = sorted(data.draw(st.sets(st.sampled_from(ups)), label="allow")) if ups else []
        as_param = data.draw(st.sampled_from(allow), label="allow as parameter") if allow and \
            data.draw(st.booleans(), label="pass one as a parameter") else None
        if any(self.owner[u] != which for u in ups):
            event("a run on a run of the other runner")
        wait_for = [allow_failure(self.futures[u]) if u in allow else self.futures[u]
                    for u in ups if u != as_param]
        task = _Gated()
        params = {"key": n}
        if as_param is not None:
            params["seen"] = allow_failure(self.futures[as_param])
        future = self.runners[which].submit(task, params, wait_for=wait_for)
        self.futures.append(future)
        self.owner.append(which)
        self.tasks.append(task)
        rid, _ = self.m.add(ups, allow)
        assert rid == n
        self._settle()

    @precondition(lambda self: self._running())
    @rule(data=st.data(), fail=st.booleans())
    def end(self, data, fail):
        rid = data.draw(st.sampled_from(self._running()), label="run")
        task = self.tasks[rid]
        task.fail = fail
        task.gate.set()
        assert self.futures[rid].wait(STEP_TIMEOUT) is not None or self.futures[rid].done()
        assert self.futures[rid].done(), f"run {rid} did not end: {self.futures[rid].state!r}"
        self.m.finish(rid, FAILED if fail else COMPLETED)
        self._settle()

    def _cancellable(self):
        """The runs cancel() is tried on: every one, in any state."""
        return list(range(len(self.futures)))

    @precondition(lambda self: self._cancellable())
    @rule(data=st.data())
    def cancel(self, data):
        rid = data.draw(st.sampled_from(self._cancellable()), label="run")
        got = self.futures[rid].cancel()
        before = self.m.state(rid)
        want, _ = self.m.cancel(rid)
        want = want or before == CANCELLED     # True also when it already was
        if got:
            event("cancel() took effect")
        assert got == want, f"cancel() of run {rid} returned {got}; the model says {want}"
        self._settle()

    @rule(which=st.integers(0, 1))
    def cancel_all(self, which):
        self.runners[which].cancel_all()
        mine = [r for r in self.m.unstarted() if self.owner[r] == which]
        if mine:
            event("cancel_all() cancelled runs that runs of the other runner wait for"
                  if any(self.owner[d] != which for r in mine for d in self.m.runs[r].downstream)
                  else "cancel_all() cancelled runs")
        self.m.cancel_together(mine)
        self._settle()

    @invariant()
    def agree(self):
        for rid, future in enumerate(self.futures):
            want = self.m.state(rid)
            if want == gm.RUNNING:
                # Started (the machine waited for it); the future may say so a moment later.
                assert future.state.type.name in ("PENDING", "RUNNING"), future.state
                continue
            if want in FINAL:
                assert future.wait(STEP_TIMEOUT) is not None or future.done()
            got = _future_state(future)
            assert got == want, (
                f"run {rid} (runner {self.owner[rid]}) is {gm.STATE_NAMES[got]} "
                f"({future.state!r}); the model says {gm.STATE_NAMES[want]}")
            if got == COMPLETED:
                assert future.result(timeout=0) == rid

    def teardown(self):
        # End every run that is left (COMPLETED), then leave both runners.
        while self._running():
            for rid in self._running():
                self.tasks[rid].gate.set()
                assert self.futures[rid].wait(STEP_TIMEOUT) is not None or self.futures[rid].done()
                self.m.finish(rid, COMPLETED)
            self._settle()
        for task in self.tasks:
            task.gate.set()
        for runner in self.runners:
            # Bounded: hypothesis takes a test's timeout as one example's
            # failure and shrinks on, so an exit that hangs (a run that
            # never ends) would hold the session for ever, as it once did.
            exiting = threading.Thread(target=runner.__exit__, args=(None, None, None),
                                       daemon=True)
            exiting.start()
            exiting.join(STEP_TIMEOUT)
            assert not exiting.is_alive(), "a runner's exit did not return: a run never ended"
        self.agree()
        assert all(f.done() for f in self.futures)


RunnerMachine.TestCase.settings = settings(
    # A quarter of the profile's examples (50 in CI): each runs real threads.
    max_examples=max(10, settings().max_examples // 4),
    stateful_step_count=30,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRunnerMachine = RunnerMachine.TestCase
