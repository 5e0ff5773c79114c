"""Lazy maps (commit 6d30eb3): map() without a future per item.

A map whose items hold no futures keeps its runs in a MapBlock (see
csrc/taskrunner/_mapped.pyx): the FutureList it returns answers len(),
result() and wait() from the block, and makes every item's future
("materializes") the first time it is used as a list in any other way.  A
future made for an item that has not finished is "handed over": the item is
an ordinary submitted run from then on, and the engine's work loop (threads)
and the process runner's feeder and receiver (RunLists, calls_of, finish,
give_back) must defer to it, even while the item runs.

These tests pin, for ThreadPoolTaskRunner and ProcessPoolTaskRunner (Dask
is left out: optional and slow):

* the FutureList as a list: every list operation on a never-touched lazy
  list gives what it gives on the materialized list;
* results and failures read lazily and through the futures, the same objects;
* handing items over while they run or wait, with callbacks, cancel() and
  downstream runs; NotReady downstreams of failed items;
* cancel_all() and exit by exception over a large lazy map, with and
  without its futures made;
* a worker process killed during a lazy map;
* the calls a block builds (range, list, tuple, generator, several mapped,
  unmapped and keyword-only parameters);
* the engine interface below the process runner: take_runs, RunList,
  calls_of, finish, give_back.

``futures_made(fl)`` reads how many futures a FutureList holds as a plain
list (``list.__len__``): 0 until it is materialized.
"""

import collections
import contextlib
import copy
import gc
import os
import pickle
import re
import signal
import threading
import time

import pytest

import taskrunner
from taskrunner import (
    CancelledRun,
    CrashedRun,
    FutureList,
    ProcessPoolTaskRunner,
    StateType,
    TaskFuture,
    ThreadPoolTaskRunner,
    UpstreamTaskError,
    allow_failure,
    quote,
    unmapped,
)

import runner_tasks as rt
from harness import running
from runner_tasks import read_lines, wait_path, wait_until

pytestmark = pytest.mark.timeout(60)


# ================================================================= helpers


def _threadpool(max_workers=None):
    return ThreadPoolTaskRunner(max_workers=max_workers or 4)


def _processpool(max_workers=None):
    return ProcessPoolTaskRunner(max_workers=max_workers or 2)


RUNNERS = {"threadpool": _threadpool, "processpool": _processpool}


@pytest.fixture(params=list(RUNNERS))
def make_runner(request):
    """``(max_workers=None) -> new unentered runner``: threads (4 by
    default) or worker processes (2 by default)."""
    return RUNNERS[request.param]




def futures_made(fl):
    """How many futures the FutureList holds so far (0 while it is lazy)."""
    return list.__len__(fl)


def value_of(x):
    """A future as its result, anything else as itself."""
    return x.result(timeout=20) if isinstance(x, TaskFuture) else x


def assert_not_ready(future, upstream=None):
    """FAILED with the name "NotReady"; result() raises UpstreamTaskError
    (naming `upstream`'s run id, if given)."""
    future.wait(timeout=20)
    assert future.done()
    state = future.state
    assert state.type == StateType.FAILED, state
    assert state.name == "NotReady", state
    with pytest.raises(UpstreamTaskError) as info:
        future.result(timeout=1)
    if upstream is not None:
        assert str(upstream.task_run_id) in str(info.value), str(info.value)
    return info.value


