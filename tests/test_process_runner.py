"""ProcessPoolTaskRunner-specific behaviour (issue 3).

The shared semantics (states, upstreams, map rules, cancellation of single
runs, ...) are pinned by test_conformance.py, which runs against this runner
too.  This file pins what only a pool of worker processes has: pickling with
cloudpickle, exceptions and results crossing a process boundary, worker
processes that die (killed for real), unpicklable input, runs sent to a
worker in a batch but not begun, batching that never idles a worker,
streaming map results, the constructor's settings, and no process left
behind.

Coordination with tasks goes through files (tasks run in other processes);
the helper tasks are in runner_tasks.py, in its ProcessPoolTaskRunner
section.
"""

import contextlib
import functools
import inspect
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import taskrunner
from taskrunner import (
    CancelledRun,
    CrashedRun,
    ProcessPoolTaskRunner,
    StateType,
    TaskRunner,
    ThreadPoolTaskRunner,
    UpstreamTaskError,
    task,
    unmapped,
)
from taskrunner import wait as wait_futures

import runner_tasks as rt
from harness import running
from runner_tasks import read_lines, wait_path, wait_until

pytestmark = pytest.mark.timeout(60)

# The repository root and tests/ directory, for scripts run in a subprocess.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(taskrunner.__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# ================================================================= helpers


def child_pids():
    """Pids of this process's live multiprocessing children."""
    return {p.pid for p in multiprocessing.active_children()}


def assert_processes_gone(pids):
    """None of `pids` is still a process: not alive, not a zombie either
    (a zombie still has its /proc entry until its parent reaps it)."""
    left = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    assert left == [], f"worker processes still there: {left}"
    assert not set(pids) & child_pids()


def worker_facts(r, n, make_path, timeout=15.0):
    """Run n rendezvous runs, which complete only if n workers serve at
    once; returns their (pid, parent pid, INIT_STATE), n distinct pids."""
    paths = [make_path("rendezvous") for _ in range(n)]
    futures = [
        r.submit(rt.rendezvous, {"me": p, "others": [q for q in paths if q != p],
                                 "timeout": timeout})
        for p in paths
    ]
    facts = [f.result(timeout=timeout + 15) for f in futures]
    assert len({pid for pid, _, _ in facts}) == n, facts
    return facts


def worker_pids(r, n, make_path):
    return [pid for pid, _, _ in worker_facts(r, n, make_path)]


def count_running_at_once(r, n_runs, expected, gate, started):
    """Submit n_runs gated runs; once `expected` have started and a moment
    has passed, return how many started.  Opens the gate, checks results."""
    futures = [r.submit(rt.gated_pid, {"gate": gate.path, "started": started})
               for _ in range(n_runs)]
    try:
        assert wait_until(lambda: len(read_lines(started)) >= expected, timeout=20), \
            read_lines(started)
        time.sleep(0.4)   # would more start?
        observed = len(read_lines(started))
    finally:
        gate.open()
    pids = [f.result(timeout=20) for f in futures]
    return observed, pids


def error_text(exc):
    """An exception's message and those of its causes and contexts."""
    parts = []
    while exc is not None and len(parts) < 10:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)




def script_env():
    """The environment for a new interpreter that imports this taskrunner
    and runner_tasks."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, TESTS_DIR]))


def run_python(*args, timeout=60):
    """Run `python *args` in a new interpreter; (returncode, stdout, stderr)."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=script_env())
    return proc.returncode, proc.stdout, proc.stderr


# ============================================================ 1. pickling


def test_lambdas_run_in_worker_processes():
    """Lambdas travel by value (plain pickle cannot send them)."""
    with ProcessPoolTaskRunner(max_workers=2) as r:
        assert r.submit(lambda x: x * 3, {"x": 7}).result(timeout=20) == 21
        assert r.map(lambda x, y: x - y, {"x": range(5), "y": 1}).result(timeout=20) == \
            [-1, 0, 1, 2, 3]
        # and it really ran elsewhere
        assert r.submit(lambda: os.getpid()).result(timeout=20) != os.getpid()


def test_closures_and_functions_defined_inside_a_function_run():
    """Functions local to this test, with and without a closure, and a
    task decorated locally, run in the workers with their captured values."""
    factor = 5
    table = {"a": 1, "b": 2}

    def times_factor(x):
        return x * factor

    def lookup(key):
        return table[key]

    def plain_local(x):
        return -x

    @task
    def decorated_local(x):
        return times_factor(x) + 1   # calls another closure

    with ProcessPoolTaskRunner(max_workers=2) as r:
        assert r.submit(times_factor, {"x": 3}).result(timeout=20) == 15
        assert r.map(lookup, {"key": ["b", "a"]}).result(timeout=20) == [2, 1]
        assert r.submit(plain_local, {"x": 4}).result(timeout=20) == -4
        assert r.submit(decorated_local, {"x": 2}).result(timeout=20) == 11
        chained = r.submit(times_factor, {"x": r.submit(plain_local, {"x": 1})})
        assert chained.result(timeout=20) == -5


