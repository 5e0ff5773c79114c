"""The bad-input table (issue 14, point 5; README "Bad input"): one test
per misuse, checking the error's type, that its message names what was
wrong, and that nothing was scheduled.

"Nothing scheduled" is seen from outside: the counting task the bad call
named never ran (its file has no line for it), the runner has no
unfinished run right after the call, and a good call made afterwards
still runs and is the only one counted.
"""

import threading

import pytest
from conftest import RUNNERS

from taskrunner import ThreadPoolTaskRunner, unmapped
from taskrunner.exceptions import MappingLengthMismatch, MappingMissingIterable

import runner_tasks as rt
from harness import run_script

# The three kinds of runner (the Dask one on a local cluster of its own).
KINDS = [spec for spec in RUNNERS if spec.id in ("threadpool", "processpool", "dask")]
REMOTE = [spec for spec in KINDS if not spec.in_process]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=KINDS, ids=lambda spec: spec.id)
def spec(request):
    return request.param


@pytest.fixture(params=REMOTE, ids=lambda spec: spec.id)
def remote_spec(request):
    return request.param


def _nothing_scheduled(runner, counter):
    """The bad call left no run behind, and the runner still works: a good
    call runs, and is the only call the counter saw (checked at exit)."""
    assert runner._engine.unfinished == 0
    assert runner.submit(rt.count_call, {"path": counter, "x": "good"}).result(timeout=60) == "good"


def _only_the_good_call(counter):
    assert rt.read_lines(counter) == ["good"]


# -- wrong argument types ----------------------------------------------------------