class CallbackLog:
    """Done callbacks that count their calls, per future."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = collections.Counter()   # id(future) -> calls
        self.futures = {}                    # id(future) -> future (keeps it alive)

    def __call__(self, future):
        with self.lock:
            self.calls[id(future)] += 1
            self.futures[id(future)] = future

    def count(self, future):
        with self.lock:
            return self.calls[id(future)]

    def total(self):
        with self.lock:
            return sum(self.calls.values())


# ===================================================== 1. FutureList as a list


def test_a_lazy_map_is_a_future_list_answering_len_result_wait_without_futures(make_runner):
    with running(make_runner()) as r:
        fl = r.map(rt.inc, {"x": range(60)})
        assert isinstance(fl, list) and isinstance(fl, FutureList)
        assert type(fl) is taskrunner.FutureList
        assert len(fl) == 60
        fl.wait(timeout=20)
        assert fl.result(timeout=20) == list(range(1, 61))
        assert fl.result(timeout=20, raise_on_failure=False) == list(range(1, 61))
        assert len(fl) == 60
        assert futures_made(fl) == 0         # len, wait and result made no future

        futures = list(fl)                   # a use as a list: the futures are made
        assert futures_made(fl) == 60
        assert len(futures) == 60 and all(type(f) is TaskFuture for f in futures)
        assert len({id(f) for f in futures}) == 60
        assert all(f.done() and f.state.is_completed() for f in futures)
        assert [f.result() for f in futures] == list(range(1, 61))
        # made once: the list holds the same futures from now on
        assert all(a is b for a, b in zip(futures, fl))
        assert fl[7] is futures[7]
        assert len(fl) == 60
        assert fl.result(timeout=20) == list(range(1, 61))
        # made for a finished item: a done callback is called at once
        callbacks = CallbackLog()
        futures[7].add_done_callback(callbacks)
        assert callbacks.count(futures[7]) == 1 and callbacks.total() == 1
        assert futures[7].cancel() is False


# Operations that read a list.  Each is applied to a never-touched lazy
# FutureList, then to list(that FutureList): the results must be equal (the
# futures compare by identity).
READ_OPERATIONS = {
    "index 0": lambda s: s[0],
    "index 4": lambda s: s[4],
    "index -1": lambda s: s[-1],
    "index -6": lambda s: s[-6],
    "slice 1:4": lambda s: s[1:4],
    "slice -3:": lambda s: s[-3:],
    "slice ::-2": lambda s: s[::-2],
    "slice [:]": lambda s: s[:],
    "iter": lambda s: list(iter(s)),
    "for loop": lambda s: [f for f in s],
    "enumerate": lambda s: list(enumerate(s)),
    "reversed": lambda s: list(reversed(s)),
    "list()": lambda s: list(s),
    "tuple()": lambda s: tuple(s),
    "unpacking": lambda s: (lambda first, *rest: (first, rest))(*s),
    "== []": lambda s: s == [],
    "!= []": lambda s: s != [],
    "[] ==": lambda s: [] == s,
    "> []": lambda s: s > [],
    "[] +": lambda s: [] + s,
    "+ []": lambda s: s + [],
    "* 2": lambda s: s * 2,
    "2 *": lambda s: 2 * s,
    "* 0": lambda s: s * 0,
    "bool": lambda s: bool(s),
    "sorted(key=id)": lambda s: sorted(s, key=id),
    "copy()": lambda s: s.copy(),
    "count(None)": lambda s: s.count(None),
    "None in": lambda s: None in s,
    "set": lambda s: set(s),
    "dict.fromkeys": lambda s: list(dict.fromkeys(s)),
    "zip": lambda s: list(zip(s, range(100))),
    "map(id)": lambda s: list(map(id, s)),
    # the same errors as a list's
    "index 6": lambda s: s[6],
    "index -7": lambda s: s[-7],
    "+ tuple": lambda s: s + (1,),
    "int +": lambda s: 5 + s,
    "* str": lambda s: s * "x",
    "sorted()": lambda s: sorted(s),
    "< itself": lambda s: s < list(s)[::-1],
    "index(None)": lambda s: s.index(None),
}


def _outcome(operation, sequence):
    """What `operation` returns, or the type of what it raises (the message
    may differ: `fl * "x"` says "'str' object cannot be interpreted as an
    integer" where a list says "can't multiply sequence by non-int")."""
    try:
        return operation(sequence)
    except Exception as error:
        return ("raised", type(error))


@pytest.mark.timeout(90)
def test_every_reading_list_operation_on_a_never_touched_future_list(make_runner):
    n = 6
    with running(make_runner()) as r:
        for name, operation in READ_OPERATIONS.items():
            fl = r.map(rt.inc, {"x": range(n)})
            assert fl.result(timeout=20) == list(range(1, n + 1))
            assert futures_made(fl) == 0, name
            got = _outcome(operation, fl)
            materialized = list(fl)
            assert len(materialized) == n, name
            assert got == _outcome(operation, materialized), name
            # and nothing was lost or reordered on the way
            assert [f.result() for f in fl] == list(range(1, n + 1)), name
            assert fl.result(timeout=20) == list(range(1, n + 1)), name


def test_comparisons_concatenation_and_repetition_keep_every_item(make_runner):
    n = 5
    with running(make_runner()) as r:
        def fresh():
            fl = r.map(rt.inc, {"x": range(n)})
            fl.wait(timeout=20)
            return fl

        fl = fresh()
        assert fl == list(fl) and list(fl) == fl and not fl != list(fl)
        fl = fresh()
        assert not (fl == [])                # a lazy list is not empty
        fl = fresh()
        assert [value_of(f) for f in [] + fl] == [1, 2, 3, 4, 5]
        fl = fresh()
        assert [value_of(f) for f in fl + []] == [1, 2, 3, 4, 5]
        fl = fresh()
        assert [value_of(f) for f in ["a"] + fl + ["b"]] == ["a", 1, 2, 3, 4, 5, "b"]
        fl = fresh()
        assert [value_of(f) for f in fl * 2] == [1, 2, 3, 4, 5] * 2
        fl = fresh()
        assert [value_of(f) for f in 2 * fl] == [1, 2, 3, 4, 5] * 2
        # two lazy lists together
        a, b = fresh(), r.map(rt.inc, {"x": range(10, 13)})
        b.wait(timeout=20)
        assert [value_of(f) for f in a + b] == [1, 2, 3, 4, 5, 11, 12, 13]
        a, b = fresh(), fresh()
        assert not (a == b)                  # other futures
        assert a != b
        # a list extended by a lazy list
        plain = [0]
        plain += fresh()
        assert [value_of(f) for f in plain] == [0, 1, 2, 3, 4, 5]
        plain = [0]
        plain.extend(fresh())
        assert [value_of(f) for f in plain] == [0, 1, 2, 3, 4, 5]
        # unhashable, as a list
        with pytest.raises(TypeError):
            hash(fresh())


def test_membership_index_and_count_of_its_own_futures(make_runner):
    with running(make_runner()) as r:
        fl = r.map(rt.inc, {"x": range(8)})
        other = r.submit(rt.inc, {"x": 0})
        assert other not in fl                 # first use: materializes
        x = fl[3]
        assert x in fl
        assert fl.index(x) == 3 == list(fl).index(x)
        assert fl.index(x, 2, 5) == 3
        with pytest.raises(ValueError):
            fl.index(x, 4)
        with pytest.raises(ValueError):
            fl.index(other)
        assert fl.count(x) == 1 == list(fl).count(x)
        assert fl.count(other) == 0
        assert fl.result(timeout=20) == list(range(1, 9))

        fl = r.map(rt.inc, {"x": range(8)})
        assert fl.count(other) == 0 and futures_made(fl) == 8
        fl = r.map(rt.inc, {"x": range(8)})
        with pytest.raises(ValueError):
            fl.index(other)
        assert futures_made(fl) == 8
        assert [f.result(timeout=20) for f in fl] == list(range(1, 9))


def test_repr_copy_and_pickling(make_runner):
    with running(make_runner()) as r:
        fl = r.map(rt.inc, {"x": range(4)})
        fl.wait(timeout=20)
        text = repr(fl)
        assert text.startswith("FutureList(")
        assert text == f"FutureList({list(fl)!r})"
        assert text.count("TaskFuture") == 4
        fl = r.map(rt.inc, {"x": range(4)})
        fl.wait(timeout=20)
        assert str(fl) == f"FutureList({list(fl)!r})"

        fl = r.map(rt.inc, {"x": range(4)})
        copied = copy.copy(fl)
        assert isinstance(copied, FutureList)
        assert len(copied) == 4 and list(copied) == list(fl)
        assert copied.result(timeout=20) == [1, 2, 3, 4]

        fl = r.map(rt.inc, {"x": range(4)})
        cls, args = fl.__reduce__()[:2]
        assert cls is FutureList and args == (list(fl),)

        # a future does not pickle, in a FutureList or in a list alike
        fl = r.map(rt.inc, {"x": range(4)})
        with pytest.raises(TypeError) as from_lazy:
            pickle.dumps(fl)
        with pytest.raises(TypeError) as from_list:
            pickle.dumps(list(fl))
        assert str(from_lazy.value) == str(from_list.value)
        assert futures_made(fl) == 4


# Operations that change a list.  Applied to a never-touched lazy FutureList
# and to a plain list of its results, with `new` an extra future (or its
# result): the returned value and the contents must match, as results.
MUTATIONS = {
    "append": lambda s, new: s.append(new),
    "extend": lambda s, new: s.extend([new, new]),
    "insert 0": lambda s, new: s.insert(0, new),
    "insert -1": lambda s, new: s.insert(-1, new),
    "pop": lambda s, new: s.pop(),
    "pop 0": lambda s, new: s.pop(0),
    "pop -2": lambda s, new: s.pop(-2),
    "sort": lambda s, new: s.sort(key=lambda f: -value_of(f)),
    "sort reverse": lambda s, new: s.sort(key=lambda f: value_of(f) % 3, reverse=True),
    "reverse": lambda s, new: s.reverse(),
    "clear": lambda s, new: s.clear(),
    "setitem": lambda s, new: s.__setitem__(1, new),
    "setitem -1": lambda s, new: s.__setitem__(-1, new),
    "set slice": lambda s, new: s.__setitem__(slice(1, 3), [new]),
    "delitem": lambda s, new: s.__delitem__(0),
    "del slice": lambda s, new: s.__delitem__(slice(None, None, 2)),
    "+=": lambda s, new: (s.__iadd__([new]), None)[1],
    "*=": lambda s, new: (s.__imul__(2), None)[1],
    "*= 0": lambda s, new: (s.__imul__(0), None)[1],
}


@pytest.mark.timeout(90)
def test_every_changing_list_operation_on_a_never_touched_future_list(make_runner):
    n = 6
    with running(make_runner()) as r:
        new = r.submit(rt.identity, {"x": "new"})
        assert new.result(timeout=20) == "new"
        for name, mutation in MUTATIONS.items():
            fl = r.map(rt.inc, {"x": range(n)})
            fl.wait(timeout=20)
            assert futures_made(fl) == 0, name
            returned = mutation(fl, new)
            expected = list(range(1, n + 1))
            expected_returned = mutation(expected, "new")
            assert value_of(returned) == expected_returned, name
            assert [value_of(f) for f in fl] == expected, name
            assert len(fl) == len(expected), name
            assert fl.result(timeout=20) == expected, name
            assert isinstance(fl, FutureList), name

        # remove() of a future of its own, and of one that is not there
        fl = r.map(rt.inc, {"x": range(n)})
        with pytest.raises(ValueError):
            fl.remove(new)
        assert futures_made(fl) == n
        fl.remove(fl[2])
        assert fl.result(timeout=20) == [1, 2, 4, 5, 6]
        # in-place operators keep the FutureList
        fl = r.map(rt.inc, {"x": range(3)})
        fl += [new]
        assert isinstance(fl, FutureList) and fl.result(timeout=20) == [1, 2, 3, "new"]
        fl = r.map(rt.inc, {"x": range(3)})
        fl *= 2
        assert isinstance(fl, FutureList) and fl.result(timeout=20) == [1, 2, 3] * 2


def test_a_lazy_future_list_passed_whole_as_a_parameter_or_waited_on(make_runner):
    with running(make_runner()) as r:
        fl = r.map(rt.inc, {"x": range(10)})
        assert r.submit(rt.total, {"xs": fl}).result(timeout=20) == sum(range(1, 11))
        fl = r.map(rt.inc, {"x": range(10)})
        assert r.submit(rt.identity, {"x": {"deep": [fl]}}).result(timeout=20) == \
            {"deep": [list(range(1, 11))]}
        fl = r.map(rt.inc, {"x": range(10)})
        assert r.map(rt.inc, {"x": fl}).result(timeout=20) == list(range(2, 12))
        fl = r.map(rt.inc, {"x": range(10)})
        assert r.submit(rt.noop, wait_for=fl).result(timeout=20) is None
        assert all(f.done() for f in fl)
        fl = r.map(rt.inc, {"x": range(10)})
        done, not_done = taskrunner.wait(fl, timeout=20)
        assert len(done) == 10 and not not_done
        fl = r.map(rt.inc, {"x": range(10)})
        assert sorted(f.result() for f in taskrunner.as_completed(fl, timeout=20)) == \
            list(range(1, 11))


def test_an_unreferenced_lazy_map_still_runs_every_item(make_runner, make_path):
    log = make_path("log")
    with running(make_runner()) as r:
        r.map(rt.record, {"path": log, "x": range(300)})
        gc.collect()
    assert sorted(int(line) for line in read_lines(log)) == list(range(300))


def test_result_and_wait_timeouts_on_a_lazy_map(make_runner, make_gate):
    with running(make_runner()) as r, make_gate() as gate:
        fl = r.map(rt.gated_item, {"x": range(20), "block_on": 13, "gate": gate.path})
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            fl.result(timeout=0.3)
        fl.wait(timeout=0.3)
        assert time.monotonic() - t0 < 10
        assert futures_made(fl) == 0
        gate.open()
        assert fl.result(timeout=20) == list(range(20))


# ============================================== 2. failures, read both ways


@pytest.mark.parametrize("first_read", ["lazily", "through the futures"])
def test_failed_items_keep_their_exceptions_in_place(make_runner, first_read):
    kinds = {2: "task", 5: "value", 6: "key"}
    with running(make_runner()) as r:
        fl = r.map(rt.raise_for, {"x": range(9), "kinds": unmapped(kinds)})
        fl.wait(timeout=20)
        if first_read == "through the futures":
            errors = {i: fl[i].exception(timeout=20) for i in kinds}
            assert futures_made(fl) == 9
        got = fl.result(timeout=20, raise_on_failure=False)
        assert len(got) == 9
        for i, value in enumerate(got):
            if i in kinds:
                assert type(value) is rt.MAPPED_ERRORS[kinds[i]], (i, value)
                assert f"item {i}" in str(value)
            else:
                assert value == i * 10
        # the first failure in input order is raised, the very object
        with pytest.raises(rt.TaskError) as info:
            fl.result(timeout=20)
        assert info.value is got[2]
        # and the futures hold the same objects
        for i in range(9):
            state = fl[i].state
            if i in kinds:
                assert state.type == StateType.FAILED and state.name == "Failed", (i, state)
                assert fl[i].exception(timeout=1) is got[i]
                with pytest.raises(rt.MAPPED_ERRORS[kinds[i]]) as raised:
                    fl[i].result(timeout=1)
                assert raised.value is got[i]
                assert fl[i].result(timeout=1, raise_on_failure=False) is got[i]
            else:
                assert state.is_completed(), (i, state)
                assert fl[i].exception(timeout=1) is None
        if first_read == "through the futures":
            assert all(errors[i] is got[i] for i in kinds)
        again = fl.result(timeout=20, raise_on_failure=False)
        assert all(again[i] is got[i] for i in kinds)


# ================================================= 3. handing over an item


def test_an_item_handed_over_while_it_runs(make_runner, make_gate, make_path):
    """Item 0 runs (blocked on a gate) when fl[0] makes its future: a done
    callback, a downstream and a lazy map below it all see it end once."""
    started, log = make_path("started"), make_path("log")
    callbacks = CallbackLog()
    called = threading.Event()
    gate = make_gate()
    with running(make_runner(max_workers=2)) as r:
        fl = r.map(rt.first_waits, {"x": range(40), "gate": gate.path, "started": started,
                                    "log": log})
        wait_path(started, 20)
        assert futures_made(fl) == 0
        first = fl[0]                        # materializes; item 0 is running
        assert type(first) is TaskFuture
        assert futures_made(fl) == 40
        assert not first.done()
        assert first.state.is_running(), first.state
        first.add_done_callback(callbacks)
        first.add_done_callback(lambda f: called.set())
        down = r.submit(rt.inc, {"x": first})
        below = r.map(rt.add, {"x": range(5), "y": unmapped(first)})
        assert first.cancel() is False       # it is running
        time.sleep(0.2)
        assert callbacks.total() == 0 and not first.done() and not down.done()
        gate.open()
        assert called.wait(20)
        assert first.result(timeout=20) == 0
        assert fl.result(timeout=20) == list(range(40))
        assert down.result(timeout=20) == 1
        assert below.result(timeout=20) == [0, 1, 2, 3, 4]
        assert r.submit(rt.inc, {"x": fl[0]}).result(timeout=20) == 1
    time.sleep(0.1)
    assert callbacks.count(first) == 1 and callbacks.total() == 1
    assert first.state.is_completed()
    assert sorted(int(line) for line in read_lines(log)) == list(range(40))   # each ran once


def test_items_handed_over_while_they_wait_for_an_upstream(make_runner, make_gate):
    """Every item waits for an unmapped upstream when the list is
    materialized: each future is the item's run from then on (callbacks,
    cancel, downstreams)."""
    callbacks = CallbackLog()
    with running(make_runner()) as r, make_gate() as gate:
        up = r.submit(rt.gated, {"value": 100, "gate": gate.path})
        fl = r.map(rt.add, {"x": range(50), "y": unmapped(up)})
        futures = list(fl)
        assert all(f.state.is_pending() for f in futures)
        for f in futures:
            f.add_done_callback(callbacks)
        assert futures[7].cancel() is True
        assert futures[7].state.is_cancelled()
        down = r.submit(rt.total, {"xs": futures[:3]})
        cancelled_down = r.submit(rt.inc, {"x": futures[7]})
        gate.open()
        got = fl.result(timeout=20, raise_on_failure=False)
        assert isinstance(got[7], CancelledRun)
        assert got[:7] + got[8:] == [100 + i for i in range(50) if i != 7]
        assert down.result(timeout=20) == 100 + 101 + 102
        assert_not_ready(cancelled_down, futures[7])
        assert wait_until(lambda: callbacks.total() == 50, 20)
    assert all(callbacks.count(f) == 1 for f in futures)
    assert callbacks.total() == 50


def test_materializing_while_result_blocks_in_another_thread(make_runner, make_gate):
    results = []
    callbacks = CallbackLog()
    with running(make_runner()) as r, make_gate() as gate:
        fl = r.map(rt.gated_item, {"x": range(300), "block_on": 150, "gate": gate.path})
        reader = threading.Thread(target=lambda: results.append(fl.result(timeout=30)))
        reader.start()
        time.sleep(0.3)
        futures = list(fl)                   # while result() waits for item 150
        for f in futures:
            f.add_done_callback(callbacks)
        gate.open()
        reader.join(30)
        assert not reader.is_alive()
        assert results == [list(range(300))]
        assert [f.result(timeout=20) for f in futures] == list(range(300))
        assert wait_until(lambda: callbacks.total() == 300, 20)
    assert all(callbacks.count(f) == 1 for f in futures)


def test_an_item_handed_over_while_it_runs_then_fails(make_runner, make_gate, make_path):
    started = make_path("started")
    kinds = {0: "task", 3: "value"}
    callbacks = CallbackLog()
    with running(make_runner(max_workers=2)) as r, make_gate() as gate:
        fl = r.map(rt.first_waits_then_raise_for, {"x": range(20), "kinds": unmapped(kinds),
                                                   "gate": gate.path, "started": started})
        wait_path(started, 20)
        first = fl[0]
        assert first.state.is_running(), first.state
        for f in fl:
            f.add_done_callback(callbacks)
        down = r.submit(rt.inc, {"x": first})
        gate.open()
        error = first.exception(timeout=20)
        assert type(error) is rt.TaskError and "item 0" in str(error)
        assert first.state.type == StateType.FAILED and first.state.name == "Failed"
        got = fl.result(timeout=20, raise_on_failure=False)
        assert got[0] is error and type(got[3]) is ValueError
        assert [got[i] for i in range(20) if i not in kinds] == \
            [10 * i for i in range(20) if i not in kinds]
        with pytest.raises(rt.TaskError) as info:
            fl.result(timeout=1)
        assert info.value is error
        assert_not_ready(down, first)
        assert wait_until(lambda: callbacks.total() == 20, 20)
    assert all(callbacks.count(f) == 1 for f in fl)


def test_cancelling_handed_over_items_sent_to_a_worker_or_waiting(make_runner, make_gate,
                                                                   make_path):
    """One worker, blocked by item 0.  The process runner has sent the next
    items to the worker (taken, RUNNING, not started), the others wait in
    the engine; the thread runner has them all waiting.  cancel() of a
    handed-over item in either place cancels it, and the runs taken back
    with it run later, each once."""
    n = 3000
    started, log = make_path("started"), make_path("log")
    gate = make_gate()
    with running(make_runner(max_workers=1)) as r:
        fl = r.map(rt.first_waits, {"x": range(n), "gate": gate.path, "started": started,
                                    "log": log})
        wait_path(started, 20)
        time.sleep(0.3)                      # the process runner fills its worker's queue
        futures = list(fl)
        assert futures[0].state.is_running()
        assert futures[5].cancel() is True
        assert futures[5].state.is_cancelled()
        assert futures[2500].cancel() is True
        assert futures[2500].state.is_cancelled()
        assert futures[0].cancel() is False
        gate.open()
        got = fl.result(timeout=30, raise_on_failure=False)
        assert type(got[5]) is CancelledRun and type(got[2500]) is CancelledRun
        assert [got[i] for i in range(n) if i not in (5, 2500)] == \
            [i for i in range(n) if i not in (5, 2500)]
    ran = sorted(int(line) for line in read_lines(log))
    assert ran == [i for i in range(n) if i not in (5, 2500)]    # each once, never 5 or 2500


def test_maps_and_submits_taken_together(make_runner, make_gate):
    """Runs of several maps (lazy and handed over) and single submits are
    ready at once, so a consumer takes them together: each gets its own
    arguments and result."""
    with running(make_runner(max_workers=1)) as r, make_gate() as gate:
        blockers = r.map(rt.gated, {"value": range(25), "gate": gate.path})
        a = r.map(rt.inc, {"x": range(30)})
        s1 = r.submit(rt.add, {"x": 1, "y": 2})
        b = r.map(rt.inc, {"x": range(30, 60)})
        c = r.map(rt.inc, {"x": [5, 3, 1]})
        d = r.map(rt.kwonly, {"x": range(5)})
        s2 = r.submit(rt.inc, {"x": 100})
        e = r.map(rt.pair, {"x": range(3), "y": unmapped("u")})
        f = r.map(rt.inc, {"x": range(10)})
        g = r.map(rt.add, {"x": range(5), "y": unmapped(s1)})
        h = r.map(rt.inc, {"x": range(200, 210)})
        handed_over = list(h)                # ready, handed over before they are taken
        i = r.map(rt.with_kwargs, {"a": range(3), "k": unmapped(1)})
        j = r.map(rt.inc, {"x": range(60, 90)})
        gate.open()
        assert blockers.result(timeout=30) == list(range(25))
        assert a.result(timeout=30) == list(range(1, 31))
        assert s1.result(timeout=30) == 3
        assert b.result(timeout=30) == list(range(31, 61))
        assert c.result(timeout=30) == [6, 4, 2]
        assert d.result(timeout=30) == [0, 5, 10, 15, 20]
        assert s2.result(timeout=30) == 101
        assert e.result(timeout=30) == [(0, "u"), (1, "u"), (2, "u")]
        assert f.result(timeout=30) == list(range(1, 11))
        assert g.result(timeout=30) == [3, 4, 5, 6, 7]
        assert [x.result(timeout=30) for x in handed_over] == list(range(201, 211))
        assert i.result(timeout=30) == [{"a": 0, "k": 1}, {"a": 1, "k": 1}, {"a": 2, "k": 1}]
        assert j.result(timeout=30) == list(range(61, 91))


# ========================================== 4. NotReady below failed items


def test_a_downstream_of_a_failed_item_ends_not_ready(make_runner, make_gate):
    with running(make_runner()) as r, make_gate() as gate:
        # the item has ended when its future is made
        fl = r.map(rt.fail_if, {"x": range(5), "bad": 2})
        fl.wait(timeout=20)
        down = r.submit(rt.inc, {"x": fl[2]})
        assert_not_ready(down, fl[2])
        assert r.submit(rt.inc, {"x": fl[3]}).result(timeout=20) == 4

        # the item has not run yet when its future is made
        bad = r.submit(rt.gated, {"value": 3, "gate": gate.path})
        waiting = r.map(rt.fail_if, {"x": range(5), "bad": unmapped(bad)})
        down = r.submit(rt.inc, {"x": waiting[3]})
        ok = r.submit(rt.inc, {"x": waiting[4]})
        gate.open()
        assert_not_ready(down, waiting[3])
        assert ok.result(timeout=20) == 5

        # a lazy map below a failed item: every item NotReady, read without
        # materializing the list
        fl = r.map(rt.fail_if, {"x": range(5), "bad": 1})
        failed = fl[1]
        below = r.map(rt.add, {"x": range(4), "y": unmapped(failed)})
        got = below.result(timeout=20, raise_on_failure=False)
        assert futures_made(below) == 0
        assert all(isinstance(e, UpstreamTaskError) for e in got), got
        with pytest.raises(UpstreamTaskError):
            below.result(timeout=20)
        for f in below:
            assert_not_ready(f, failed)
        assert [got[i] is below[i].exception() for i in range(4)] == [True] * 4

        # a map over a lazy list with a failed item
        fl = r.map(rt.fail_if, {"x": range(5), "bad": 4})
        second = r.map(rt.inc, {"x": fl})
        assert second.result(timeout=20, raise_on_failure=False)[:4] == [1, 2, 3, 4]
        assert_not_ready(second[4], fl[4])


# ====================================== 5. cancelling a large lazy map


class _Stop(Exception):
    pass


@pytest.mark.parametrize("materialize", [False, True], ids=["lazy", "materialized"])
@pytest.mark.parametrize("how", ["cancel_all", "exit-by-exception"])
def test_cancelling_a_large_lazy_map(make_runner, make_gate, make_path, how, materialize):
    """Every item blocks on a gate: the runner starts one (threads,
    max_workers=1) or up to two (processes), and the others are cancelled,
    never run, and end CANCELLED, with or without their futures made."""
    n = 3000
    started, log = make_path("started"), make_path("log")
    gate = make_gate()
    callbacks = CallbackLog()
    runner = make_runner(max_workers=1 if make_runner is _threadpool else 2)
    workers = runner.max_workers
    with pytest.raises(_Stop) if how != "cancel_all" else contextlib.nullcontext():
        with running(runner) as r:
            fl = r.map(rt.gated, {"value": range(n), "gate": gate.path, "started": started,
                                  "log": log})
            wait_path(started, 20)
            time.sleep(0.2)                  # the process runner sends a batch or two
            if materialize:
                for f in fl:
                    f.add_done_callback(callbacks)
            if how == "cancel_all":
                r.cancel_all()
                gate.open()
                fl.wait(timeout=20)
            else:
                gate.open_after(0.3)
                raise _Stop()
    got = fl.result(timeout=5, raise_on_failure=False)
    ran = sorted(int(line) for line in read_lines(log))
    assert 1 <= len(ran) <= workers, ran
    assert all(got[i] == i for i in ran)
    cancelled = [i for i in range(n) if i not in ran]
    assert all(type(got[i]) is CancelledRun for i in cancelled), \
        [got[i] for i in cancelled if type(got[i]) is not CancelledRun][:3]
    with pytest.raises(CancelledRun):
        fl.result(timeout=5)
    assert all(f.done() for f in fl)
    assert all(fl[i].state.is_cancelled() for i in cancelled)
    assert all(fl[i].state.is_completed() for i in ran)
    if materialize:
        assert callbacks.total() == n and all(callbacks.count(f) == 1 for f in fl)
    else:                                    # made after the end: called at once
        for f in fl:
            f.add_done_callback(callbacks)
        assert callbacks.total() == n


def test_cancel_all_over_a_lazy_map_behind_a_running_item(make_runner, make_gate, make_path):
    """The brief's case: item 0 blocks, the rest wait behind it on a single
    worker thread (or both worker processes hold batches)."""
    started, log = make_path("started"), make_path("log")
    runner = make_runner(max_workers=1)
    with running(runner) as r, make_gate() as gate:
        fl = r.map(rt.first_waits, {"x": range(2000), "gate": gate.path, "started": started,
                                    "log": log})
        wait_path(started, 20)
        r.cancel_all()
        gate.open()
        got = fl.result(timeout=20, raise_on_failure=False)
        assert got[0] == 0
        assert all(type(e) is CancelledRun for e in got[1:])
        assert r.map(rt.inc, {"x": range(10)}).result(timeout=20) == list(range(1, 11))
    assert read_lines(log) == ["0"]
    assert all(f.done() for f in fl)


# ============================================ 6. a worker process killed


@pytest.mark.timeout(90)
@pytest.mark.parametrize("materialize", [False, True], ids=["lazy", "materialized"])
def test_a_worker_killed_during_a_lazy_map(make_path, materialize):
    """Item 1000 of 2000 publishes its worker's pid and waits; the test kills
    that worker.  Item 1000 ends CRASHED; the runs queued behind it on the
    dead worker run again; every item ends, each once, with its value."""
    n, bad = 2000, 1000
    pidfile = make_path("pid")
    callbacks = CallbackLog()
    with running(ProcessPoolTaskRunner(max_workers=2), exit_timeout=30) as r:
        fl = r.map(rt.crash_on, {"x": range(n), "bad": bad, "how": "external",
                                 "pidfile": pidfile})
        wait_path(pidfile, 30)
        if materialize:                      # item `bad` is running: handed over
            for f in fl:
                f.add_done_callback(callbacks)
            assert fl[bad].state.is_running()
        os.kill(rt.read_pid(pidfile), signal.SIGKILL)
        got = fl.result(timeout=30, raise_on_failure=False)
        assert isinstance(got[bad], CrashedRun), got[bad]
        assert re.search(r"SIGKILL|signal\D{0,3}\b9\b", str(got[bad])), str(got[bad])
        assert got[:bad] + got[bad + 1:] == [10 * i for i in range(n) if i != bad]
        with pytest.raises(CrashedRun):
            fl.result(timeout=1)
        crashed = fl[bad]
        assert crashed.state.type == StateType.CRASHED
        assert crashed.exception() is got[bad]
        assert_not_ready(r.submit(rt.inc, {"x": crashed}), crashed)
        assert r.map(rt.inc, {"x": range(100)}).result(timeout=20) == list(range(1, 101))
    assert all(f.done() for f in fl)
    assert sum(f.state.is_crashed() for f in fl) == 1
    if materialize:
        assert wait_until(lambda: callbacks.total() == n, 10)
        assert all(callbacks.count(f) == 1 for f in fl)


@pytest.mark.timeout(90)
def test_a_worker_killed_at_random_during_a_lazy_map_loses_no_item(make_path):
    """SIGKILL one of two busy workers amid 2000 short runs: at most the run
    it was running ends CRASHED; every other item completes with its value."""
    n = 2000
    with running(ProcessPoolTaskRunner(max_workers=2), exit_timeout=30) as r:
        paths = [make_path("rendezvous") for _ in range(2)]
        pids = [f.result(timeout=30)[0] for f in [
            r.submit(rt.rendezvous, {"me": p, "others": [q for q in paths if q != p]})
            for p in paths]]
        assert len(set(pids)) == 2
        fl = r.map(rt.sleep_then, {"x": range(n), "seconds": 0.002})
        fl.wait(timeout=0.5)
        os.kill(pids[0], signal.SIGKILL)
        got = fl.result(timeout=60, raise_on_failure=False)
        crashed = [i for i, v in enumerate(got) if isinstance(v, CrashedRun)]
        assert len(crashed) <= 1, crashed
        assert [v for i, v in enumerate(got) if i not in crashed] == \
            [i for i in range(n) if i not in crashed]
        for i in crashed:
            assert fl[i].state.is_crashed()
    assert all(f.done() for f in fl)


# ================================= 7. the calls a block builds, both runners


def _generator(n):
    for i in range(n):
        yield i * i


def test_maps_over_ranges_lists_tuples_and_generators(make_runner):
    with running(make_runner()) as r:
        cases = [
            ({"x": range(50)}, [i + 1 for i in range(50)]),
            ({"x": range(5, 80, 3)}, [i + 1 for i in range(5, 80, 3)]),
            ({"x": range(10, 0, -2)}, [11, 9, 7, 5, 3]),
            ({"x": range(2**62, 2**62 + 40)}, [2**62 + i + 1 for i in range(40)]),
            ({"x": range(20000)}, [i + 1 for i in range(20000)]),     # several chunks
            ({"x": list(range(17000))}, [i + 1 for i in range(17000)]),
            ({"x": range(0)}, []),
            ({"x": [3, 1, 2]}, [4, 2, 3]),
            ({"x": [1, 2, 3, 4]}, [2, 3, 4, 5]),
            ({"x": [0.5, -1.5]}, [1.5, -0.5]),
            ({"x": (10, 20, 30)}, [11, 21, 31]),
            ({"x": _generator(6)}, [i * i + 1 for i in range(6)]),
            ({"x": (i for i in range(3000))}, [i + 1 for i in range(3000)]),
        ]
        maps = [(r.map(rt.inc, parameters), expected) for parameters, expected in cases]
        for fl, expected in maps:
            assert len(fl) == len(expected)
            assert fl.result(timeout=30) == expected
        assert r.map(rt.identity, {"x": ["a", None, b"b", True, 1.0]}).result(timeout=20) == \
            ["a", None, b"b", True, 1.0]
        assert r.map(rt.async_inc, {"x": range(20)}).result(timeout=20) == list(range(1, 21))
        # items that are containers or annotations, with no future in them
        assert r.map(rt.identity, {"x": [quote([1, 2]), (3, 4), {"k": [5]}, rt.Pair(1, 2),
                                         allow_failure(6), 7]}).result(timeout=20) == \
            [[1, 2], (3, 4), {"k": [5]}, rt.Pair(1, 2), 6, 7]
        assert r.map(rt.pair, {"x": [quote("q"), 1], "y": unmapped(quote([0]))}) \
            .result(timeout=20) == [("q", [0]), (1, [0])]
        # items with futures inside (one future each, as before)
        up = r.submit(rt.inc, {"x": 1})
        fails = r.submit(rt.fail, {"message": "no"})
        fl = r.map(rt.identity, {"x": [[up], {"k": up}, 3, (up, 4), allow_failure(fails)]})
        got = fl.result(timeout=20)
        assert got[:4] == [[2], {"k": 2}, 3, (2, 4)]
        assert type(got[4]) is ValueError and str(got[4]) == "no"
        assert r.map(rt.async_add, {"x": range(3), "y": unmapped(1)}).result(timeout=20) == \
            [1, 2, 3]


def test_maps_with_several_mapped_unmapped_and_keyword_parameters(make_runner):
    with running(make_runner()) as r:
        up = r.submit(rt.inc, {"x": 9})
        cases = [
            # two mapped positionals
            (rt.pair, {"x": [1, 2, 3], "y": ("a", "b", "c")}, [(1, "a"), (2, "b"), (3, "c")]),
            (rt.add, {"x": range(4), "y": range(10, 14)}, [10, 12, 14, 16]),
            # two mapped and one unmapped (positional), failing where `bad`
            (rt.node, {"i": range(4), "xs": unmapped([1, 2]), "bad": [False] * 4},
             [3, 4, 5, 6]),
            # a mapped second positional after a static first one
            (rt.concat, {"x": "p", "s": ["a", "b"]}, ["p:a", "p:b"]),
            (rt.add, {"x": 100, "y": range(3)}, [100, 101, 102]),
            (rt.add, {"x": range(3), "y": unmapped(10)}, [10, 11, 12]),
            (rt.length, {"x": range(3), "y": unmapped([1, 2, 3, 4])}, [(0, 4), (1, 4), (2, 4)]),
            # an unmapped future
            (rt.add, {"x": range(3), "y": unmapped(up)}, [10, 11, 12]),
            (rt.add, {"y": range(3), "x": up}, [10, 11, 12]),
            # defaults
            (rt.add_default, {"x": range(3)}, [100, 101, 102]),
            (rt.add_default, {"x": range(3), "y": [1, 1, 1]}, [1, 2, 3]),
            # keyword-only, mapped
            (rt.kwonly, {"x": range(4)}, [0, 5, 10, 15]),
            (rt.kwonly, {"x": [1, 2], "y": [3, 4]}, [3, 8]),
            (rt.kwonly, {"x": range(3), "y": unmapped(2)}, [0, 2, 4]),
            (rt.kwonly, {"y": range(3), "x": 7}, [0, 7, 14]),
            # **kwargs: a mapped extra keyword, an unmapped one, a static one
            (rt.with_kwargs, {"a": range(2), "k": ["x", "y"], "u": unmapped([1, 2])},
             [{"a": 0, "k": "x", "u": [1, 2]}, {"a": 1, "k": "y", "u": [1, 2]}]),
            (rt.with_kwargs, {"a": range(3), "s": 5},
             [{"a": 0, "s": 5}, {"a": 1, "s": 5}, {"a": 2, "s": 5}]),
            (rt.with_kwargs, {"a": 1, "k": range(2)}, [{"a": 1, "k": 0}, {"a": 1, "k": 1}]),
        ]
        maps = [(r.map(task, parameters), expected, task.__name__)
                for task, parameters, expected in cases]
        for fl, expected, name in maps:
            assert fl.result(timeout=30) == expected, name

        fl = r.map(rt.node, {"i": range(4), "xs": unmapped([1, 2]), "bad": [False, True] * 2})
        got = fl.result(timeout=20, raise_on_failure=False)
        assert got[0] == 3 and got[2] == 5
        assert [type(got[i]) for i in (1, 3)] == [ValueError, ValueError]
        assert "node 1 failed" in str(got[1]) and "node 3 failed" in str(got[3])


# ================================================ 8. the engine interface


def _engine():
    from taskrunner._engine import Engine

    return Engine(4)


class _Remote:
    """A runner elsewhere, as the tests drive it: an engine and its Outbox.
    What it takes it marks sent at once (as a runner does before a run can
    start), so a taken run is RUNNING and cancel() cannot take it back."""

    def __init__(self, engine):
        from taskrunner._remote import Outbox

        self.engine = engine
        self.box = Outbox(engine)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def take_runs(self, max_n, timeout=None):
        runs = self.box.take(max_n, timeout)
        return runs if runs is None or not len(runs) else self.box.mark_sent(runs)

    def calls_of(self, runs, singles=False):
        groups = self.box.calls(runs, singles)
        return groups if singles else [group[:3] for group in groups]

    def finish(self, runs, values, states):
        self.box.finish(runs, values, states)

    def give_back(self, runs, cancel):
        self.box.give_back(runs, cancel)


def test_engine_take_runs_calls_of_and_finish_over_a_block():
    from taskrunner._graph import STATES
    from taskrunner._mapped import RunList

    completed = STATES["COMPLETED"]
    e = _Remote(_engine())
    try:
        fl = e.map(rt.inc, {"x": range(10)})
        assert isinstance(fl, FutureList) and len(fl) == 10
        assert e.unfinished == 10
        runs = e.take_runs(4)
        assert type(runs) is RunList and len(runs) == 4
        part = runs[1:3]
        assert type(part) is RunList and len(part) == 2
        assert len(runs[-1:]) == 1 and len(runs[3:1]) == 0
        with pytest.raises(ValueError):
            runs[::2]
        with pytest.raises(IndexError):
            runs[4]
        assert e.take_runs(4, 0) is not None and len(e.take_runs(4, 0)) == 0   # 4 at most
        groups = e.calls_of(runs, True)
        assert len(groups) == 1
        spec, args, kwargs, single = groups[0]
        assert spec.task is rt.inc
        assert args == range(0, 4) and type(args) is range
        assert kwargs is None and single is True
        assert e.calls_of(part, True)[0][1] == range(1, 3)
        [(spec, args, kwargs)] = e.calls_of(runs)
        assert args == [(0,), (1,), (2,), (3,)] and kwargs is None

        # wrong lengths or states: ValueError, and nothing ends
        with pytest.raises(ValueError, match="futures and values differ in length"):
            e.finish(runs, [1, 2, 3], completed)
        with pytest.raises(ValueError, match="futures and values differ in length"):
            e.finish(runs, [1, 2, 3, 4, 5], completed)
        with pytest.raises(ValueError, match="futures and states differ in length"):
            e.finish(runs, [1, 2, 3, 4], [completed] * 3)
        for bad in (STATES["CANCELLED"], STATES["RUNNING"], STATES["NOT_READY"], 99):
            with pytest.raises(ValueError, match=f"cannot finish a run as state {bad}"):
                e.finish(runs, [1, 2, 3, 4], bad)
        with pytest.raises(ValueError, match="cannot finish a run as state"):
            e.finish(runs, [1, 2, 3, 4], [completed, completed, completed, STATES["PENDING"]])
        with pytest.raises(TypeError):
            e.finish(runs, [1, 2, 3, 4], "COMPLETED")
        assert e.unfinished == 10
        with pytest.raises(TimeoutError):
            fl.result(timeout=0)

        e.finish(runs, [100, 101, 102, 103], completed)
        assert e.unfinished == 6
        with pytest.raises(TimeoutError):
            fl.result(timeout=0.05)          # 6 items still wait
        fl.wait(timeout=0.05)
        assert futures_made(fl) == 0

        rest = e.take_runs(10)
        assert len(rest) == 4
        assert e.calls_of(rest, True)[0][1] == range(4, 8)
        e.finish(rest, [104, ValueError("five"), 106, CrashedRun("seven")],
                 [completed, STATES["FAILED"], completed, STATES["CRASHED"]])
        last = e.take_runs(10)
        assert len(last) == 2 and e.calls_of(last, True)[0][1] == range(8, 10)
        e.finish(last, [108, 109], completed)
        assert e.unfinished == 0

        got = fl.result(timeout=1, raise_on_failure=False)
        assert got[:5] + [got[6], got[8], got[9]] == [100, 101, 102, 103, 104, 106, 108, 109]
        assert type(got[5]) is ValueError and str(got[5]) == "five"
        assert type(got[7]) is CrashedRun
        with pytest.raises(ValueError, match="five"):
            fl.result(timeout=1)
        assert fl[5].state.is_failed() and fl[7].state.is_crashed()
        assert fl[5].exception() is got[5] and fl[7].exception() is got[7]
        assert [f.result(timeout=1) for i, f in enumerate(fl) if i not in (5, 7)] == \
            [100, 101, 102, 103, 104, 106, 108, 109]
    finally:
        e.close()


def test_a_runlist_view_shares_the_runs_and_outlives_its_list():
    # The process feeder cuts what it took into batches as views: the same
    # runs, clipped to the list, the list kept alive by any view of it.
    from taskrunner._graph import STATES

    completed = STATES["COMPLETED"]
    e = _Remote(_engine())          # 4 runs out at most
    try:
        fl = e.map(rt.inc, {"x": range(6)})
        runs = e.take_runs(4)
        ids = runs.run_ids()
        assert len(ids) == 4
        batch = runs.view(1, 3)
        assert len(batch) == 2 and batch.run_ids() == ids[1:3]
        assert batch.view(1, 10).run_ids() == ids[2:3]          # a view of a view, clipped
        assert len(runs.view(3, 2)) == 0 and runs.view(-3, 2).run_ids() == ids[:2]
        assert runs.view(0, 99).run_ids() == ids
        assert e.calls_of(batch, True)[0][1] == range(1, 3)
        head, tail = runs.view(0, 1), runs.view(3, 4)
        del runs                                # the views still hold the runs
        gc.collect()
        # A view the cyclic GC collects must not be taken for an owner (its
        # list cleared first, it would let go of references it never held).
        inner = head.view(0, 1)
        cycle = [inner]
        cycle.append(cycle)
        del inner, cycle
        gc.collect()
        e.finish(batch, [11, 12], completed)
        e.finish(head, [10], completed)
        e.finish(tail, [13], completed)
        e.finish(e.take_runs(10), [14, 15], completed)
        assert fl.result(timeout=1) == list(range(10, 16))
    finally:
        e.close()


def test_engine_give_back_cancels_or_requeues_taken_items():
    from taskrunner._graph import STATES

    completed = STATES["COMPLETED"]
    e = _Remote(_engine())
    try:
        fl = e.map(rt.inc, {"x": range(8)})
        runs = e.take_runs(4)
        e.give_back(runs[0:2], True)         # items 0, 1: cancelled
        e.give_back(runs[2:4], False)        # items 2, 3: ready again, behind 4..7
        assert e.unfinished == 6
        order = []
        while e.unfinished:
            taken = e.take_runs(4, 1)
            assert len(taken) > 0
            [(_, args, _, _)] = e.calls_of(taken, True)
            order.extend(args)
            e.finish(taken, [10 * x for x in args], completed)
        assert sorted(order) == [2, 3, 4, 5, 6, 7]          # each item once
        got = fl.result(timeout=1, raise_on_failure=False)
        assert type(got[0]) is CancelledRun and type(got[1]) is CancelledRun
        assert got[2:] == [20, 30, 40, 50, 60, 70]
        with pytest.raises(CancelledRun):
            fl.result(timeout=1)
        assert fl[0].state.is_cancelled() and fl[1].state.is_cancelled()
        assert fl[2].state.is_completed()
    finally:
        e.close()


def test_engine_defers_to_a_future_handed_over_while_taken():
    """A RunList index, or fl[i], makes the future of an item a consumer has
    taken: calls_of, give_back and finish then go through that future."""
    from taskrunner._graph import STATES

    completed = STATES["COMPLETED"]
    callbacks = CallbackLog()
    e = _Remote(_engine())
    try:
        fl = e.map(rt.inc, {"x": range(6)})
        runs = e.take_runs(4)                # items 0..3 are RUNNING
        second = runs[1]                     # hands item 1 over
        assert type(second) is TaskFuture and second.state.is_running()
        assert runs.position_of(runs.run_ids()[1]) == 1
        assert runs[1] is second and list(runs)[1] is second
        second.add_done_callback(callbacks)
        # the stretch of a range goes on through the handed-over item
        [(spec, args, kwargs, single)] = e.calls_of(runs, True)
        assert list(args) == [0, 1, 2, 3] and single

        futures = list(fl)                   # the rest: 0, 2, 3 running, 4, 5 ready
        assert futures[1] is second
        for f in futures:
            if f is not second:
                f.add_done_callback(callbacks)
        assert [f.state.is_running() for f in futures] == [True] * 4 + [False] * 2
        assert futures[4].cancel() is True   # waiting: cancelled at once
        assert futures[0].cancel() is False  # taken: running

        e.give_back(runs[2:3], True)         # item 2, handed over, cancelled
        e.give_back(runs[3:4], False)        # item 3, handed over, ready again
        assert futures[2].state.is_cancelled()
        assert not futures[3].state.is_running()
        e.finish(runs[0:2], [ValueError("zero"), 11], [STATES["FAILED"], completed])
        assert second.result(timeout=1) == 11
        rest = e.take_runs(4, 1)
        [(spec, args, kwargs, single)] = e.calls_of(rest, True)
        assert sorted(args) == [3, 5]
        e.finish(rest, [10 * x for x in args], completed)
        assert e.unfinished == 0

        got = fl.result(timeout=1, raise_on_failure=False)
        assert type(got[0]) is ValueError and got[0] is futures[0].exception()
        assert got[1] == 11 and got[3] == 30 and got[5] == 50
        assert type(got[2]) is CancelledRun and type(got[4]) is CancelledRun
        assert callbacks.total() == 6 and all(callbacks.count(f) == 1 for f in futures)
    finally:
        e.close()


def test_engine_calls_of_keyword_and_several_mapped_parameters():
    e = _Remote(_engine())
    try:
        fl = e.map(rt.add, {"x": range(2), "y": unmapped(10)})
        taken = e.take_runs(4)
        [(spec, args, kwargs, single)] = e.calls_of(taken, True)
        assert spec.task is rt.add and args == [(0, 10), (1, 10)] and not single
        assert kwargs is None
        e.give_back(taken, True)

        fl = e.map(rt.kwonly, {"x": [1, 2], "y": range(3, 5)})
        taken = e.take_runs(4)
        [(spec, args, kwargs, single)] = e.calls_of(taken, True)
        assert spec.task is rt.kwonly and not single
        assert [dict(k) for k in kwargs] == [{"x": 1, "y": 3}, {"x": 2, "y": 4}]
        assert all(len(a) == 0 for a in args)
        e.give_back(taken, True)
        assert [type(v) for v in fl.result(timeout=1, raise_on_failure=False)] == \
            [CancelledRun, CancelledRun]

        with pytest.raises(ValueError):
            e.take_runs(0)
    finally:
        e.close()


# ======================================== waiting inside a task (threads)


def test_a_task_waiting_on_a_lazy_map_gives_its_worker_up():
    """With one worker thread, a task that maps and waits for the results
    must give its place up while it waits (or nothing could run them)."""
    with running(ThreadPoolTaskRunner(max_workers=1)) as r:
        def outer(n, how):
            fl = r.map(rt.inc, {"x": range(n)})
            if how == "wait":
                fl.wait(timeout=20)
                return [f.result(timeout=0) for f in fl]
            return fl.result(timeout=20)

        assert r.submit(outer, {"n": 50, "how": "result"}).result(timeout=30) == \
            list(range(1, 51))
        assert r.submit(outer, {"n": 50, "how": "wait"}).result(timeout=30) == \
            list(range(1, 51))


# ============================================ unpicklable results (processes)


def test_a_lazy_map_item_whose_result_cannot_travel_fails_alone():
    with running(ProcessPoolTaskRunner(max_workers=1)) as r:
        for kind in ("result-holding-a-lock", "exception-failing-to-unpickle"):
            fl = r.map(rt.unpicklable_on, {"x": range(40), "bad": 11, "kind": kind})
            got = fl.result(timeout=20, raise_on_failure=False)
            assert isinstance(got[11], Exception), (kind, got[11])
            text = str(got[11]) + str(got[11].__cause__ or got[11].__context__ or "")
            assert rt.UNPICKLABLE_KINDS[kind] in text, text
            assert got[:11] + got[12:] == [i for i in range(40) if i != 11]
            assert fl[11].state.is_failed() and fl[11].exception() is got[11]


# ========================================================= run slots


def test_lazy_maps_give_their_run_slots_back(make_runner, make_gate, make_path):
    """Once its items have ended and nothing references it, a block (and
    the futures made from it) lets go of every run slot, however its items
    ended: a block that miscounted its unfinished items would stay alive
    and keep them all."""
    is_threads = make_runner is _threadpool
    with running(make_runner(max_workers=2)) as r:
        graph = r._engine.graph
        fl = r.map(rt.inc, {"x": range(500)})
        assert fl.result(timeout=20)[-1] == 500

        fl = r.map(rt.fail_if, {"x": range(500), "bad": 7})
        fl.result(timeout=20, raise_on_failure=False)

        fl = r.map(rt.inc, {"x": range(500)})
        futures = list(fl)
        fl.wait(timeout=20)

        with make_gate() as gate:            # handed over while waiting; one cancelled
            up = r.submit(rt.gated, {"value": 1, "gate": gate.path})
            fl = r.map(rt.add, {"x": range(500), "y": unmapped(up)})
            futures = list(fl)
            assert futures[3].cancel() is True
        fl.wait(timeout=20)

        started = make_path("started")
        with make_gate() as gate:            # handed over while running
            fl = r.map(rt.first_waits, {"x": range(50), "gate": gate.path,
                                        "started": started, "log": make_path("log")})
            wait_path(started, 20)
            futures = list(fl)
        assert fl.result(timeout=20) == list(range(50))

        started = make_path("started")
        with make_gate() as gate:            # cancel_all, lazy
            fl = r.map(rt.gated, {"value": range(500), "gate": gate.path, "started": started})
            wait_path(started, 20)
            r.cancel_all()
        fl.wait(timeout=20)

        if not is_threads:                   # a worker killed
            pidfile = make_path("pid")
            fl = r.map(rt.crash_on, {"x": range(100), "bad": 40, "how": "sigkill",
                                     "pidfile": pidfile})
            assert isinstance(fl.result(timeout=30, raise_on_failure=False)[40], CrashedRun)

        # runs cancelled while queued leave the ready queue (and free their
        # slots) when a worker next takes from it
        assert r.map(rt.inc, {"x": range(4)}).result(timeout=20) == [1, 2, 3, 4]
        del fl, futures, up
        if is_threads:
            gc.collect()
            assert wait_until(lambda: (gc.collect() or True) and graph.n_live == 0, 5), \
                graph.n_live
    gc.collect()
    assert graph.n_live == 0
    assert graph.n_unfinished == 0


def test_engine_take_ready_and_finish_with_futures_give_a_block_back():
    # REGRESSION TEST for a bug found in the committed code (6d30eb3, still
    # in 0286504); it fails there.  take_ready() returned list(take_runs()):
    # each taken item was handed over while RUNNING, so its block kept
    # counting it (MapBlock.pending) until it ended, but finish() given that
    # list of futures wraps the futures themselves in a RunList
    # (_as_runlist), never sees that they stand for mapped items, and never
    # decremented the count: the block was never released and kept every run
    # slot of the map (and its futures and results) for as long as the engine
    # lived.  DaskTaskRunner uses take_ready() + finish(list), so every map
    # it ran leaked: r.map(inc, {"x": range(200)}).result(); del it -> 200
    # slots still live, even after the runner's exit.  (take_runs() +
    # finish(RunList), as the process runner does, was fine.)
    from taskrunner._graph import STATES

    # take_ready() is gone; its case is taken items handed over to their
    # futures (list(taken)) and finished through the RunList.
    e = _Remote(_engine())
    try:
        graph = e.graph
        fl = e.map(rt.inc, {"x": range(6)})
        while e.unfinished:
            taken = e.take_runs(4, 1)
            assert all(type(f) is TaskFuture for f in list(taken))
            e.finish(taken, [f"v{i}" for i in range(len(taken))], STATES["COMPLETED"])
        assert fl.result(timeout=1) == ["v0", "v1", "v2", "v3", "v0", "v1"]
        del fl, taken
        gc.collect()
        assert graph.n_live == 0
    finally:
        e.close()


# ================================== laziness of maps over other values


def test_a_map_over_items_without_futures_that_are_not_plain_values_is_lazy_too(make_runner):
    # REGRESSION TEST for a bug found in the committed code (6d30eb3, still
    # in 0286504); it fails there.  "map() whose items hold no futures
    # returns a FutureList backed by a MapBlock: no TaskFuture is created per
    # item."  But Engine.map allocated its per-item upstream table (`first`)
    # as soon as an item was not a plain int/str/float/bool/bytes/None,
    # whether or not scanning it found a future, and `if first == NULL and
    # ...` then sent the map down the old path: a map over tuples, lists,
    # dicts or any other object made one TaskFuture per item up front.
    with running(make_runner()) as r:
        fl = r.map(rt.identity, {"x": [(1, 2), [3], {"a": 4}, rt.Colour.RED]})
        assert fl.result(timeout=20) == [(1, 2), [3], {"a": 4}, rt.Colour.RED]
        assert futures_made(fl) == 0
