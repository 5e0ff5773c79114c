"""Task options (issue 10): task()/with_options() and their checks, and
retries on every runner.  Timeouts and concurrency limits have their own
sections below.

Tasks record each attempt as a line in a file (runner_tasks.fail_until and
friends), which works for threads, worker processes and Dask workers alike;
the retry decision itself always runs in this process (the engine's)."""

import os
import pickle
import random

import pytest

from taskrunner import StateType, Task, task

import runner_tasks as rt
from harness import running
from runner_tasks import TaskError, attempts_made, wait_until

pytestmark = pytest.mark.timeout(90)


# ============================================================ the options


def test_task_keeps_its_options():
    t = task(rt.inc, name="incr", retries=3, retry_delay_seconds=[1, 2.5],
             retry_jitter_factor=0.5, retry_condition_fn=rt.is_value_error,
             timeout_seconds=4, tags=["db", "io"])
    assert (t.name, t.retries, t.retry_delay_seconds, t.retry_jitter_factor) == (
        "incr", 3, [1, 2.5], 0.5)
    assert t.retry_condition_fn is rt.is_value_error
    assert t.timeout_seconds == 4.0
    assert t.tags == frozenset({"db", "io"})
    assert t(1) == 2


def test_task_defaults():
    t = task(rt.inc)
    assert (t.retries, t.retry_delay_seconds, t.retry_jitter_factor, t.retry_condition_fn,
            t.timeout_seconds, t.tags) == (0, 0, None, None, None, frozenset())


def test_decorator_form_takes_the_options():
    @task(retries=2, tags=("x",))
    def f(x):
        return x

    assert isinstance(f, Task) and f.retries == 2 and f.tags == {"x"} and f(5) == 5


def test_with_options_returns_a_new_task_and_leaves_the_original():
    base = task(rt.inc, retries=1, tags=["a"])
    changed = base.with_options(retries=5, timeout_seconds=2, name="other")
    assert changed is not base and isinstance(changed, Task)
    assert (changed.retries, changed.timeout_seconds, changed.name, changed.tags) == (
        5, 2.0, "other", {"a"})
    assert (base.retries, base.timeout_seconds, base.name) == (1, None, "inc")
    assert changed.fn is base.fn


def test_with_options_rejects_an_unknown_option():
    with pytest.raises(TypeError, match="retires"):
        task(rt.inc).with_options(retires=3)


def test_options_survive_pickling():
    t = task(rt.inc, retries=2, retry_delay_seconds=[0.5], timeout_seconds=3, tags=["db"])
    back = pickle.loads(pickle.dumps(t))
    assert (back.retries, back.retry_delay_seconds, back.timeout_seconds, back.tags) == (
        2, [0.5], 3.0, {"db"})


BAD_OPTIONS = [
    ("retries", -1, ValueError),
    ("retries", 1.5, TypeError),
    ("retries", "3", TypeError),
    ("retries", True, TypeError),
    ("retry_delay_seconds", -0.1, ValueError),
    ("retry_delay_seconds", [1, -2], ValueError),
    ("retry_delay_seconds", [1, "x"], TypeError),
    ("retry_delay_seconds", [], ValueError),
    ("retry_delay_seconds", "1", TypeError),
    ("retry_delay_seconds", float("nan"), ValueError),
    ("retry_jitter_factor", -0.5, ValueError),
    ("retry_jitter_factor", "0.5", TypeError),
    ("retry_condition_fn", 42, TypeError),
    ("timeout_seconds", "10", TypeError),
    ("timeout_seconds", 0, ValueError),
    ("timeout_seconds", -1, ValueError),
    ("tags", ["db", 3], TypeError),
    ("tags", "db", TypeError),
    ("tags", 5, TypeError),
]


@pytest.mark.parametrize("option, value, error", BAD_OPTIONS,
                         ids=[f"{o}={v!r}" for o, v, _ in BAD_OPTIONS])
