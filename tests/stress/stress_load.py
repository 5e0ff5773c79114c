"""A random load for the stress tests, and its check against the reference
model (tests/graph_model.py).

Several threads submit at once to one runner.  Each run is one of
runner_tasks' tasks (importable, so the process and Dask runners can run
them too):

* ``node(i, xs, bad)``: ``i + sum(xs)``, or ValueError when ``bad``.  ``xs``
  holds at most one upstream future (so values grow only along a chain);
  more strict upstreams go in ``wait_for``, and tolerant ones there as
  ``allow_failure(f)``.
* ``types_of(x=allow_failure(f))``: the type name of what it received, the
  upstream's result or its exception (``ValueError``, ``UpstreamTaskError``,
  ``CancelledRun``).
* ``submit_to_own_runner_and_wait(x=i)``, after a strict upstream: a nested
  submission from inside a task that blocks on it (thread runner only).

Upstreams are mostly the thread's own recent runs, sometimes any run of
any thread.  After a submission a thread may ``cancel()`` a recent run (its
own or another thread's) and records what cancel() returned.

The check (`check`) replays the load in a GraphModel: every run added with
its upstreams (``allow`` = its tolerant ones), the runs seen CANCELLED
cancelled together, then every run taken and finished FAILED if ``bad``
else COMPLETED.  The model's final state of every run must be the one
its future reached, and a COMPLETED run's result the value computed from
its upstreams' values; each CANCELLED run must be one whose cancel()
returned True or one submitted before a cancel_all() returned, and every
run whose cancel() returned True must be CANCELLED.
"""

import itertools
import os
import random
import sys
import threading

from taskrunner import StateType, allow_failure
from taskrunner.exceptions import CancelledRun, UpstreamTaskError

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import graph_model as gm  # noqa: E402
import runner_tasks as rt  # noqa: E402

NODE, TOLERANT, NESTED = "node", "tolerant", "nested"


class Run:
    __slots__ = ("seq", "kind", "i", "strict", "tolerant", "bad", "future", "cancels",
                 "before_cancel_all")

    def __init__(self, kind, i, strict, tolerant, bad):
        self.seq = None
        self.kind = kind
        self.i = i
        self.strict = strict            # Runs whose failure dooms this one
        self.tolerant = tolerant        # Runs it waits for but may see fail
        self.bad = bad
        self.future = None
        self.cancels = []               # what each cancel() on it returned
        self.before_cancel_all = True

    @property
    def int_valued(self):
        return self.kind != TOLERANT


class Load:
    """The shape of a load: how many runs per thread, and how often each
    thing happens.  `nested` needs the thread runner (and OWN_RUNNER set)."""

    def __init__(self, threads=4, runs=50_000, p_fail=0.02, p_cancel=0.03, p_nested=0.002,
                 p_tolerant=0.05, p_root=0.35, p_cross=0.05, seed=0):
        self.threads = threads
        self.runs = runs
        self.p_fail = p_fail
        self.p_cancel = p_cancel
        self.p_nested = p_nested
        self.p_tolerant = p_tolerant
        self.p_root = p_root
        self.p_cross = p_cross
        self.seed = seed


def _pick(rng, mine, lists, p_cross, int_only=False):
    """A run to depend on: mostly one of the last 8 of this thread's own,
    sometimes any run of any thread; None if there is none to hand."""
    for _ in range(4):
        if rng.random() < p_cross:
            pool = lists[rng.randrange(len(lists))]
            n = len(pool)               # append-only: safe to read while others append
            if not n:
                continue
            run = pool[rng.randrange(n)]
        else:
            if not mine:
                return None
            run = mine[rng.randrange(max(0, len(mine) - 8), len(mine))]
        if not int_only or run.int_valued:
            return run
    return None


def _submit(runner, run):
    if run.kind == NODE:
        xs = [run.strict[0].future] if run.strict and run.strict[0].int_valued else []
        rest = run.strict[len(xs):]
        wait_for = [r.future for r in rest] + [allow_failure(r.future) for r in run.tolerant]
        return runner.submit(rt.node, {"i": run.i, "xs": xs, "bad": run.bad},
                             wait_for=wait_for or None)
    if run.kind == TOLERANT:
        return runner.submit(rt.types_of, {"x": allow_failure(run.tolerant[0].future)})
    return runner.submit(rt.submit_to_own_runner_and_wait, {"x": run.i},
                         wait_for=[r.future for r in run.strict] or None)


def _submitter(runner, load, me, lists, seq, halfway, cancel_all_done, errors):
    rng = random.Random(load.seed * 1000 + me)
    mine = lists[me]
    try:
        for k in range(load.runs):
            if k == load.runs // 2:
                halfway.set()
            i = me * load.runs + k
            roll = rng.random()
            up = None if roll < load.p_root else _pick(rng, mine, lists, load.p_cross)
            if roll >= load.p_root and up is not None and rng.random() < load.p_tolerant:
                run = Run(TOLERANT, i, [], [up], False)
            elif up is not None and rng.random() < load.p_nested:
                run = Run(NESTED, i, [up], [], False)
            else:
                strict, tolerant = [], []
                if up is not None:
                    (tolerant if rng.random() < 0.1 else strict).append(up)
                    if rng.random() < 0.3:
                        more = _pick(rng, mine, lists, load.p_cross)
                        if more is not None and more is not up:
                            (tolerant if rng.random() < 0.3 else strict).append(more)
                run = Run(NODE, i, strict, tolerant, rng.random() < load.p_fail)
            run.before_cancel_all = not cancel_all_done.is_set()
            run.future = _submit(runner, run)
            run.seq = next(seq)
            mine.append(run)
            if rng.random() < load.p_cancel:
                victim = _pick(rng, mine, lists, load.p_cross * 4)
                if victim is not None:
                    victim.cancels.append(victim.future.cancel())
    except BaseException as exc:  # reported by run_load, never lost
        errors.append(exc)
    finally:
        halfway.set()