MAIN_SCRIPT = textwrap.dedent('''
    import dataclasses
    import json
    import os

    from taskrunner import ProcessPoolTaskRunner, task


    @dataclasses.dataclass
    class Point:
        x: int
        y: int


    def square(x):
        return x * x


    def norm1(p):
        return abs(p.x) + abs(p.y)


    @task
    def shift(p, dx):
        return Point(p.x + dx, p.y)


    def main():
        offset = 10

        def add_offset(x):
            return x + offset

        cases = {
            "function": lambda r: r.submit(square, {"x": 7}).result(timeout=30) == 49,
            "map": lambda r: r.map(square, {"x": range(5)}).result(timeout=30)
                             == [0, 1, 4, 9, 16],
            "lambda": lambda r: r.submit(lambda x: -x, {"x": 3}).result(timeout=30) == -3,
            "closure": lambda r: r.submit(add_offset, {"x": 1}).result(timeout=30) == 11,
            "main-class-argument":
                lambda r: r.submit(norm1, {"p": Point(-2, 5)}).result(timeout=30) == 7,
            "main-class-result":
                lambda r: r.submit(shift, {"p": Point(1, 2), "dx": 5}).result(timeout=30)
                          == Point(6, 2),
            "ran-elsewhere": lambda r: r.submit(os.getpid).result(timeout=30) != os.getpid(),
        }
        outcome = {}
        with ProcessPoolTaskRunner(max_workers=2) as r:
            for name, check in cases.items():
                try:
                    outcome[name] = "ok" if check(r) else "wrong result"
                except Exception as exc:
                    outcome[name] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(outcome))


    if __name__ == "__main__":
        main()
''')

MAIN_CASES = ["function", "map", "lambda", "closure", "main-class-argument",
              "main-class-result", "ran-elsewhere"]


@pytest.fixture(scope="module")
def main_script_outcomes(tmp_path_factory):
    """Run MAIN_SCRIPT once as a script file and once with `python -c`
    (whose __main__ a spawned worker cannot re-import): {mode: outcomes}."""
    path = tmp_path_factory.mktemp("main") / "main_tasks.py"
    path.write_text(MAIN_SCRIPT)
    outcomes = {}
    for mode, args in (("script", [str(path)]), ("dash-c", ["-c", MAIN_SCRIPT])):
        rc, out, err = run_python(*args)
        lines = out.strip().splitlines()
        outcomes[mode] = (rc, json.loads(lines[-1]) if rc == 0 and lines else None, err)
    return outcomes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", MAIN_CASES)
@pytest.mark.parametrize("mode", ["script", "dash-c"])
def test_tasks_defined_in_main_run(main_script_outcomes, mode, case):
    """Functions, lambdas and closures of a program's __main__, and
    instances of its classes as arguments and results, cross to the
    workers and back, whether __main__ is a file or `python -c` code."""
    rc, outcome, err = main_script_outcomes[mode]
    assert rc == 0, err[-3000:]
    assert outcome[case] == "ok", outcome[case]


def test_a_task_function_is_pickled_once_per_runner(make_path):
    """100 submits and a map of 100 items of one callable: it is pickled
    once (the count is kept by its __reduce__, which runs in the process
    that pickles it: this one)."""
    count = make_path("pickles")
    fn = rt.CountingPickles(count)
    with ProcessPoolTaskRunner(max_workers=2) as r:
        submitted = [r.submit(fn, {"x": i}) for i in range(100)]
        mapped = r.map(fn, {"x": range(100)})
        assert [f.result(timeout=20) for f in submitted] == [2 * i for i in range(100)]
        assert mapped.result(timeout=20) == [2 * i for i in range(100)]
        # both workers got it (each may need it): still pickled once
        assert len(read_lines(count)) == 1, read_lines(count)
    assert len(read_lines(count)) == 1


def test_a_worker_keeps_a_bounded_number_of_task_functions(monkeypatch):
    # issue 9: one bounded cache of task functions, mirrored on each worker.
    # With room for 3, a worker that has had 3 starts again from the
    # functions of its next batch; a function it dropped is sent again.
    from taskrunner._process import feeder

    monkeypatch.setattr(feeder, "MAX_FUNCTIONS", 3)
    tasks = [functools.partial(rt.add, y=10 * k) for k in range(8)]
    with ProcessPoolTaskRunner(max_workers=1) as r:
        for _round in range(2):
            for k, fn in enumerate(tasks):
                assert r.submit(fn, {"x": k}).result(timeout=20) == k + 10 * k
                kept = [len(w.functions) for w in r._active.workers.workers]
                assert max(kept) <= 3, kept


# =========================================== 2. exceptions and results


def _raise_line(fn):
    """The line number of the first `raise` in `fn`'s source."""
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if "raise " in line)