@pytest.mark.parametrize("how", ["task", "decorator", "with_options"])
def test_a_bad_option_is_an_error_naming_it(how, option, value, error):
    with pytest.raises(error, match=option):
        if how == "task":
            task(rt.inc, **{option: value})
        elif how == "decorator":
            task(**{option: value})
        else:
            task(rt.inc).with_options(**{option: value})


# ================================================================ retries


def test_a_failing_run_is_retried_until_it_completes(runner_factory, make_path):
    path = make_path("attempts")
    flaky = task(rt.fail_until, retries=3)
    with running(runner_factory(max_workers=2)) as runner:
        fut = runner.submit(flaky, {"path": path, "succeed_on": 3, "value": "ok"})
        assert fut.result(timeout=60) == "ok"
    assert attempts_made(path) == 3
    assert fut.attempt == 3
    assert fut.state.is_completed()


def test_retries_are_spent_then_the_last_exception_is_raised(runner_factory, make_path):
    path = make_path("attempts")
    flaky = task(rt.fail_until, retries=2)
    with running(runner_factory(max_workers=2)) as runner:
        fut = runner.submit(flaky, {"path": path, "succeed_on": 10, "value": "never"})
        with pytest.raises(TaskError, match="attempt 3 of"):
            fut.result(timeout=60)
    assert attempts_made(path) == 3
    assert fut.attempt == 3
    assert fut.state.type is StateType.FAILED and fut.state.name == "Failed"


def test_no_retries_means_one_attempt(runner_factory, make_path):
    path = make_path("attempts")
    with running(runner_factory(max_workers=2)) as runner:
        fut = runner.submit(rt.fail_until, {"path": path, "succeed_on": 2, "value": 1})
        with pytest.raises(TaskError):
            fut.result(timeout=60)
    assert attempts_made(path) == 1 and fut.attempt == 1


def test_mapped_items_are_retried_each_on_its_own(runner_factory, tmp_path):
    flaky = task(rt.item_fails_until, retries=2)
    with running(runner_factory(max_workers=2)) as runner:
        futures = runner.map(flaky, {"x": range(40), "directory": str(tmp_path),
                                     "succeed_on": 2})
        assert futures.result(timeout=60) == [x * 10 for x in range(40)]
        assert {f.attempt for f in futures} == {2}
    for x in range(40):
        assert attempts_made(str(tmp_path / f"item-{x}")) == 2


def test_a_retried_result_flows_downstream(runner_factory, make_path):
    flaky = task(rt.fail_until, retries=1)
    with running(runner_factory(max_workers=2)) as runner:
        up = runner.submit(flaky, {"path": make_path(), "succeed_on": 2, "value": 41})
        down = runner.submit(rt.inc, {"x": up})
        assert down.result(timeout=60) == 42


def test_retry_condition_decides_per_failure(runner_factory, make_path):
    only_value_errors = task(rt.raise_by_attempt, retries=5,
                             retry_condition_fn=rt.is_value_error)
    path = make_path()
    with running(runner_factory(max_workers=2)) as runner:
        fut = runner.submit(only_value_errors,
                            {"path": path, "kinds": [ValueError, ValueError, KeyError, ValueError]})
        with pytest.raises(KeyError):
            fut.result(timeout=60)
    assert attempts_made(path) == 3 and fut.attempt == 3


def test_a_retry_condition_that_raises_ends_the_run_with_its_own_failure(make_path):
    def broken(exc):
        raise RuntimeError("condition broke")

    path = make_path()
    with running(rt_thread_runner()) as runner:
        fut = runner.submit(task(rt.fail_until, retries=3, retry_condition_fn=broken),
                            {"path": path, "succeed_on": 3, "value": 1})
        with pytest.raises(TaskError):
            fut.result(timeout=30)
    assert attempts_made(path) == 1


def rt_thread_runner():
    from taskrunner import ThreadPoolTaskRunner
    return ThreadPoolTaskRunner(max_workers=2)


def _gaps(path):
    times = [float(t) for t in rt.read_lines(path)]
    return [b - a for a, b in zip(times, times[1:])]


