"""imap(): the streaming map, on every runner (see taskrunner/streaming.py).

Each point of the streaming-map issue: lazy reading within `buffer`, map()'s
parameter rules, ordered and completion order, length mismatches, failures,
leaving early, the runner's exit and cancel_all(), and pipelines of stages.
The process- and Dask-specific points (crashed workers, batches) are at the
end; resident memory is measured in test_streaming_memory.py.
"""

import gc
import itertools
import os
import signal

import pytest

from taskrunner import (
    CancelledRun,
    CrashedRun,
    MappingLengthMismatch,
    MappingMissingIterable,
    unmapped,
)

import runner_tasks as rt
from harness import running
from runner_tasks import read_lines, wait_path

pytestmark = pytest.mark.timeout(120)


class Counted:
    """An input generator that counts the items read from it."""

    def __init__(self, n):
        self.n = n
        self.read = 0

    def __iter__(self):
        for i in range(self.n):
            self.read += 1
            yield i


# ================================================================ 1. lazy reading


def test_imap_returns_an_iterator_of_results_in_input_order(runner_factory):
    with running(runner_factory()) as r:
        results = r.imap(rt.inc, {"x": (i for i in range(500))})
        assert iter(results) is results
        assert list(results) == list(range(1, 501))
        assert list(r.imap(rt.inc, {"x": []})) == []


@pytest.mark.parametrize("ordered", [True, False])
def test_at_most_buffer_items_are_read_and_not_yet_yielded(runner_factory, ordered):
    source = Counted(1000)
    with running(runner_factory(max_workers=2)) as r:
        results = r.imap(rt.inc, {"x": source}, buffer=7, ordered=ordered)
        assert source.read == 0               # nothing read before the first step
        got = []
        for value in results:
            got.append(value)
            assert source.read - len(got) <= 7, (source.read, len(got))
            if len(got) == 30:
                break
        assert source.read <= 30 + 7
        assert sorted(got) == got if ordered else True
        assert len(got) == 30


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True, [4]])
def test_an_explicit_buffer_must_be_a_positive_int(runner_factory, bad):
    source = Counted(10)
    with running(runner_factory()) as r:
        with pytest.raises(ValueError, match="buffer"):
            r.imap(rt.inc, {"x": source}, buffer=bad)
        assert source.read == 0
        assert list(r.imap(rt.inc, {"x": source}, buffer=1)) == list(range(1, 11))


def test_buffer_none_keeps_every_worker_busy(runner_factory, make_path):
    """With the default buffer both workers run at once: each of these two
    runs completes only when the other has started."""
    a, b = make_path("a"), make_path("b")
    with running(runner_factory(max_workers=2)) as r:
        met = list(r.imap(rt.rendezvous, {"me": [a, b], "others": [[b], [a]],
                                            "timeout": unmapped(30)}))
        assert len(met) == 2


def test_buffer_none_reads_a_bounded_window_ahead(runner_factory):
    from taskrunner.streaming import MAX_AUTO_BUFFER

    # 4,000 results: past the window's growth before a rate is known
    # (UNTIMED_LIMIT), and a few seconds on an in-process Dask worker, which
    # costs some 3-4 ms a task on a small machine (as the raw client does).
    consumed = 4_000
    source = Counted(10_000_000)
    with running(runner_factory(max_workers=2)) as r:
        results = r.imap(rt.inc, {"x": source})
        for count, _ in enumerate(itertools.islice(results, consumed), 1):
            assert source.read - count <= MAX_AUTO_BUFFER
        results.close()
        assert source.read <= consumed + MAX_AUTO_BUFFER