def test_exception_keeps_its_type_and_carries_the_worker_traceback():
    """result() re-raises the task's exception with its original type; its
    __cause__ holds the worker's traceback text (function, line, message),
    as concurrent.futures does."""
    with ProcessPoolTaskRunner(max_workers=1) as r:
        custom = r.submit(rt.fail_custom, {"message": "kaboom 17"})
        builtin = r.map(rt.fail_if, {"x": [1, 2, 3], "bad": 2})
        with pytest.raises(rt.TaskError) as info:
            custom.result(timeout=20)
        assert type(info.value) is rt.TaskError
        assert str(info.value) == "kaboom 17"
        cause = info.value.__cause__
        assert cause is not None
        text = str(cause)
        assert f"line {_raise_line(rt.fail_custom)}, in fail_custom" in text, text
        assert "TaskError: kaboom 17" in text, text
        assert custom.exception(timeout=5).__cause__ is not None

        assert builtin[0].result(timeout=20) == 1 and builtin[2].result(timeout=20) == 3
        with pytest.raises(ValueError, match="bad item 2") as info:
            builtin[1].result(timeout=20)
        assert type(info.value) is ValueError
        text = str(info.value.__cause__)
        assert f"line {_raise_line(rt.fail_if)}, in fail_if" in text, text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(rt.UNPICKLABLE_KINDS))
def test_unpicklable_result_or_exception_fails_that_run_alone(kind):
    """A result or exception that cannot be pickled (or unpickled) fails
    only its run, FAILED with an error naming what could not be pickled;
    the same worker process serves the next run."""
    # A lost result would leave the run RUNNING: short waits keep a failure
    # from costing the session long.
    with running(ProcessPoolTaskRunner(max_workers=1), exit_timeout=5) as r:
        pid = r.submit(rt.getpid).result(timeout=20)
        bad = r.submit(rt.produce_unpicklable, {"kind": kind})
        bad.wait(timeout=5)
        assert bad.done(), f"the run never ended: {bad.state}"
        assert bad.state.type == StateType.FAILED and bad.state.name != "NotReady"
        error = bad.exception(timeout=1)
        message = error_text(error)
        assert rt.UNPICKLABLE_KINDS[kind] in message, message
        assert "pickl" in message.lower(), message
        with pytest.raises(Exception):
            bad.result(timeout=1)
        # the worker lives on: the very same process runs the next task
        assert r.submit(rt.getpid).result(timeout=10) == pid
        assert r.submit(rt.inc, {"x": 1}).result(timeout=10) == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(rt.UNPICKLABLE_KINDS))
def test_unpicklable_result_or_exception_spares_its_batch(kind):
    """The runs sent with it in the same batch complete with their values."""
    with running(ProcessPoolTaskRunner(max_workers=1), exit_timeout=5) as r:
        pid = r.submit(rt.getpid).result(timeout=20)
        runs = r.map(rt.unpicklable_on, {"x": range(30), "bad": 11, "kind": kind})
        done, not_done = wait_futures(runs, timeout=5)
        assert not not_done, [f.state for f in runs]
        for i, f in enumerate(runs):
            if i == 11:
                assert f.state.is_failed(), f.state
                assert rt.UNPICKLABLE_KINDS[kind] in error_text(f.exception(timeout=1))
            else:
                assert f.result(timeout=1) == i
        assert r.submit(rt.getpid).result(timeout=10) == pid


# ================================================================ 3. crashes