def test_retry_delays_are_waited_per_retry_the_last_repeating(runner_factory, make_path):
    path = make_path()
    flaky = task(rt.fail_until, retries=3, retry_delay_seconds=[0.2, 0.5])
    with running(runner_factory(max_workers=2)) as runner:
        assert runner.submit(flaky, {"path": path, "succeed_on": 4,
                                     "value": 1}).result(timeout=60) == 1
    gaps = _gaps(path)
    assert len(gaps) == 3
    assert gaps[0] >= 0.2 and gaps[1] >= 0.5 and gaps[2] >= 0.5, gaps


@pytest.mark.parametrize("draw, low", [(1.0, 0.6), (-1.0, 0.0)])
def test_jitter_spreads_the_delay_by_up_to_its_factor(monkeypatch, make_path, draw, low):
    # The engine draws each spread with random.uniform(-factor, factor):
    # at the extremes the delay is 0.4 * (1 + 0.5) or 0.4 * (1 - 0.5).
    drawn = []

    def extreme(a, b):
        drawn.append((a, b))
        return b if draw > 0 else a

    monkeypatch.setattr(random, "uniform", extreme)
    path = make_path()
    flaky = task(rt.fail_until, retries=1, retry_delay_seconds=0.4, retry_jitter_factor=0.5)
    with running(rt_thread_runner()) as runner:
        assert runner.submit(flaky, {"path": path, "succeed_on": 2,
                                     "value": 1}).result(timeout=30) == 1
    assert drawn == [(-0.5, 0.5)]
    (gap,) = _gaps(path)
    assert gap >= low
    if draw < 0:
        assert gap < 0.4    # shortened: it did not wait the plain delay


def test_a_run_waiting_to_retry_holds_no_worker(runner_factory, make_path, make_gate):
    """One worker: while the first run waits out a long delay ("Retrying"),
    another run starts and completes on that worker."""
    path = make_path()
    flaky = task(rt.fail_until, retries=1, retry_delay_seconds=30)
    with running(runner_factory(max_workers=1)) as runner:
        waiting = runner.submit(flaky, {"path": path, "succeed_on": 2, "value": 1})
        assert wait_until(lambda: waiting.attempt == 2, timeout=30)
        state = waiting.state
        assert state.name == "Retrying" and state.type is StateType.PENDING
        assert runner.submit(rt.inc, {"x": 1}).result(timeout=30) == 2
        assert waiting.state.name == "Retrying"
        runner.cancel_all()
        assert waiting.state.is_cancelled()


def test_cancel_all_cancels_runs_waiting_for_a_retry_and_their_downstream(
        runner_factory, make_path):
    flaky = task(rt.fail_until, retries=2, retry_delay_seconds=60)
    with running(runner_factory(max_workers=2), exit_timeout=20) as runner:
        futures = [runner.submit(flaky, {"path": make_path(), "succeed_on": 3, "value": i})
                   for i in range(3)]
        down = runner.submit(rt.total, {"xs": futures})
        assert wait_until(lambda: all(f.state.name == "Retrying" for f in futures), timeout=30)
        runner.cancel_all()
        assert all(f.state.is_cancelled() for f in futures)
        assert down.state.is_cancelled()
    # (The runner's exit returned: nothing waited for the 60 s delays.)


def test_a_single_cancel_ends_a_run_waiting_for_a_retry(runner_factory, make_path):
    path = make_path()
    flaky = task(rt.fail_until, retries=1, retry_delay_seconds=60)
    with running(runner_factory(max_workers=2), exit_timeout=20) as runner:
        fut = runner.submit(flaky, {"path": path, "succeed_on": 2, "value": 1})
        assert wait_until(lambda: fut.state.name == "Retrying", timeout=30)
        assert fut.cancel()
        assert fut.state.is_cancelled()
    assert attempts_made(path) == 1