def test_parameters_follow_the_rules_of_map(runner_factory):
    with running(runner_factory()) as r:
        # zipped item by item; unmapped and non-iterables go whole
        assert list(r.imap(rt.length, {"x": iter([1, 2, 3]), "y": unmapped([1, 2])})) == \
            [(1, 2), (2, 2), (3, 2)]
        assert list(r.imap(rt.add, {"x": iter([1, 2, 3]), "y": 10})) == [11, 12, 13]
        assert list(r.imap(rt.pair, {"x": (i for i in range(3)),
                                      "y": (c for c in "abc")})) == \
            [(0, "a"), (1, "b"), (2, "c")]
        # a future: waited for, and its result used (mapped if iterable)
        listed = r.submit(rt.make_range, {"n": 4})
        assert list(r.imap(rt.inc, {"x": listed})) == [1, 2, 3, 4]
        ten = r.submit(rt.identity, {"x": 10})
        assert list(r.imap(rt.add, {"x": range(3), "y": ten})) == [10, 11, 12]
        # wait_for holds every run
        first = r.submit(rt.identity, {"x": 1})
        assert list(r.imap(rt.inc, {"x": range(3)}, wait_for=[first])) == [1, 2, 3]


def test_a_bad_call_fails_at_the_call(runner_factory):
    source = Counted(10)
    with running(runner_factory()) as r:
        with pytest.raises(TypeError):
            r.imap(rt.inc, {"x": source, "nope": 1})
        with pytest.raises(TypeError):
            r.imap(42, {"x": source})
        assert source.read == 0


def test_imap_needs_an_entered_runner(runner_factory):
    runner = runner_factory()
    with pytest.raises(RuntimeError):
        runner.imap(rt.inc, {"x": [1]})


# ================================================================ 2. order


def test_ordered_yields_in_input_order_whatever_order_runs_end(runner_factory):
    with running(runner_factory(max_workers=2)) as r:
        results = r.imap(rt.sleep_reverse, {"x": range(8), "n": 8, "unit": 0.02}, buffer=8)
        assert list(results) == [10 * i for i in range(8)]


def test_unordered_yields_as_runs_end_and_goes_past_a_slow_item(runner_factory, make_gate):
    """Item 0 waits until every other item has been yielded: with a window
    of 4 that is possible only if the slow item holds no worker but its own
    and the others go past it."""
    n = 40
    gate = make_gate()
    with running(runner_factory(max_workers=2)) as r, gate:
        results = r.imap(rt.gated_item, {"x": range(n), "block_on": 0, "gate": gate.path},
                         ordered=False, buffer=4)
        got = [next(results) for _ in range(n - 1)]
        assert sorted(got) == list(range(1, n))
        gate.open()
        assert next(results) == 0
        with pytest.raises(StopIteration):
            next(results)


# ================================================================ 3. lengths


@pytest.mark.parametrize("ordered", [True, False])
def test_iterables_of_different_lengths_raise_after_the_results_before(runner_factory, ordered):
    with running(runner_factory()) as r:
        results = r.imap(rt.add, {"x": iter(range(5)), "y": (i for i in range(100, 108))},
                         ordered=ordered)
        got = []
        with pytest.raises(MappingLengthMismatch) as info:
            for value in results:
                got.append(value)
        assert sorted(got) == [100, 102, 104, 106, 108]
        assert "'x'" in str(info.value) and "'y'" in str(info.value)
        # the longer one first
        results = r.imap(rt.add, {"x": iter(range(10)), "y": [1, 2]}, buffer=3)
        assert next(results) == 1 and next(results) == 3
        with pytest.raises(MappingLengthMismatch):
            next(results)


def test_no_iterable_raises_at_the_call(runner_factory):
    with running(runner_factory()) as r:
        with pytest.raises(MappingMissingIterable):
            r.imap(rt.add, {"x": 1, "y": unmapped([1, 2])})
        with pytest.raises(MappingMissingIterable):
            r.imap(rt.inc, {"x": "text is not mapped"})


# ================================================================ 4. failures