CRASH_MESSAGES = {
    # how: patterns, any of which the CrashedRun message must match
    "exit": [r"(?i)exit.*\b3\b"],
    "sigkill": [r"SIGKILL", r"signal\D{0,3}\b9\b"],
    "segv": [r"SIGSEGV", r"signal\D{0,3}\b11\b"],
    "external": [r"SIGKILL", r"signal\D{0,3}\b9\b"],
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", list(CRASH_MESSAGES))
def test_a_worker_dying_crashes_only_the_run_that_killed_it(how, make_gate, make_path):
    """os._exit(3), SIGKILL by itself, a segfault, or SIGKILL from outside
    while the run runs: that run ends CRASHED and result() raises CrashedRun
    naming the exit code or signal; the runs batched with it on that worker
    run again and complete; a run in flight on the other worker goes on
    undisturbed; a downstream of the crashed run is NotReady; the runner
    replaces the worker and keeps two workers."""
    started, log, pidfile = make_path(), make_path(), make_path("pid")
    children_before = child_pids()
    gate = make_gate()
    with running(ProcessPoolTaskRunner(max_workers=2), exit_timeout=20) as r:
        pids_before = worker_pids(r, 2, make_path)
        # in flight on one worker during the whole crash
        held = r.submit(rt.gated, {"value": "held", "gate": gate.path,
                                   "started": started, "log": log})
        wait_path(started, 20)
        # quick runs, batched; item 5 kills its worker
        runs = r.map(rt.crash_on, {"x": range(20), "bad": 5, "how": how,
                                   "pidfile": pidfile})
        downstream = r.submit(rt.inc, {"x": runs[5]})
        if how == "external":
            wait_path(pidfile, 20)
            os.kill(rt.read_pid(pidfile), signal.SIGKILL)
        crashed = runs[5]
        crashed.wait(timeout=20)
        assert crashed.done(), crashed.state
        assert crashed.state.type == StateType.CRASHED, crashed.state
        assert crashed.state.is_crashed()
        with pytest.raises(CrashedRun) as info:
            crashed.result(timeout=1)
        message = str(info.value)
        assert any(re.search(p, message) for p in CRASH_MESSAGES[how]), message
        dead = rt.read_pid(pidfile)
        assert dead in pids_before

        others = [f for i, f in enumerate(runs) if i != 5]
        assert [f.result(timeout=20) for f in others] == \
            [10 * i for i in range(20) if i != 5]
        downstream.wait(timeout=20)
        assert downstream.state.is_failed() and downstream.state.name == "NotReady"
        with pytest.raises(UpstreamTaskError):
            downstream.result(timeout=1)

        assert not held.done()           # it was never disturbed
        gate.open()
        assert held.result(timeout=20) == "held"
        assert read_lines(log) == ["held"]   # ran once, not again

        # replaced: two workers serve at once again, the dead one not among them
        pids_after = worker_pids(r, 2, make_path)
        assert dead not in pids_after
        assert r.map(rt.inc, {"x": range(100)}).result(timeout=20) == list(range(1, 101))
    assert_processes_gone(set(pids_before) | set(pids_after))
    assert child_pids() <= children_before


@pytest.mark.timeout(60)
def test_a_lone_worker_that_crashes_is_replaced_by_a_new_process(make_path):
    """With one worker: the crash is reported, the run queued behind it
    completes, and later runs are served by a new process."""
    pidfile = make_path("pid")
    with running(ProcessPoolTaskRunner(max_workers=1), exit_timeout=20) as r:
        first = r.submit(rt.getpid).result(timeout=20)
        crashed = r.submit(rt.crash_on, {"x": 0, "bad": 0, "how": "exit",
                                         "pidfile": pidfile})
        queued = r.submit(rt.inc, {"x": 41})
        with pytest.raises(CrashedRun):
            crashed.result(timeout=20)
        assert queued.result(timeout=20) == 42
        later = r.submit(rt.getpid).result(timeout=20)
        assert later != first and rt.read_pid(pidfile) == first
    assert_processes_gone([first, later])


@pytest.mark.timeout(60)
def test_an_idle_worker_killed_from_outside_is_replaced(make_path):
    """SIGKILL an idle worker: work submitted right after (while the death
    may not be noticed yet) still completes, and two workers serve again."""
    children_before = child_pids()
    with running(ProcessPoolTaskRunner(max_workers=2), exit_timeout=20) as r:
        pids = worker_pids(r, 2, make_path)
        os.kill(pids[0], signal.SIGKILL)
        runs = r.map(rt.inc, {"x": range(200)})
        single = r.submit(rt.add, {"x": 1, "y": 2})
        assert runs.result(timeout=20) == list(range(1, 201))
        assert single.result(timeout=20) == 3
        after = worker_pids(r, 2, make_path)
        assert pids[0] not in after
    assert_processes_gone(set(pids) | set(after))
    assert child_pids() <= children_before


# ================================================== 4. unpicklable input


def _closing_over_a_lock():
    lock = threading.Lock()

    def locked_store(path, payload=None, x=None):
        with lock:
            rt.store(path, payload)

    return locked_store


UNPICKLABLE_CALLS = [
    # (id, call(r, path, upstream), what the TypeError must name)
    ("submit-lock-parameter",
     lambda r, p, up: r.submit(rt.store, {"path": p, "payload": threading.Lock()}),
     "payload"),
    ("submit-lock-deep-in-a-parameter",
     lambda r, p, up: r.submit(rt.store, {"path": p, "payload": {"k": [1, threading.Lock()]}}),
     "payload"),
    ("submit-lock-next-to-a-future",
     lambda r, p, up: r.submit(rt.store, {"path": p, "payload": [up, threading.Lock()]}),
     "payload"),
    ("submit-task-closing-over-a-lock",
     lambda r, p, up: r.submit(_closing_over_a_lock(), {"path": p}),
     "locked_store"),
    ("map-lock-item",
     lambda r, p, up: r.map(rt.store, {"path": unmapped(p), "payload": [1, 2, threading.Lock()]}),
     "payload"),
    ("map-unmapped-lock",
     lambda r, p, up: r.map(rt.store, {"path": p, "payload": unmapped(threading.Lock()),
                                       "x": [1, 2]}),
     "payload"),
    ("map-task-closing-over-a-lock",
     lambda r, p, up: r.map(_closing_over_a_lock(), {"path": unmapped(p), "x": [1, 2]}),
     "locked_store"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call, name", [c[1:] for c in UNPICKLABLE_CALLS],
                         ids=[c[0] for c in UNPICKLABLE_CALLS])
def test_unpicklable_task_or_parameter_raises_type_error_and_schedules_nothing(
    call, name, make_path
):
    """submit/map raise TypeError naming the offending parameter (or task)
    at once, and no run of that call ever executes."""
    ran = make_path("ran")
    children_before = child_pids()
    with ProcessPoolTaskRunner(max_workers=2) as r:
        upstream = r.submit(rt.inc, {"x": 1})
        with pytest.raises(TypeError) as info:
            call(r, ran, upstream)
        assert name in str(info.value), str(info.value)
        assert upstream.result(timeout=20) == 2
        assert r.submit(rt.store, {"path": make_path(), "payload": 3}).result(timeout=20) == 3
    assert not os.path.exists(ran)
    assert child_pids() <= children_before


# ======================================================= 5. cancellation


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["cancel_all", "exit-by-exception"])
def test_runs_batched_to_a_busy_worker_are_cancelled_not_run(how, make_gate, make_path):
    """One worker busy with a gated run; 50 quick runs are ready and sent
    to it in a batch behind the gated one.  cancel_all() (or leaving the
    block by an exception) cancels all 50 -- none ever runs -- and the
    running one completes."""
    started, ran = make_path(), make_path("ran")
    gate = make_gate()

    class Stop(Exception):
        pass

    with pytest.raises(Stop) if how != "cancel_all" else contextlib.nullcontext():
        with ProcessPoolTaskRunner(max_workers=1) as r:
            busy = r.submit(rt.gated, {"value": "busy", "gate": gate.path, "started": started})
            wait_path(started, 20)
            queued = r.map(rt.store, {"path": ran, "payload": range(50)})
            time.sleep(0.3)   # the runner has time to send them to the worker
            gate.open_after(0.5)
            if how == "cancel_all":
                r.cancel_all()
            else:
                raise Stop()
    assert busy.result(timeout=1) == "busy"
    assert busy.state.is_completed()
    for f in queued:
        assert f.done()
        assert f.state.type == StateType.CANCELLED, f.state
        with pytest.raises(CancelledRun):
            f.result(timeout=1)
    assert not os.path.exists(ran)


@pytest.mark.timeout(60)
def test_after_cancel_all_the_worker_runs_new_work(make_gate, make_path):
    """Runs taken back from a worker leave it in order: it still serves."""
    started = make_path()
    with ProcessPoolTaskRunner(max_workers=1) as r, make_gate() as gate:
        busy = r.submit(rt.gated, {"value": 1, "gate": gate.path, "started": started})
        wait_path(started, 20)
        queued = r.map(rt.inc, {"x": range(50)})
        time.sleep(0.3)
        r.cancel_all()
        gate.open()
        assert busy.result(timeout=20) == 1
        assert all(f.state.is_cancelled() for f in queued)
        assert r.map(rt.inc, {"x": range(50)}).result(timeout=20) == list(range(1, 51))


@pytest.mark.timeout(60)
def test_an_upstream_result_that_cannot_be_pickled_fails_only_the_run_it_goes_to():
    """A thread runner's run returns what cannot be pickled (it holds a
    lock), and it is an item of a process runner's map: that run fails with
    a TypeError naming its parameter, and the runs batched with it complete."""
    with ThreadPoolTaskRunner(1) as threads, ProcessPoolTaskRunner(max_workers=1) as r:
        lock = threads.submit(rt.produce_unpicklable, {"kind": "result-holding-a-lock"})
        lock.wait(20)
        runs = r.map(rt.identity, {"x": [1, 2, lock, 4, 5]})
        assert [runs[i].result(timeout=20) for i in (0, 1, 3, 4)] == [1, 2, 4, 5]
        runs[2].wait(20)
        assert runs[2].state.is_failed(), runs[2].state
        with pytest.raises(TypeError, match="parameter 'x' of task run 'identity' cannot be "
                                            "pickled to go to a worker process"):
            runs[2].result(timeout=1)
        assert r.map(rt.inc, {"x": range(3)}).result(timeout=20) == [1, 2, 3]


@pytest.mark.timeout(60)
def test_a_batch_that_fails_to_be_sent_fails_its_runs_and_the_runner_goes_on(monkeypatch):
    """A bug while a batch is sent (Feeder.send_batch raising, once): each
    run of that batch ends FAILED with that error, none hangs, and the runs
    of the other batches, and later ones, complete."""
    from taskrunner._process import feeder

    real, sizes = feeder.Feeder.send_batch, []

    def send_batch(self, batch):
        sizes.append(len(batch.runs))
        if len(sizes) == 1:
            raise RuntimeError("a bug in sending")
        return real(self, batch)

    with ProcessPoolTaskRunner(max_workers=1) as r:
        assert r.map(rt.inc, {"x": range(5000)}).result(timeout=30)[-1] == 5000  # big batches
        monkeypatch.setattr(feeder.Feeder, "send_batch", send_batch)
        runs = r.map(rt.inc, {"x": range(30)})
        for f in runs:
            f.wait(20)
        lost = sizes[0]
        assert lost > 1, sizes      # a batch of several runs
        for f in runs[:lost]:
            assert f.state.is_failed(), f.state
            with pytest.raises(RuntimeError, match="a bug in sending"):
                f.result(timeout=1)
        assert [f.result(timeout=1) for f in runs[lost:]] == list(range(lost + 1, 31))
        assert r.map(rt.inc, {"x": range(3)}).result(timeout=20) == [1, 2, 3]


def in_flight(r):
    """Runs sent to the worker processes and not yet answered (a look
    inside: which runs are still here is not public)."""
    return sum(worker.count for worker in r._active.workers.workers)


@pytest.mark.timeout(60)
def test_cancelling_scattered_runs_of_a_batch_in_flight_takes_back_exactly_those(
        make_gate, make_path):
    """One worker busy with a gated run, 40 quick runs batched to it behind
    that one (it has learned that runs are quick).  cancel() of the even
    ones, then of those at 1, 5, 9, ... (between runs given up already)
    takes back exactly those: they end CANCELLED and never run, and the
    other 10 complete, each once, when the gate opens."""
    started, ran = make_path(), make_path("ran")
    with ProcessPoolTaskRunner(max_workers=1) as r, make_gate() as gate:
        assert r.map(rt.inc, {"x": range(5000)}).result(timeout=30)[-1] == 5000  # big batches
        busy = r.submit(rt.gated, {"value": "busy", "gate": gate.path, "started": started})
        wait_path(started, 20)
        queued = r.map(rt.store, {"path": ran, "payload": range(40)})
        assert wait_until(lambda: in_flight(r) == 41, 20), in_flight(r)
        for n, i in enumerate([*range(0, 40, 2), *range(1, 40, 4)], 1):
            assert queued[i].cancel() is True, i
            # The runs taken back with it are sent again, numbered after
            # those given up: the next take-back spans both.
            left = 41 - n
            assert wait_until(lambda left=left: in_flight(r) == left, 20), (i, in_flight(r))
        gate.open()
        kept = [i for i in range(40) if i % 4 == 3]
        assert [queued[i].result(timeout=20) for i in kept] == kept
        assert busy.result(timeout=20) == "busy"
        for i in set(range(40)) - set(kept):
            assert queued[i].state.is_cancelled(), (i, queued[i].state)
    assert sorted(int(line) for line in read_lines(ran)) == kept


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["normal", "exception", "cancel_all"])
def test_no_worker_process_outlives_the_runner(how, make_path):
    """Whatever way the block is left, every worker process is gone
    (exited and reaped) once it has; a normal exit first waits for every
    run."""
    children_before = child_pids()

    class Stop(Exception):
        pass

    with pytest.raises(Stop) if how == "exception" else contextlib.nullcontext():
        with ProcessPoolTaskRunner(max_workers=2) as r:
            pids = worker_pids(r, 2, make_path)
            slow = r.map(rt.sleep_then, {"x": range(4), "seconds": 0.2})
            if how == "cancel_all":
                r.cancel_all()
            elif how == "exception":
                raise Stop()
    assert all(f.done() for f in slow)
    if how == "normal":
        assert [f.result() for f in slow] == [0, 1, 2, 3]
    assert_processes_gone(pids)
    assert child_pids() <= children_before