def test_upstream_failures_are_never_retried(runner_factory, make_path):
    path = make_path()
    patient = task(rt.fail_until, retries=3)
    with running(runner_factory(max_workers=2)) as runner:
        up = runner.submit(rt.fail, {"message": "upstream broke"})
        down = runner.submit(patient, {"path": path, "succeed_on": 1, "value": up})
        down.wait(timeout=60)
    assert down.state.name == "NotReady" and down.attempt == 1
    assert not os.path.exists(path)     # never called


def test_done_callbacks_fire_once_at_the_final_end(runner_factory, make_path):
    ends = []
    flaky = task(rt.fail_until, retries=2)
    with running(runner_factory(max_workers=2)) as runner:
        fut = runner.submit(flaky, {"path": make_path(), "succeed_on": 3, "value": 7})
        fut.add_done_callback(lambda f: ends.append(f.attempt))
        assert fut.result(timeout=60) == 7
    assert wait_until(lambda: ends == [3], timeout=10), ends


def test_a_crashed_worker_run_is_retried(make_path):
    from taskrunner import ProcessPoolTaskRunner

    path = make_path()
    crashy = task(rt.crash_until, retries=2)
    with running(ProcessPoolTaskRunner(max_workers=2)) as runner:
        fut = runner.submit(crashy, {"path": path, "succeed_on": 2, "value": "survived"})
        assert fut.result(timeout=60) == "survived"
    assert attempts_made(path) == 2 and fut.attempt == 2


def test_a_crash_past_its_retries_ends_crashed(make_path):
    from taskrunner import CrashedRun, ProcessPoolTaskRunner

    path = make_path()
    with running(ProcessPoolTaskRunner(max_workers=2)) as runner:
        fut = runner.submit(task(rt.crash_until, retries=1),
                            {"path": path, "succeed_on": 5, "value": 1})
        with pytest.raises(CrashedRun):
            fut.result(timeout=60)
    assert attempts_made(path) == 2 and fut.attempt == 2
    assert fut.state.is_crashed()


# =============================================================== timeouts


def test_a_run_past_its_timeout_ends_timed_out(runner_factory, make_gate):
    gate = make_gate()
    slow = task(rt.hang_until, name="slowpoke", timeout_seconds=0.5)
    with running(runner_factory(max_workers=2), exit_timeout=30) as runner:
        fut = runner.submit(slow, {"path": _scratch(gate), "succeed_on": 2, "value": 1,
                                   "gate": gate.path})
        with pytest.raises(TimeoutError) as info:
            fut.result(timeout=60)
    assert type(info.value) is TimeoutError
    assert "slowpoke" in str(info.value) and "0.5" in str(info.value)
    state = fut.state
    assert state.type is StateType.FAILED and state.name == "TimedOut"
    assert fut.attempt == 1


def _scratch(gate):
    return gate.path + ".attempts"


def test_a_timed_out_run_is_retried_like_a_failed_one(runner_factory, make_gate):
    gate = make_gate()
    slow_once = task(rt.hang_until, timeout_seconds=0.5, retries=2)
    path = _scratch(gate)
    with running(runner_factory(max_workers=2), exit_timeout=30) as runner:
        fut = runner.submit(slow_once, {"path": path, "succeed_on": 2, "value": "second",
                                        "gate": gate.path})
        assert fut.result(timeout=60) == "second"
    assert fut.attempt == 2 and attempts_made(path) == 2


def test_runs_within_their_timeout_are_unaffected(runner_factory):
    quick = task(rt.inc, timeout_seconds=30)
    with running(runner_factory(max_workers=2)) as runner:
        assert runner.map(quick, {"x": range(200)}).result(timeout=60) == list(range(1, 201))


def test_thread_runner_frees_the_slot_of_a_timed_out_run_and_exits_without_it(make_gate,
                                                                              make_path):
    from taskrunner import ThreadPoolTaskRunner

    gate, note = make_gate(), make_path()
    stuck = task(rt.hang_noting_the_end, timeout_seconds=0.3)
    with running(ThreadPoolTaskRunner(max_workers=1), exit_timeout=10) as runner:
        fut = runner.submit(stuck, {"gate": gate.path, "note": note})
        # The one worker's place is free once the run timed out, though its
        # thread is still inside the task (the gate is shut).
        assert runner.submit(rt.inc, {"x": 1}).result(timeout=30) == 2
        with pytest.raises(TimeoutError):
            fut.result(timeout=30)
        assert not gate.is_open()
    # The exit returned with the thread still in the task; its late result
    # is dropped when it comes.
    assert not os.path.exists(note)
    gate.open()
    assert wait_until(lambda: os.path.exists(note), timeout=30)
    assert rt.read_lines(note) == ["returned"]
    assert fut.state.name == "TimedOut"