def test_a_failure_raises_its_exception_and_cancels_the_runs_not_started(
        runner_factory, make_gate, make_path):
    """Items after the bad one wait for a gate: two of them hold the two
    workers when the failure is reached, and the others never run."""
    log = make_path("log")
    gate = make_gate()
    source = Counted(10_000)
    with running(runner_factory(max_workers=2)) as r:
        results = r.imap(rt.fail_at_then_gated, {"x": source, "bad": 3, "log": log,
                                                  "gate": gate.path}, buffer=16)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(rt.TaskError, match="item 3"):
            next(results)
        with pytest.raises(StopIteration):
            next(results)
        read = source.read
        gate.open()
    assert source.read == read <= 3 + 16 + 1     # nothing read after the failure
    assert len(read_lines(log)) <= 2, read_lines(log)


def test_without_raise_on_failure_the_exception_is_yielded_in_place(runner_factory):
    with running(runner_factory()) as r:
        got = list(r.imap(rt.fail_if_multiple, {"x": range(1, 11), "of": 4},
                          raise_on_failure=False))
        assert [v for i, v in enumerate(got) if i not in (3, 7)] == [1, 2, 3, 5, 6, 7, 9, 10]
        for at in (3, 7):
            assert isinstance(got[at], ValueError)
            assert f"item {at + 1} is a multiple of 4" in str(got[at])
        # a result that is an exception object is a result, not a failure
        errors = list(r.imap(rt.identity, {"x": [ValueError("data")]}))
        assert isinstance(errors[0], ValueError)


def test_unordered_failure_raises_too(runner_factory):
    with running(runner_factory()) as r:
        with pytest.raises(ValueError, match="multiple of 50"):
            sum(r.imap(rt.fail_if_multiple, {"x": range(1, 200), "of": 50}, ordered=False))


# ================================================================ 5. leaving early


@pytest.mark.parametrize("how", ["break", "close", "garbage", "error"])
def test_leaving_early_stops_reading_and_cancels_the_runs_not_started(
        runner_factory, make_gate, make_path, how):
    log = make_path("log")
    gate = make_gate()
    source = Counted(1000)
    parameters = {"x": source, "log": log, "gate": gate.path}
    with running(runner_factory(max_workers=2)) as r:
        if how in ("break", "error"):
            def consume():
                for value in r.imap(rt.first_then_gated, parameters, buffer=10):
                    assert value == 0
                    if how == "error":
                        raise KeyError("consumer")
                    break

            if how == "error":
                with pytest.raises(KeyError):
                    consume()
            else:
                consume()
        else:
            results = r.imap(rt.first_then_gated, parameters, buffer=10)
            assert next(results) == 0
            if how == "close":
                results.close()
                with pytest.raises(StopIteration):
                    next(results)
            else:
                del results
                gc.collect()
        read = source.read
        assert read <= 11
        # The runs not started were cancelled: the two workers ran one each.
        gate.open()
        # the runner stays usable
        assert list(r.imap(rt.inc, {"x": range(5)})) == [1, 2, 3, 4, 5]
    assert source.read == read
    assert len(read_lines(log)) <= 2, read_lines(log)


def test_an_iterator_let_go_without_close_cancels_its_runs(runner_factory, make_gate,
                                                           make_path):
    log = make_path("log")
    gate = make_gate()
    with running(runner_factory(max_workers=2)) as r:
        def start():
            results = r.imap(rt.first_then_gated, {"x": range(100), "log": log,
                                                     "gate": gate.path}, buffer=10)
            assert next(results) == 0
        start()                 # the iterator is garbage once start() returns
        gate.open()
        assert r.submit(rt.inc, {"x": 1}).result(timeout=30) == 2
    assert len(read_lines(log)) <= 2, read_lines(log)