def _bad_types(counter):
    return [
        # (call, error type, what the message must name)
        (lambda r: r.submit(42, {"x": 1}), TypeError, "task"),
        (lambda r: r.submit(rt.count_call, [counter]), TypeError, "parameters"),
        (lambda r: r.submit(rt.count_call, {1: counter}), TypeError, "parameter names"),
        (lambda r: r.submit(rt.count_call, {"path": counter}, wait_for=5), TypeError, "wait_for"),
        (lambda r: r.submit(rt.count_call, {"path": counter}, dependencies=5), TypeError,
         "dependencies"),
        (lambda r: r.map(rt.count_call, [counter]), TypeError, "parameters"),
        (lambda r: r.map(42, {"x": [1]}), TypeError, "task"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_wrong_argument_types(spec, case, make_path):
    counter = make_path("count")
    call, error, named = _bad_types(counter)[case]
    with spec() as runner:
        with pytest.raises(error, match=named):
            call(runner)
        _nothing_scheduled(runner, counter)
    _only_the_good_call(counter)


def test_a_bad_timeout_fails_even_on_a_final_future(spec, make_path):
    # Before the fix, result(timeout="x") of a final future returned the
    # result: the timeout was read only if the run had to be waited for.
    with spec() as runner:
        future = runner.submit(rt.inc, {"x": 1})
        future.wait()
        for wait in (future.result, future.wait, future.exception):
            with pytest.raises(TypeError, match="timeout"):
                wait(timeout="x")
        with pytest.raises(ValueError, match="timeout"):
            future.result(timeout=float("nan"))


# -- unknown or missing parameters ------------------------------------------------------

@pytest.mark.parametrize("how", ["submit", "map"])
def test_an_unknown_parameter(spec, how, make_path):
    counter = make_path("count")
    with spec() as runner:
        with pytest.raises(TypeError, match="unknown parameter 'y'"):
            if how == "submit":
                runner.submit(rt.count_call, {"path": counter, "y": 1})
            else:
                runner.map(rt.count_call, {"path": unmapped(counter), "x": [1, 2], "y": [1, 2]})
        _nothing_scheduled(runner, counter)
    _only_the_good_call(counter)


@pytest.mark.parametrize("how", ["submit", "map"])
def test_a_missing_parameter(spec, how, make_path):
    counter = make_path("count")
    with spec() as runner:
        with pytest.raises(TypeError, match="missing required parameter 'path'"):
            if how == "submit":
                runner.submit(rt.count_call, {"x": 1})
            else:
                runner.map(rt.count_call, {"x": [1, 2]})
        _nothing_scheduled(runner, counter)
    _only_the_good_call(counter)


# -- map() and imap() ---------------------------------------------------------------------

def test_a_map_length_mismatch(spec, make_path):
    counter = make_path("count")
    with spec() as runner:
        with pytest.raises(MappingLengthMismatch, match="'path' has 2, 'x' has 3"):
            runner.map(rt.count_call, {"path": [counter] * 2, "x": [1, 2, 3]})
        _nothing_scheduled(runner, counter)
    _only_the_good_call(counter)


def test_an_imap_length_mismatch_raises_once_the_shortest_ends(spec, make_path):
    counter = make_path("count")
    with spec() as runner:
        results = runner.imap(rt.count_call, {"path": [counter] * 2, "x": [1, 2, 3]})
        assert [next(results), next(results)] == [1, 2]     # the results before that point
        with pytest.raises(MappingLengthMismatch, match="'path' has 2"):
            next(results)
        assert sorted(rt.read_lines(counter)) == ["1", "2"]  # no third run
        assert runner._engine.unfinished == 0


@pytest.mark.parametrize("how", ["map", "imap"])
def test_no_iterable_to_map_over(spec, how, make_path):
    counter = make_path("count")
    with spec() as runner:
        with pytest.raises(MappingMissingIterable, match="count_call"):
            if how == "map":
                runner.map(rt.count_call, {"path": counter, "x": 1})
            else:
                next(iter(runner.imap(rt.count_call, {"path": counter, "x": 1})))
        _nothing_scheduled(runner, counter)
    _only_the_good_call(counter)


def test_a_map_over_a_maps_future_list_of_the_wrong_length(spec, make_path):
    counter = make_path("count")
    with spec() as runner:
        first = runner.map(rt.inc, {"x": range(3)})
        with pytest.raises(MappingLengthMismatch, match="'x' has 3, 'path' has 2"):
            runner.map(rt.count_call, {"x": first, "path": [counter] * 2})
        assert first.result(timeout=60) == [1, 2, 3]
        _nothing_scheduled(runner, counter)
    _only_the_good_call(counter)


# -- wait_for --------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["submit", "map"])
def test_a_non_future_in_wait_for(spec, how, make_path):
    counter = make_path("count")
    with spec() as runner:
        with pytest.raises(TypeError, match=r"wait_for items must be futures.*int \(5\)"):
            if how == "submit":
                runner.submit(rt.count_call, {"path": counter}, wait_for=[5])
            else:
                runner.map(rt.count_call, {"path": unmapped(counter), "x": [1, 2]}, wait_for=[5])
        _nothing_scheduled(runner, counter)
    _only_the_good_call(counter)


# -- the runner's life -------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["submit", "map"])
def test_submit_before_enter(spec, how, make_path):
    counter = make_path("count")
    runner = spec()
    with pytest.raises(RuntimeError, match="is not started: use it in a `with` block"):
        if how == "submit":
            runner.submit(rt.count_call, {"path": counter})
        else:
            runner.map(rt.count_call, {"path": [counter]})
    with runner:
        _nothing_scheduled(runner, counter)
    _only_the_good_call(counter)


@pytest.mark.parametrize("how", ["submit", "map"])
def test_submit_after_exit(spec, how, make_path):
    counter = make_path("count")
    runner = spec()
    with runner:
        _nothing_scheduled(runner, counter)
    with pytest.raises(RuntimeError, match="has exited"):
        if how == "submit":
            runner.submit(rt.count_call, {"path": counter})
        else:
            runner.map(rt.count_call, {"path": [counter]})
    _only_the_good_call(counter)


def test_re_entering_a_runner(spec, make_path):
    counter = make_path("count")
    with spec() as runner:
        with pytest.raises(RuntimeError, match="already started"):
            runner.__enter__()
        _nothing_scheduled(runner, counter)     # the first entry is untouched
    _only_the_good_call(counter)


# -- what cannot travel (process, Dask) -------------------------------------------------------

@pytest.mark.parametrize("how", ["submit", "map-item", "task"])
def test_unpicklable_arguments(remote_spec, how, make_path):
    counter = make_path("count")
    lock = threading.Lock()
    with remote_spec() as runner:
        if how == "submit":
            with pytest.raises(TypeError, match="parameter 'x' cannot be pickled"):
                runner.submit(rt.count_call, {"path": counter, "x": lock})
        elif how == "map-item":
            with pytest.raises(TypeError, match="item 1 of parameter 'x' cannot be pickled"):
                runner.map(rt.count_call, {"path": unmapped(counter), "x": [1, lock]})
        else:
            with pytest.raises(TypeError, match="task '<lambda>' cannot be pickled"):
                runner.submit(lambda: lock.locked())
        _nothing_scheduled(runner, counter)
    _only_the_good_call(counter)


def test_a_task_that_returns_an_unpicklable_value(remote_spec):
    with remote_spec() as runner:
        future = runner.submit(rt.produce_unpicklable, {"kind": "result-holding-a-lock"})
        error = future.exception(timeout=60)
        # The same type on both, as for an unpicklable parameter.
        assert type(error) is TypeError, repr(error)
        assert "result of task 'produce_unpicklable'" in str(error), error
        assert "LockHolder" in str(error)
        assert future.state.is_failed()
        assert runner.submit(rt.inc, {"x": 1}).result(timeout=60) == 2


# -- futures of other runners ---------------------------------------------------------------------

def test_a_future_of_another_runner_or_of_an_exited_one_is_an_upstream(spec):
    # Not an error: it is waited for and its result used (a failed one
    # makes the run NotReady, as any upstream does).
    with ThreadPoolTaskRunner(1) as other:
        done = other.submit(rt.inc, {"x": 1})
        failed = other.submit(rt.fail, {"message": "upstream failed"})
        with spec() as runner:
            assert runner.submit(rt.inc, {"x": done}).result(timeout=60) == 3
    with spec() as runner:       # `other` has exited
        assert runner.submit(rt.inc, {"x": done}).result(timeout=60) == 3
        assert runner.map(rt.add, {"x": [done, done], "y": [1, 2]}).result(timeout=60) == [3, 4]
        downstream = runner.submit(rt.inc, {"x": failed})
        assert downstream.exception(timeout=60) is not None
        assert downstream.state.name == "NotReady"
        assert "Upstream task run 'fail'" in str(downstream.exception())


# -- a task that returns a future --------------------------------------------------------------------

def test_a_task_that_returns_a_future_gives_that_future(make_path):
    # Thread runner: the future is the result, as any returned object is.
    with ThreadPoolTaskRunner(2) as runner:
        inner = runner.submit(rt.inc, {"x": 1})
        outer = runner.submit(lambda: inner)
        assert outer.result(timeout=60) is inner
        assert inner.result(timeout=60) == 2


def test_a_task_that_returns_a_future_cannot_go_to_another_process(remote_spec, make_path):
    counter = make_path("count")
    with remote_spec() as runner:
        inner = runner.submit(rt.inc, {"x": 1})
        with pytest.raises(TypeError, match=r"task '<lambda>' cannot be pickled.*TaskFuture"):
            runner.submit(lambda: inner)
        assert inner.result(timeout=60) == 2
        _nothing_scheduled(runner, counter)
    _only_the_good_call(counter)


# -- Ctrl-C in the submitting thread while a map runs ------------------------------------------------

@pytest.mark.parametrize("kind", ["threadpool", "processpool"])
def test_ctrl_c_while_map_reads_its_input_schedules_nothing(kind, tmp_path):
    # The KeyboardInterrupt comes while map() reads a generator: it is
    # raised from map(), no run of that map exists, every future made
    # before is final, and the exit returns.
    proc = run_script("""
        import _thread, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import runner_tasks as rt
        from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner
        kind, counter = sys.argv[1:3]
        def items():
            for i in range(100_000):
                if i == 50_000:
                    _thread.interrupt_main()
                yield i
        runner = ThreadPoolTaskRunner(2) if kind == "threadpool" else ProcessPoolTaskRunner(2)
        before = None
        try:
            with runner:
                before = runner.map(rt.count_call, {"path": [counter] * 3, "x": [1, 2, 3]})
                before.result(timeout=60)
                runner.map(rt.count_call, {"path": [counter] * 100_000, "x": items()})
                print("not-interrupted")
        except KeyboardInterrupt:
            print("interrupted unfinished", runner._engine is None)
        print("before", " ".join(f.state.name for f in before))
        print("calls", len(rt.read_lines(counter)))
    """, args=(kind, str(tmp_path / "count")))
    assert proc.returncode == 0, proc.stderr
    assert "not-interrupted" not in proc.stdout
    assert "interrupted unfinished True" in proc.stdout, proc.stdout
    assert "before Completed Completed Completed" in proc.stdout, proc.stdout
    assert "calls 3" in proc.stdout, proc.stdout


def test_ctrl_c_in_the_submitting_thread_while_a_map_runs_ends_every_future(tmp_path):
    # The KeyboardInterrupt comes while the map's runs run (the main thread
    # in FutureList.result()): every future ends final, the exit returns.
    # (Per wait and per runner: test_ctrl_c.py.)
    proc = run_script("""
        import _thread, collections, signal, sys, threading
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import runner_tasks as rt
        from taskrunner import ThreadPoolTaskRunner
        log = sys.argv[1]
        try:
            with ThreadPoolTaskRunner(2) as runner:
                futures = runner.map(rt.tick, {"x": range(2000), "log": log, "seconds": 0.005})
                threading.Thread(target=lambda: rt.wait_until(lambda: len(rt.read_lines(log)) >= 10)
                                 and _thread.interrupt_main(), daemon=True).start()
                futures.result()
        except KeyboardInterrupt:
            print("exited")
        states = collections.Counter(f.state.name for f in futures)
        print("states", sorted(states), states["Completed"] == len(rt.read_lines(log)))
    """, args=(str(tmp_path / "log"),))
    assert proc.returncode == 0, proc.stderr
    assert "exited" in proc.stdout
    assert "states ['Cancelled', 'Completed'] True" in proc.stdout, proc.stdout