# ============================================================= 6. batching


@pytest.mark.timeout(60)
def test_two_ready_runs_start_at_once_on_two_idle_workers(make_path):
    """Two runs that each wait for the other to have started complete:
    they were not batched to one worker.  Also once the runner has seen
    many quick runs (and so makes big batches)."""
    with ProcessPoolTaskRunner(max_workers=2) as r:
        worker_facts(r, 2, make_path)                                 # two submits
        assert r.map(rt.inc, {"x": range(5000)}).result(timeout=30)[-1] == 5000
        a, b = make_path(), make_path()
        pair = r.map(rt.rendezvous, {"me": [a, b], "others": [[b], [a]]})   # one map
        assert len({pid for pid, _, _ in pair.result(timeout=30)}) == 2
        worker_facts(r, 2, make_path)


@pytest.mark.timeout(60)
def test_runs_waiting_behind_a_long_run_move_to_an_idle_worker(make_gate, make_path):
    """Item 0 of a map blocks; whatever runs were batched behind it on its
    worker are taken by the other worker, which would otherwise sit idle:
    all of them complete while item 0 still runs."""
    started, log = make_path(), make_path()
    with ProcessPoolTaskRunner(max_workers=2) as r, make_gate() as gate:
        assert r.map(rt.inc, {"x": range(5000)}).result(timeout=30)[-1] == 5000  # big batches
        runs = r.map(rt.first_waits, {"x": range(200), "gate": gate.path,
                                      "started": started, "log": log})
        wait_path(started, 20)
        assert [f.result(timeout=20) for f in runs[1:]] == list(range(1, 200))
        assert not runs[0].done()
        gate.open()
        assert runs[0].result(timeout=20) == 0