@pytest.mark.parametrize("how", ["cancel_all", "exit", "exit_by_exception"])
def test_the_runners_exit_and_cancel_all_end_the_iterator(runner_factory, how):
    runner = runner_factory(max_workers=2)
    results = None
    try:
        with running(runner) as r:
            results = r.imap(rt.inc, {"x": range(10_000)}, buffer=50)
            assert next(results) == 1
            if how == "cancel_all":
                r.cancel_all()
                with pytest.raises(CancelledRun):
                    next(results)
                assert list(r.imap(rt.inc, {"x": range(3)})) == [1, 2, 3]
            elif how == "exit_by_exception":
                raise KeyError("leaving")
    except KeyError:
        pass
    with pytest.raises(CancelledRun):
        next(results)


# ================================================================ 6. pipelines


def test_imap_over_imap_streams_with_bounded_reading(runner_factory):
    source = Counted(100_000)
    with running(runner_factory(max_workers=2)) as r:
        first = r.imap(rt.inc, {"x": source}, buffer=8)
        second = r.imap(rt.inc, {"x": first}, buffer=8)
        for count, value in enumerate(itertools.islice(second, 200), 1):
            assert value == count + 1
            assert source.read <= count + 8 + 8 + 1, (source.read, count)
        second.close()
        first.close()


def test_a_map_over_a_maps_futures_runs_each_item_when_its_upstream_ends(runner_factory,
                                                                         make_gate):
    # Four at once: on a real Dask cluster (two workers of two threads) the
    # scheduler runs a task where its upstream's result is, which may be the
    # worker of the waiting item; there a second thread is free.
    gate = make_gate()
    with running(runner_factory(max_workers=4)) as r, gate:
        stage1 = r.map(rt.gated_item, {"x": range(10), "block_on": 9, "gate": gate.path})
        stage2 = r.map(rt.inc, {"x": stage1})
        assert stage2[0].result(timeout=30) == 1      # while stage1's last item waits
        assert not stage1[9].done()
        streamed = r.imap(rt.inc, {"x": stage1}, buffer=4)
        assert [next(streamed) for _ in range(9)] == list(range(1, 10))
        gate.open()
        assert next(streamed) == 10
        assert stage2.result(timeout=30) == list(range(1, 11))


# ================================================================ thread runner


def test_the_failure_raised_is_the_tasks_exception_object():
    from taskrunner import ThreadPoolTaskRunner

    raised = []

    def fails_on_two(x):
        if x == 2:
            error = LookupError("two")
            raised.append(error)
            raise error
        return x

    with ThreadPoolTaskRunner(max_workers=2) as r:
        with pytest.raises(LookupError) as info:
            list(r.imap(fails_on_two, {"x": range(10)}))
        assert info.value is raised[0]
        yielded = list(r.imap(fails_on_two, {"x": range(4)}, raise_on_failure=False))
        assert yielded[2] is raised[1]


# ================================================================ 7. process and Dask


@pytest.mark.timeout(120)
def test_process_imap_a_killed_worker_crashes_its_run_and_the_rest_run_again(make_path):
    from taskrunner import ProcessPoolTaskRunner

    pidfile = make_path("pid")
    with running(ProcessPoolTaskRunner(max_workers=2), exit_timeout=30) as r:
        got = list(r.imap(rt.crash_on, {"x": range(3000), "bad": 1234, "how": "sigkill",
                                         "pidfile": pidfile}, raise_on_failure=False))
        assert isinstance(got[1234], CrashedRun)
        assert [v for i, v in enumerate(got) if i != 1234] == \
            [10 * i for i in range(3000) if i != 1234]
        dead = rt.read_pid(pidfile)
        # the pool keeps two workers, the dead one not among them
        pids = set(r.imap(rt.getpid_of, {"x": range(200)}))
        assert dead not in pids
    with pytest.raises(ProcessLookupError):
        os.kill(dead, signal.SIGCONT)