def run_load(runner, load, midway=None):
    """Submit `load` to the entered `runner` from `load.threads` threads at
    once.  `midway(runner)`, if given, is called from another thread once
    about half of the runs are submitted (cancel_all(), say).  Returns
    every Run, in an order where each run's upstreams come before it."""
    lists = [[] for _ in range(load.threads)]
    seq = itertools.count()
    cancel_all_done = threading.Event()
    errors = []
    halfway = [threading.Event() for _ in range(load.threads)]
    threads = [
        threading.Thread(target=_submitter,
                         args=(runner, load, me, lists, seq, halfway[me], cancel_all_done, errors),
                         name=f"stress-submitter-{me}")
        for me in range(load.threads)
    ]
    for t in threads:
        t.start()
    if midway is not None:
        for event in halfway:       # every thread has submitted half of its runs
            assert event.wait(120), "a submitting thread never got half-way"
        midway(runner)
        cancel_all_done.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    runs = [r for x in lists for r in x]
    runs.sort(key=lambda r: r.seq)
    return runs


# -- the check -----------------------------------------------------------------

_OBSERVED = {StateType.COMPLETED: gm.COMPLETED, StateType.CANCELLED: gm.CANCELLED,
             StateType.CRASHED: gm.CRASHED}


def observed_state(future):
    state = future.state
    if state.type == StateType.FAILED:
        return gm.NOT_READY if state.name == "NotReady" else gm.FAILED
    if state.type not in _OBSERVED:
        raise AssertionError(f"{future} is not final: {state}")
    return _OBSERVED[state.type]


def _expected_value(run, values, states):
    if run.kind == NODE:
        xs = [values[run.strict[0].seq]] if run.strict and run.strict[0].int_valued else []
        return run.i + sum(xs)
    if run.kind == NESTED:
        return (run.i + 1) * 10
    up = run.tolerant[0]
    if states[up.seq] == gm.COMPLETED:
        return type(values[up.seq]).__name__
    return {gm.FAILED: "ValueError", gm.NOT_READY: "UpstreamTaskError",
            gm.CANCELLED: "CancelledRun"}[states[up.seq]]


def check(runs, cancel_all_called=False):
    """Compare every run's final state and result with the reference model.
    Returns how many runs ended in each final state, by name (the figures)."""
    states = {}
    for run in runs:
        assert run.future.done(), f"run {run.i} ({run.kind}) is not done: {run.future.state}"
        states[run.seq] = observed_state(run.future)

    model = gm.GraphModel(max_running=1 << 30)
    ids = {}
    for run in runs:
        assert run.seq == len(ids)
        ups = [ids[r.seq] for r in run.strict + run.tolerant]
        ids[run.seq], _ = model.add(ups, [ids[r.seq] for r in run.tolerant])

    cancelled = [run for run in runs if states[run.seq] == gm.CANCELLED]
    for run in runs:
        if True in run.cancels:
            assert states[run.seq] == gm.CANCELLED, (
                f"cancel() returned True for run {run.i} but it ended "
                f"{gm.STATE_NAMES[states[run.seq]]}")
        assert len(set(run.cancels)) <= 1, f"cancel() on run {run.i} returned {run.cancels}"
    for run in cancelled:
        assert True in run.cancels or (cancel_all_called and run.before_cancel_all), (
            f"run {run.i} ended CANCELLED, but no cancel() of it returned True and no "
            f"cancel_all() could have reached it")
    model.cancel_together([ids[r.seq] for r in cancelled])
    bad = {ids[r.seq] for r in runs if r.bad}
    # A nested run that was running when cancel_all() came had its inner
    # run (not in this replay) cancelled: it fails with CancelledRun, as
    # result() of a cancelled run raises.  Only such a run may.
    inner_cancelled = set()
    if cancel_all_called:
        inner_cancelled = {
            ids[r.seq] for r in runs
            if r.kind == NESTED and r.before_cancel_all and states[r.seq] == gm.FAILED
            and isinstance(r.future.exception(timeout=0), CancelledRun)}
    bad |= inner_cancelled
    model.settle(lambda rid: gm.FAILED if rid in bad else gm.COMPLETED)

    values = {}
    counts = {}
    for run in runs:
        got, want = states[run.seq], model.state(ids[run.seq])
        assert got == want, (
            f"run {run.i} ({run.kind}, strict={[r.i for r in run.strict]}, "
            f"tolerant={[r.i for r in run.tolerant]}, bad={run.bad}) ended "
            f"{gm.STATE_NAMES[got]} ({run.future.state!r}); the model says {gm.STATE_NAMES[want]}")
        counts[gm.STATE_NAMES[got]] = counts.get(gm.STATE_NAMES[got], 0) + 1
        future = run.future
        if got == gm.COMPLETED:
            value = future.result(timeout=0)
            expected = _expected_value(run, values, states)
            assert value == expected, f"run {run.i} ({run.kind}) returned {value!r}, expected {expected!r}"
            values[run.seq] = value
        elif got == gm.FAILED and ids[run.seq] in inner_cancelled:
            counts["FAILED (inner run cancelled)"] = counts.get("FAILED (inner run cancelled)", 0) + 1
        elif got == gm.FAILED:
            exc = future.exception(timeout=0)
            assert isinstance(exc, ValueError) and str(exc) == f"node {run.i} failed", repr(exc)
        elif got == gm.NOT_READY:
            assert isinstance(future.exception(timeout=0), UpstreamTaskError), future.state
        elif got == gm.CANCELLED:
            assert isinstance(future.exception(timeout=0), CancelledRun), future.state
    return counts