def test_thread_runner_cancels_an_async_task_on_its_loop(make_path):
    from taskrunner import ThreadPoolTaskRunner

    note = make_path()
    stuck = task(rt.async_hang_noting_cancel, timeout_seconds=0.3)
    with running(ThreadPoolTaskRunner(max_workers=2), exit_timeout=20) as runner:
        fut = runner.submit(stuck, {"note": note})
        with pytest.raises(TimeoutError):
            fut.result(timeout=30)
        assert wait_until(lambda: os.path.exists(note), timeout=20)
    assert rt.read_lines(note) == ["cancelled"]


def test_process_runner_kills_and_replaces_the_worker_of_a_timed_out_run(make_gate,
                                                                        make_path):
    from taskrunner import ProcessPoolTaskRunner

    gate, pidfile = make_gate(), make_path("pid")
    stuck_at_7 = task(rt.hang_if, timeout_seconds=1.0)
    with running(ProcessPoolTaskRunner(max_workers=2), exit_timeout=30) as runner:
        futures = runner.map(stuck_at_7, {"x": range(200), "bad": 7, "gate": gate.path,
                                          "pidfile": pidfile})
        values = futures.result(timeout=60, raise_on_failure=False)
        assert isinstance(values[7], TimeoutError)
        assert values[:7] + values[8:] == [x * 2 for x in range(200) if x != 7]
        assert futures[7].state.name == "TimedOut"
        killed = rt.read_pid(pidfile)
        with pytest.raises(ProcessLookupError):
            os.kill(killed, 0)
        # Two workers again, neither of them the killed one.
        pids = _two_worker_pids(runner, os.path.dirname(pidfile))
        assert len(pids) == 2 and killed not in pids


def test_process_runner_times_a_timed_run_from_its_own_start_after_untimed_ones():
    """A worker notes when a run starts only for a timed one: a timed run
    after a long untimed one is judged from its own start, not the last
    timed run's (which would make it overdue at once)."""
    from taskrunner import ProcessPoolTaskRunner

    timed = task(rt.sleep_then, timeout_seconds=1.0)
    with running(ProcessPoolTaskRunner(max_workers=1), exit_timeout=30) as runner:
        assert runner.submit(timed, {"x": 1, "seconds": 0}).result(timeout=60) == 1
        # Longer than the timeout, on the same (only) worker.
        assert runner.submit(rt.sleep_then, {"x": 2, "seconds": 1.5}).result(timeout=60) == 2
        fut = runner.submit(timed, {"x": 3, "seconds": 0.2})
        assert fut.result(timeout=60) == 3
        assert fut.state.type is StateType.COMPLETED


def _two_worker_pids(runner, directory):
    """The pids of two runs that must run at once (so on two workers)."""
    marks = [os.path.join(directory, f"rendezvous-{i}") for i in range(2)]
    futures = [runner.submit(rt.rendezvous, {"me": marks[i], "others": [marks[1 - i]]})
               for i in range(2)]
    return {f.result(timeout=60)[0] for f in futures}


def test_dask_stops_a_timed_out_task_on_its_worker(make_gate, make_path):
    from conftest import RUNNERS

    (spec,) = [s for s in RUNNERS if s.id == "dask-cluster"]
    gate, note = make_gate(), make_path()
    stuck = task(rt.hang_noting_the_end, timeout_seconds=0.5)
    with running(spec(max_workers=2), exit_timeout=60) as runner:
        fut = runner.submit(stuck, {"gate": gate.path, "note": note})
        with pytest.raises(TimeoutError):
            fut.result(timeout=60)
        # Stopped there, not left running: the task's own except clause ran.
        assert wait_until(lambda: os.path.exists(note), timeout=30)
        assert not gate.is_open()
    assert rt.read_lines(note) == ["interrupted _Overdue"]