BATCH_SCRIPT = textwrap.dedent('''
    import sys

    import runner_tasks as rt
    from taskrunner import ProcessPoolTaskRunner


    def main():
        gate, started, log, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        with ProcessPoolTaskRunner(max_workers=1) as r:
            # the runner learns that runs are quick
            r.map(rt.inc, {"x": range(5000)}).result(timeout=60)
            runs = r.map(rt.first_waits, {"x": range(n), "gate": gate,
                                          "started": started, "log": log})
            print(sum(runs.result(timeout=60)))


    if __name__ == "__main__":
        main()
''')


@pytest.mark.timeout(90)
def test_many_small_runs_travel_together_ahead_of_execution(tmp_path, make_path):
    """The runs of a map of quick tasks go to the worker together, not one
    message per run: with the runner's own process stopped (SIGSTOP: it can
    send nothing), its worker still runs every one of them."""
    gate, started, log = make_path("gate"), make_path(), make_path()
    script = tmp_path / "batch_script.py"
    script.write_text(BATCH_SCRIPT)
    n = 50
    proc = subprocess.Popen([sys.executable, str(script), gate, started, log, str(n)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=script_env())
    try:
        assert wait_until(lambda: os.path.exists(started) or proc.poll() is not None, 60)
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            rt.touch(gate)
            finished = wait_until(lambda: len(read_lines(log)) == n, timeout=15)
            seen = len(read_lines(log))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert out.strip() == str(sum(range(n)))
    assert finished, f"only {seen} of {n} runs ran while the runner's process was stopped"


# ========================================================== 7. constructor


def test_signature_and_name():
    params = inspect.signature(ProcessPoolTaskRunner).parameters
    assert [(p.name, p.default) for p in params.values()] == [
        ("max_workers", None), ("initializer", None), ("initargs", ()), ("mp_context", None),
        ("limits", None), ("trace", None)]
    runner = ProcessPoolTaskRunner()
    assert isinstance(runner, TaskRunner)
    assert runner.name == "processpool"


@pytest.mark.timeout(60)
def test_default_max_workers_is_the_cpu_count(make_gate, make_path):
    """cpu_count runs run at once, never more."""
    cpus = os.cpu_count()
    with ProcessPoolTaskRunner() as r:
        observed, pids = count_running_at_once(r, cpus + 1, cpus, make_gate(), make_path())
    assert observed == cpus
    assert len(set(pids)) == cpus


@pytest.mark.timeout(60)
def test_max_workers_caps_the_processes_running_at_once(make_gate, make_path):
    with ProcessPoolTaskRunner(max_workers=3) as r:
        observed, pids = count_running_at_once(r, 5, 3, make_gate(), make_path())
    assert observed == 3
    assert len(set(pids)) == 3


@pytest.mark.parametrize("kwargs, error, name", [
    ({"max_workers": 0}, ValueError, "max_workers"),
    ({"max_workers": -2}, ValueError, "max_workers"),
    ({"max_workers": "2"}, TypeError, "max_workers"),
    ({"max_workers": 2.0}, TypeError, "max_workers"),
    ({"mp_context": "no-such-start-method"}, ValueError, "mp_context"),
    ({"mp_context": 42}, TypeError, "mp_context"),
    ({"mp_context": object()}, TypeError, "mp_context"),
    ({"initializer": 42}, TypeError, "initializer"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_bad_settings_raise_naming_the_setting(kwargs, error, name):
    with pytest.raises(error) as info:
        ProcessPoolTaskRunner(**kwargs)
    assert name in str(info.value)


@pytest.mark.timeout(60)
def test_initializer_runs_once_per_worker_before_its_first_task(make_path):
    """Each worker logs its pid once; every task sees the state it set."""
    init_log = make_path("init")
    runner = ProcessPoolTaskRunner(max_workers=2, initializer=rt.init_worker,
                                   initargs=(init_log, "set by the initializer"))
    with runner as r:
        facts = worker_facts(r, 2, make_path)
        states = r.map(rt.read_init_state, {"x": range(200)}).result(timeout=20)
        first = r.submit(rt.read_init_state).result(timeout=20)
    pids = {pid for pid, _, _ in facts}
    assert {state for _, _, state in facts} == {"set by the initializer"}
    assert {state for _, state in states + [first]} == {"set by the initializer"}
    assert {pid for pid, _ in states} <= pids
    assert sorted(int(p) for p in read_lines(init_log)) == sorted(pids)


@pytest.mark.timeout(60)
def test_a_replacement_worker_runs_the_initializer_too(make_path):
    init_log, pidfile = make_path("init"), make_path("pid")
    runner = ProcessPoolTaskRunner(max_workers=1, initializer=rt.init_worker,
                                   initargs=(init_log, "ready"))
    with running(runner, exit_timeout=20) as r:
        old, _ = r.submit(rt.read_init_state).result(timeout=20)
        with pytest.raises(CrashedRun):
            r.submit(rt.crash_on, {"x": 1, "bad": 1, "how": "exit",
                                   "pidfile": pidfile}).result(timeout=20)
        new, state = r.submit(rt.read_init_state).result(timeout=20)
    assert new != old and state == "ready"
    assert [int(p) for p in read_lines(init_log)] == [old, new]


@pytest.mark.timeout(60)
def test_a_failing_initializer_gives_a_clear_error_and_no_hang():
    """The initializer's error reaches the user (at entry, submit or
    result), and the runner exits leaving no process behind."""
    children_before = child_pids()
    runner = ProcessPoolTaskRunner(max_workers=2, initializer=rt.failing_init,
                                   initargs=("the initializer exploded",))
    with pytest.raises(Exception) as info:
        with runner as r:
            r.submit(rt.inc, {"x": 1}).result(timeout=30)
    text = error_text(info.value)
    assert "the initializer exploded" in text, text
    assert wait_until(lambda: child_pids() <= children_before, timeout=5)


def _context_cases():
    cases = [(None, "spawn"), ("spawn", "spawn"), ("forkserver", "forkserver"),
             ("fork", "fork")]
    cases += [(multiprocessing.get_context(m), m) for m in ("spawn", "forkserver", "fork")]
    return [pytest.param(ctx, method, id=f"{type(ctx).__name__}-{method}")
            for ctx, method in cases]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mp_context, method", _context_cases())
def test_mp_context_names_and_objects_start_the_workers(mp_context, method, monkeypatch):
    """Tasks run under each start method, and the workers really were
    started that way: a fork child inherits state set at run time here, a
    spawn child does not, a forkserver child's parent is the fork server."""
    monkeypatch.setattr(rt, "PARENT_MARK", "set at run time in the parent")
    with ProcessPoolTaskRunner(max_workers=1, mp_context=mp_context) as r:
        pid, parent, mark = r.submit(rt.process_facts).result(timeout=30)
        assert r.submit(lambda x: x + 1, {"x": 1}).result(timeout=30) == 2
    assert pid != os.getpid()
    if method == "fork":
        assert (parent, mark) == (os.getpid(), "set at run time in the parent")
    elif method == "spawn":
        assert (parent, mark) == (os.getpid(), None)
    else:
        assert parent != os.getpid() and mark is None


@pytest.mark.timeout(60)
def test_duplicate_keeps_every_setting_and_is_unstarted(make_gate, make_path):
    init_log = make_path("init")
    runner = ProcessPoolTaskRunner(max_workers=3, initializer=rt.init_worker,
                                   initargs=(init_log, "dup"),
                                   mp_context=multiprocessing.get_context("forkserver"))
    copy = runner.duplicate()
    assert type(copy) is ProcessPoolTaskRunner and copy is not runner
    assert copy.name == "processpool"
    with pytest.raises(RuntimeError):
        copy.submit(rt.inc, {"x": 1})
    assert read_lines(init_log) == []       # nothing started yet
    with copy as r:
        facts = worker_facts(r, 3, make_path)               # 3 workers ...
        observed, _ = count_running_at_once(r, 4, 3, make_gate(), make_path())
    assert observed == 3                                    # ... and no more
    assert {state for _, _, state in facts} == {"dup"}      # initializer, initargs
    assert all(parent != os.getpid() for _, parent, _ in facts)   # forkserver
    assert sorted(int(p) for p in read_lines(init_log)) == sorted(p for p, _, _ in facts)


# ============================================================ 8. large map


@pytest.mark.timeout(90)
def test_a_map_over_200_000_items_streams_results_in_order(make_gate):
    """The last item blocks: the first futures complete meanwhile (results
    stream back chunk by chunk); once it is let go, every result is there,
    in input order."""
    n = 200_000
    with ProcessPoolTaskRunner(max_workers=2) as r, make_gate() as gate:
        runs = r.map(rt.gated_item, {"x": range(n), "block_on": n - 1, "gate": gate.path})
        assert len(runs) == n
        # the first results come back while the last run is still running
        for f in runs[:100]:
            f.wait(timeout=30)
            assert f.done()
        assert not runs[n - 1].done()
        gate.open()
        assert runs.result(timeout=60) == list(range(n))


@pytest.mark.timeout(120)
def test_workers_killed_while_starting_do_not_break_the_pool():
    """Workers that die before they are ready break the pool after three in
    a row (the main module cannot be imported, say); workers killed from
    outside by a signal counted too, so killing starting replacements broke
    a healthy pool for good (every run CRASHED: 96,731 of 100,000 in the
    first version of test_faults' kill test)."""
    def live_workers():
        return {p.pid for p in multiprocessing.active_children() if p.is_alive()}

    with running(ProcessPoolTaskRunner(max_workers=1)) as runner:
        assert runner.submit(rt.inc, {"x": 1}).result(timeout=60) == 2
        killed = set()
        for _ in range(4):          # the ready worker, then three replacements starting
            assert rt.wait_until(lambda killed=killed: bool(live_workers() - killed), timeout=60)
            fresh = live_workers() - killed
            for pid in fresh:
                os.kill(pid, signal.SIGKILL)
            killed |= fresh
        assert runner.submit(rt.inc, {"x": 2}).result(timeout=60) == 3