def test_process_imap_sends_batches(monkeypatch):
    from taskrunner import ProcessPoolTaskRunner
    from taskrunner._process import feeder

    batches = []
    send_batch = feeder.Feeder.send_batch

    def counting(self, batch):
        batches.append(len(batch.runs))
        return send_batch(self, batch)

    monkeypatch.setattr(feeder.Feeder, "send_batch", counting)
    n = 50_000
    with running(ProcessPoolTaskRunner(max_workers=2), exit_timeout=30) as r:
        assert sum(r.imap(rt.square, {"x": (i for i in range(n))})) == sum(i * i for i in range(n))
    # (runs taken back from a busy worker for an idle one go again)
    assert sum(batches) >= n
    assert len(batches) <= n // 50, batches


def test_dask_imap_sends_batches_not_a_message_per_item():
    pytest.importorskip("distributed")
    from test_dask_runner import counting_graphs

    from taskrunner import DaskTaskRunner

    n = 5000
    cluster = {"n_workers": 1, "threads_per_worker": 2, "processes": True,
               "dashboard_address": None}
    with running(DaskTaskRunner(cluster_kwargs=cluster), exit_timeout=60) as r:
        with counting_graphs(r.client) as sizes:
            assert list(r.imap(rt.inc, {"x": (i for i in range(n))})) == list(range(1, n + 1))
    # Messages to the scheduler (graphs), each of many runs.  How many runs
    # go to one Dask task follows the window, and so this machine's speed:
    # packed, but not to a fixed count.
    assert len(sizes) <= n // 20, sizes
    assert sum(sizes) <= n // 4, sizes


def test_an_iterator_advanced_from_two_threads_at_once_says_so(make_gate, make_path):
    import threading

    from taskrunner import ThreadPoolTaskRunner

    gate, started = make_gate(), make_path("started")
    with running(ThreadPoolTaskRunner(max_workers=2)) as r, gate:
        results = r.imap(rt.gated, {"value": range(10), "gate": gate.path, "started": started})
        waiting = threading.Thread(target=lambda: next(results), daemon=True)
        waiting.start()
        # A run has started: the other thread submitted it in its step, and
        # waits in that step for the gate.
        wait_path(started, 20)
        with pytest.raises(ValueError, match="already being advanced"):
            next(results)
        gate.open()
        waiting.join(20)
        assert list(results) == list(range(1, 10))


@pytest.mark.parametrize("ordered", [True, False])
def test_an_input_that_raises_gives_the_results_before_then_its_error(runner_factory, ordered):
    def broken():
        yield from range(25)
        raise KeyError("input broke")

    with running(runner_factory()) as r:
        got = []
        with pytest.raises(KeyError, match="input broke"):
            for value in r.imap(rt.inc, {"x": broken()}, ordered=ordered, buffer=8):
                got.append(value)
        assert sorted(got) == list(range(1, 26))
        assert list(r.imap(rt.inc, {"x": range(3)})) == [1, 2, 3]


@pytest.mark.parametrize("runner", ["ThreadPoolTaskRunner(2)", "ProcessPoolTaskRunner(2)"])
@pytest.mark.parametrize("ordered", [True, False])
def test_ctrl_c_while_waiting_for_results_reaches_the_user(runner, ordered):
    """SIGINT while the consumer waits in the iterator: KeyboardInterrupt
    comes out of the loop, the runs not started are cancelled, the runs
    running finish, and the runner's exit returns."""
    from harness import run_script

    result = run_script(f"""
        import os, signal, threading, time
        import runner_tasks as rt
        from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner
        if __name__ == "__main__":
            # A test run in the background (CI) may have SIGINT ignored, and
            # this child inherits that: Ctrl-C is what a terminal sends.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            started = time.monotonic()
            seen = 0
            try:
                with {runner} as r:
                    results = r.imap(rt.sleep_then, {{"x": range(200), "seconds": 0.2}},
                                     ordered={ordered}, buffer=20)
                    next(results)
                    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
                    for value in results:
                        seen += 1
            except KeyboardInterrupt:
                print("interrupted", seen, round(time.monotonic() - started, 1))
    """, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split()
    assert words[0] == "interrupted", result.stdout
    assert int(words[1]) < 199 and float(words[2]) < 30, result.stdout