# ==================================================== concurrency limits


def _with_limits(runner_factory, max_workers, limits):
    """runner_factory's runner, rebuilt with `limits` (through duplicate's
    constructor arguments: each runner class takes limits=)."""
    runner = runner_factory(max_workers=max_workers)
    return _rebuilt(runner, limits)


def _rebuilt(runner, limits):
    from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from taskrunner.dask import DaskTaskRunner

    if isinstance(runner, ThreadPoolTaskRunner):
        return ThreadPoolTaskRunner(max_workers=runner.max_workers, limits=limits)
    if isinstance(runner, ProcessPoolTaskRunner):
        return ProcessPoolTaskRunner(max_workers=runner.max_workers, limits=limits)
    assert isinstance(runner, DaskTaskRunner)
    return DaskTaskRunner(address=runner.address, cluster_kwargs=runner.cluster_kwargs or None,
                          limits=limits)


def _runner_classes():
    from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from taskrunner.dask import DaskTaskRunner

    return [ThreadPoolTaskRunner, ProcessPoolTaskRunner, DaskTaskRunner]


@pytest.mark.parametrize("limits, error", [
    ({"db": 0}, ValueError), ({"db": -1}, ValueError), ({"db": 1.5}, ValueError),
    ({"db": "2"}, ValueError), ({"db": True}, ValueError), ({"db": None}, ValueError),
    ({3: 1}, TypeError), (["db"], TypeError), ("db", TypeError),
])
@pytest.mark.parametrize("cls", _runner_classes(), ids=lambda c: c.__name__)
def test_a_bad_limit_is_an_error_at_construction(cls, limits, error):
    with pytest.raises(error, match="limits"):
        cls(limits=limits)


@pytest.mark.parametrize("cls", _runner_classes(), ids=lambda c: c.__name__)
def test_limits_are_kept_and_duplicated(cls):
    runner = cls(limits={"db": 2, "io": 1})
    assert runner.limits == {"db": 2, "io": 1}
    assert runner.duplicate().limits == {"db": 2, "io": 1}
    assert cls().limits == {}


def test_at_most_the_limit_of_a_tag_runs_at_once(runner_factory, make_path):
    limited, free = make_path("db"), make_path("free")
    db_task = task(rt.note_running, tags=["db"])
    with running(_with_limits(runner_factory, 4, {"db": 2})) as runner:
        a = runner.map(db_task, {"path": limited, "x": range(16)})
        b = runner.map(rt.note_running, {"path": free, "x": range(16)})
        assert a.result(timeout=60) == list(range(16)) and b.result(timeout=60) == list(range(16))
    assert rt.most_at_once(limited) == 2
    assert rt.most_at_once(free) >= 2      # the limit is the tag's alone


def _one_running(runner, gated, gate, started):
    """Submit a run of `gated` (rt.gated, value 1) held at `gate`, and wait
    until it has started."""
    first = runner.submit(gated, {"value": 1, "gate": gate.path, "started": started.path})
    rt.wait_path(started.path)
    return first


def test_a_run_waiting_for_its_limit_holds_no_worker(runner_factory, make_gate):
    """Two workers, limit 1: one "db" run blocks, a second waits for the
    slot; a run of another task still gets the second worker."""
    gate = make_gate()
    db_gated = task(rt.gated, tags=["db"])
    with running(_with_limits(runner_factory, 2, {"db": 1}), exit_timeout=30) as runner:
        first = _one_running(runner, db_gated, gate, make_gate())
        second = runner.submit(db_gated, {"value": 2, "gate": gate.path})
        other = runner.submit(rt.inc, {"x": 41})
        assert other.result(timeout=30) == 42
        assert second.state.is_pending() and first.state.is_running()
        gate.open()
        assert (first.result(timeout=30), second.result(timeout=30)) == (1, 2)


def test_a_run_of_several_limited_tags_waits_for_each(make_path):
    from taskrunner import ThreadPoolTaskRunner

    both, db_only, io_only = make_path("both"), make_path("db"), make_path("io")
    db_io = task(rt.note_running, tags=["db", "io"])
    with running(ThreadPoolTaskRunner(max_workers=8, limits={"db": 2, "io": 1})) as runner:
        runs = [runner.map(db_io, {"path": both, "x": range(6)}),
                runner.map(task(rt.note_running, tags=["db"]), {"path": db_only, "x": range(6)}),
                runner.map(task(rt.note_running, tags=["io"]), {"path": io_only, "x": range(6)})]
        for futures in runs:
            futures.result(timeout=60)
    assert rt.most_at_once(both) == 1
    # "io" allows one run at once across both tasks that carry it.
    merged = rt.read_lines(both) + rt.read_lines(io_only)
    with open(io_only + ".merged", "w") as f:
        f.write("\n".join(merged) + "\n")
    assert rt.most_at_once(io_only + ".merged") == 1


def test_a_run_waiting_for_its_limit_can_be_cancelled(runner_factory, make_gate):
    gate = make_gate()
    db_gated = task(rt.gated, tags=["db"])
    with running(_with_limits(runner_factory, 2, {"db": 1}), exit_timeout=30) as runner:
        first = _one_running(runner, db_gated, gate, make_gate())
        waiting = [runner.submit(db_gated, {"value": i, "gate": gate.path}) for i in range(5)]
        assert waiting[2].cancel()
        runner.cancel_all()
        assert all(f.state.is_cancelled() for f in waiting)
        gate.open()
        assert first.result(timeout=30) == 1
        # The slot is free again for new runs of the tag.
        assert runner.submit(db_gated, {"value": 9, "gate": gate.path}).result(timeout=30) == 9


def test_a_run_waiting_out_a_retry_gives_its_limit_slot_up(make_path, make_gate):
    from taskrunner import ThreadPoolTaskRunner

    gate = make_gate()
    flaky = task(rt.fail_until, retries=1, retry_delay_seconds=60, tags=["db"])
    with running(ThreadPoolTaskRunner(max_workers=2, limits={"db": 1}), exit_timeout=20) as r:
        waiting = r.submit(flaky, {"path": make_path(), "succeed_on": 2, "value": 1})
        assert wait_until(lambda: waiting.state.name == "Retrying", timeout=30)
        other = r.submit(task(rt.gated, tags=["db"]), {"value": 5, "gate": gate.path})
        gate.open()
        assert other.result(timeout=30) == 5
        r.cancel_all()


def test_timed_runs_hold_one_timer_entry_per_thread_not_one_per_run():
    """A long deadline on many short runs: the timer holds at most one
    entry per worker thread, not one per run (which would pile up for as
    long as the deadline)."""
    from taskrunner import ThreadPoolTaskRunner

    timed = task(rt.inc, timeout_seconds=3600)
    with running(ThreadPoolTaskRunner(max_workers=4)) as runner:
        assert runner.map(timed, {"x": range(20_000)}).result(timeout=60) == list(
            range(1, 20_001))
        assert 1 <= runner._engine.timer_entries <= 4


def test_a_run_whose_dask_worker_died_runs_again(make_path):
    """On Dask the cluster itself runs a lost worker's task again (its
    scheduler's allowed-failures); a task that fails for good there
    (KilledWorker) ends CRASHED and is retried by the engine like any
    crash.  Here the first attempt kills its worker process."""
    from conftest import DASK_LOCAL_PROCESSES

    path = make_path()
    crashy = task(rt.crash_until, retries=2)
    with running(DASK_LOCAL_PROCESSES(max_workers=1), exit_timeout=120) as runner:
        fut = runner.submit(crashy, {"path": path, "succeed_on": 2, "value": "survived"})
        assert fut.result(timeout=120) == "survived"
    assert attempts_made(path) == 2
