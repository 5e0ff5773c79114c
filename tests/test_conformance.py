"""Conformance suite: the public API and semantics 1-9 of the runner spec.

Every test takes ``runner_factory`` (all runners) or, where the test only
makes sense when tasks run inside this process, ``inprocess_runner_factory``.
Tasks are module-level functions from ``runner_tasks`` (picklable by
reference or by cloudpickle); coordination with tasks goes through file
gates (``make_gate``) so that the same test works for worker processes.
"""

import collections
import functools
import os
import random
import sys
import threading
import time
import uuid

import pytest

import taskrunner
from taskrunner import (
    CancelledRun,
    CrashedRun,
    FutureList,
    MappingLengthMismatch,
    MappingMissingIterable,
    State,
    StateType,
    Task,
    TaskFuture,
    TaskRunner,
    TaskRunnerError,
    ThreadPoolTaskRunner,
    UpstreamTaskError,
    allow_failure,
    as_completed,
    quote,
    task,
    unmapped,
    wait,
)

import runner_tasks as rt
from harness import running
from runner_tasks import read_lines, wait_path, wait_until

pytestmark = pytest.mark.timeout(60)

FINAL_TYPES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
ALL_TYPES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED")
PREDICATES = {
    "PENDING": "is_pending",
    "RUNNING": "is_running",
    "COMPLETED": "is_completed",
    "FAILED": "is_failed",
    "CANCELLED": "is_cancelled",
    "CRASHED": "is_crashed",
}


def assert_state(state, type_name):
    """``state`` is a State of type ``type_name`` and its predicates agree."""
    assert isinstance(state, State)
    assert state.type == getattr(StateType, type_name), (state.type, state.name)
    for other, predicate in PREDICATES.items():
        assert getattr(state, predicate)() == (other == type_name), (predicate, state)
    assert state.is_final() == (type_name in FINAL_TYPES)


def assert_not_ready(future, upstream=None, *also_ok):
    """The future ended FAILED/"NotReady" and result() raises UpstreamTaskError.

    If ``upstream`` is given, the error message names its run id (any of
    ``also_ok``'s run ids is accepted too, for transitive cases)."""
    future.wait(timeout=10)
    assert future.done()
    state = future.state
    assert_state(state, "FAILED")
    assert state.name == "NotReady"
    with pytest.raises(UpstreamTaskError) as info:
        future.result(timeout=10)
    if upstream is not None:
        message = str(info.value)
        ids = [f.task_run_id for f in (upstream, *also_ok)]
        assert any(str(i) in message or i.hex in message for i in ids), message
    return info.value


# =========================================================== public API


PUBLIC_NAMES = [
    "task", "Task", "TaskRunner", "ThreadPoolTaskRunner", "TaskFuture",
    "FutureList", "wait", "as_completed", "State", "StateType", "unmapped",
    "allow_failure", "quote", "TaskRunnerError", "UpstreamTaskError",
    "MappingLengthMismatch", "MappingMissingIterable", "CancelledRun",
    "CrashedRun",
]
EXCEPTION_NAMES = [
    "TaskRunnerError", "UpstreamTaskError", "MappingLengthMismatch",
    "MappingMissingIterable", "CancelledRun", "CrashedRun",
]


def test_public_names_are_importable_from_the_package():
    missing = [name for name in PUBLIC_NAMES if not hasattr(taskrunner, name)]
    assert missing == []


def test_exceptions_module_exports_the_same_classes():
    from taskrunner import exceptions

    for name in EXCEPTION_NAMES:
        assert getattr(exceptions, name) is getattr(taskrunner, name), name


def test_exception_hierarchy():
    assert issubclass(TaskRunnerError, Exception)
    for cls in (UpstreamTaskError, MappingLengthMismatch, MappingMissingIterable,
                CancelledRun, CrashedRun):
        assert issubclass(cls, TaskRunnerError), cls
    assert issubclass(MappingLengthMismatch, ValueError)
    assert issubclass(MappingMissingIterable, ValueError)


def test_state_type_has_the_six_members():
    members = [getattr(StateType, name) for name in ALL_TYPES]
    assert len(set(members)) == 6


def test_task_runner_is_abstract():
    with pytest.raises(TypeError):
        TaskRunner()
    assert issubclass(ThreadPoolTaskRunner, TaskRunner)


def test_runner_is_a_task_runner_with_its_name(runner_factory):
    runner = runner_factory()
    assert isinstance(runner, TaskRunner)
    assert runner.name == runner_factory.name


def test_context_manager_returns_the_runner(runner_factory):
    runner = runner_factory()
    with runner as entered:
        assert entered is runner
        assert entered.submit(rt.inc, {"x": 1}).result(timeout=10) == 2


def test_duplicate_is_a_new_unstarted_runner(runner_factory):
    runner = runner_factory(max_workers=2)
    copy = runner.duplicate()
    assert copy is not runner
    assert type(copy) is type(runner)
    assert copy.name == runner.name
    with pytest.raises(RuntimeError):  # unstarted
        copy.submit(rt.inc, {"x": 1})
    with runner:
        twin = runner.duplicate()
        with twin:  # a duplicate of a started runner can be entered at once
            assert twin.submit(rt.inc, {"x": 1}).result(timeout=10) == 2
        assert runner.submit(rt.inc, {"x": 2}).result(timeout=10) == 3
    # and so can a duplicate of an exited one
    with runner.duplicate() as again:
        assert again.submit(rt.inc, {"x": 3}).result(timeout=10) == 4


# ====================================================== task decorator


def test_task_decorator_bare_form():
    @task
    def double(x):
        return 2 * x

    assert isinstance(double, Task)
    assert double.name == "double"
    assert double(21) == 42


def test_task_decorator_with_name():
    @task(name="custom-name")
    def double(x):
        return 2 * x

    assert isinstance(double, Task)
    assert double.name == "custom-name"
    assert double(x=2) == 4


def test_task_decorator_empty_parentheses():
    @task()
    def triple(x):
        return 3 * x

    assert isinstance(triple, Task)
    assert triple.name == "triple"
    assert triple(2) == 6


def test_task_called_as_a_function():
    t = task(rt.add)
    assert t.name == "add"
    assert t(1, 2) == 3
    named = task(rt.add, name="plus")
    assert named.name == "plus"
    assert named(x=1, y=2) == 3


def test_task_name_of_a_callable_object_is_its_type_name():
    t = task(rt.Multiplier(3))
    assert t.name == "Multiplier"
    assert t(2) == 6
    p = task(functools.partial(rt.add, y=1))
    assert p.name == "partial"
    assert p(x=1) == 2


def test_runner_accepts_tasks_and_plain_callables(runner_factory):
    with runner_factory() as r:
        assert r.submit(task(rt.inc), {"x": 1}).result(timeout=10) == 2
        assert r.submit(rt.inc, {"x": 1}).result(timeout=10) == 2
        assert r.submit(rt.Multiplier(3), {"x": 2}).result(timeout=10) == 6
        assert r.submit(functools.partial(rt.add, y=1), {"x": 1}).result(timeout=10) == 2
        assert r.submit(lambda x: x * 2, {"x": 4}).result(timeout=10) == 8
        assert r.submit(rt.noop).result(timeout=10) is None


def test_task_name_appears_in_upstream_error(runner_factory):
    with runner_factory() as r:
        up = r.submit(task(rt.fail, name="exploder"), {"message": "kaput"})
        down = r.submit(rt.inc, {"x": up})
        err = assert_not_ready(down, up)
        assert "exploder" in str(err)
        plain = r.submit(rt.fail_custom, {"message": "kaput"})
        down2 = r.submit(rt.inc, {"x": plain})
        err2 = assert_not_ready(down2, plain)
        assert "fail_custom" in str(err2)


# ======================================== 1. bad input fails at the call


def test_submit_and_map_before_enter_raise_and_schedule_nothing(runner_factory, make_path):
    ran = make_path()
    r = runner_factory()
    with pytest.raises(RuntimeError):
        r.submit(rt.record, {"path": ran, "x": 1})
    with pytest.raises(RuntimeError):
        r.map(rt.record, {"path": ran, "x": [1, 2]})
    with r:
        assert r.submit(rt.inc, {"x": 1}).result(timeout=10) == 2
    assert not os.path.exists(ran)


def test_submit_and_map_after_exit_raise_and_schedule_nothing(runner_factory, make_path):
    ran = make_path()
    r = runner_factory()
    with r:
        assert r.submit(rt.inc, {"x": 1}).result(timeout=10) == 2
    with pytest.raises(RuntimeError):
        r.submit(rt.record, {"path": ran, "x": 1})
    with pytest.raises(RuntimeError):
        r.map(rt.record, {"path": ran, "x": [1, 2]})
    time.sleep(0.2)
    assert not os.path.exists(ran)


def test_entering_a_started_runner_raises(runner_factory):
    r = runner_factory()
    with r:
        with pytest.raises(RuntimeError):
            with r:
                pass
        # the runner is still fine
        assert r.submit(rt.inc, {"x": 1}).result(timeout=10) == 2


@pytest.mark.parametrize(
    "make_call",
    [
        pytest.param(lambda r, p: r.submit(42, {"x": 1}), id="non-callable-int"),
        pytest.param(lambda r, p: r.submit("record", {"path": p}), id="non-callable-str"),
        pytest.param(lambda r, p: r.submit(rt.record, [("path", p)]), id="params-list"),
        pytest.param(lambda r, p: r.submit(rt.record, (p, 1)), id="params-tuple"),
        pytest.param(lambda r, p: r.submit(rt.record, p), id="params-str"),
        pytest.param(lambda r, p: r.submit(rt.record_add, {"path": p, "x": 1}), id="missing"),
        pytest.param(lambda r, p: r.submit(rt.record, {"x": 1}), id="missing-first"),
        pytest.param(lambda r, p: r.submit(rt.record, {"path": p, "x": 1, "zzz": 2}), id="unknown"),
        pytest.param(lambda r, p: r.submit(rt.record, {"path": p}, wait_for=[1]), id="wait_for-int"),
        pytest.param(lambda r, p: r.submit(rt.record, {"path": p}, wait_for=["f"]), id="wait_for-str"),
    ],
)
def test_submit_bad_input_raises_type_error_and_schedules_nothing(
    runner_factory, make_path, make_call
):
    ran = make_path()
    with runner_factory() as r:
        with pytest.raises(TypeError):
            make_call(r, ran)
        # the runner is still usable
        assert r.submit(rt.inc, {"x": 1}).result(timeout=10) == 2
    assert not os.path.exists(ran)


def test_submit_wait_for_with_a_non_future_among_futures_schedules_nothing(
    runner_factory, make_path
):
    ran = make_path()
    with runner_factory() as r:
        good = r.submit(rt.inc, {"x": 1})
        with pytest.raises(TypeError):
            r.submit(rt.record, {"path": ran}, wait_for=[good, object()])
        assert good.result(timeout=10) == 2
    assert not os.path.exists(ran)


@pytest.mark.parametrize(
    "make_call",
    [
        pytest.param(lambda r, p: r.map(42, {"x": [1, 2]}), id="non-callable"),
        pytest.param(lambda r, p: r.map(rt.record, {"path": p, "x": [1, 2], "zzz": [1, 2]}), id="unknown"),
        pytest.param(lambda r, p: r.map(rt.record_add, {"path": p, "x": [1, 2]}), id="missing"),
        pytest.param(lambda r, p: r.map(rt.record, {"path": p, "x": [1, 2]}, wait_for=[3]), id="wait_for"),
    ],
)
def test_map_bad_input_raises_type_error_and_schedules_nothing(
    runner_factory, make_path, make_call
):
    ran = make_path()
    with runner_factory() as r:
        with pytest.raises(TypeError):
            make_call(r, ran)
        assert r.submit(rt.inc, {"x": 1}).result(timeout=10) == 2
    assert not os.path.exists(ran)


def test_defaults_apply_and_keyword_only_parameters_bind(runner_factory):
    with runner_factory() as r:
        assert r.submit(rt.add_default, {"x": 1}).result(timeout=10) == 101
        assert r.submit(rt.add_default, {"x": 1, "y": 2}).result(timeout=10) == 3
        assert r.submit(rt.kwonly, {"x": 3}).result(timeout=10) == 15
        assert r.submit(rt.kwonly, {"x": 3, "y": 2}).result(timeout=10) == 6


def test_var_keyword_functions_accept_extra_names(runner_factory):
    with runner_factory() as r:
        f = r.submit(rt.with_kwargs, {"a": 1, "extra": 2, "more": "m"})
        assert f.result(timeout=10) == {"a": 1, "extra": 2, "more": "m"}
        with pytest.raises(TypeError):  # `a` is still required
            r.submit(rt.with_kwargs, {"extra": 2})


def test_parameters_none_for_a_function_without_parameters(runner_factory):
    with runner_factory() as r:
        assert r.submit(rt.noop, None).result(timeout=10) is None
        assert r.submit(rt.noop, {}).result(timeout=10) is None
        assert r.submit(rt.make_range, parameters={"n": 3}).result(timeout=10) == [0, 1, 2]


# ========================================== 2. futures in the parameters


def test_futures_at_depth_are_resolved_and_collections_rebuilt(runner_factory):
    with runner_factory() as r:
        f = [r.submit(rt.identity, {"x": i}) for i in range(6)]
        payload = [
            f[0],
            (f[1], [f[2]]),
            {"k": f[3], "nested": {"m": (f[4],)}},
            {f[5]},
            "plain",
        ]
        got = r.submit(rt.identity, {"x": payload}).result(timeout=10)
    assert got == [0, (1, [2]), {"k": 3, "nested": {"m": (4,)}}, {5}, "plain"]
    assert type(got) is list
    assert type(got[1]) is tuple and type(got[1][1]) is list
    assert type(got[2]) is dict and type(got[2]["nested"]["m"]) is tuple
    assert type(got[3]) is set
    # the caller's structure is not modified
    assert payload[0] is f[0] and payload[3] == {f[5]}


def test_collection_subtypes_are_rebuilt_with_their_type(runner_factory):
    with runner_factory() as r:
        f = r.submit(rt.identity, {"x": 1})
        got_pair = r.submit(rt.identity, {"x": rt.Pair(f, [f])}).result(timeout=10)
        got_od = r.submit(rt.identity, {"x": collections.OrderedDict(k=f)}).result(timeout=10)
    assert type(got_pair) is rt.Pair and got_pair == rt.Pair(1, [1])
    assert type(got_od) is collections.OrderedDict and got_od == {"k": 1}


def test_each_top_level_parameter_is_resolved(runner_factory):
    with runner_factory() as r:
        a = r.submit(rt.identity, {"x": 10})
        b = r.submit(rt.identity, {"x": (20,)})
        got = r.submit(rt.pair, {"x": a, "y": {"t": b}}).result(timeout=10)
    assert got == (10, {"t": (20,)})


def test_the_same_future_twice_is_resolved_everywhere(runner_factory):
    with runner_factory() as r:
        f = r.submit(rt.inc, {"x": 2})
        got = r.submit(rt.pair, {"x": f, "y": [f, (f,)]}).result(timeout=10)
    assert got == (3, [3, (3,)])


def test_downstream_waits_for_its_upstream(runner_factory, make_gate, make_path):
    log = make_path()
    with runner_factory() as r, make_gate() as gate:
        up = r.submit(rt.gated, {"value": 5, "gate": gate.path})
        down = r.submit(rt.record, {"path": log, "x": [up]})
        time.sleep(0.3)
        assert not down.done()
        assert not os.path.exists(log)
        assert_state(down.state, "PENDING")
        gate.open()
        assert down.result(timeout=10) == [5]
    assert read_lines(log) == ["[5]"]


def test_already_completed_upstream(runner_factory):
    with runner_factory() as r:
        up = r.submit(rt.inc, {"x": 1})
        assert up.result(timeout=10) == 2
        assert r.submit(rt.inc, {"x": up}).result(timeout=10) == 3


def test_fan_in_and_fan_out(runner_factory):
    with runner_factory() as r:
        leaves = [r.submit(rt.identity, {"x": i}) for i in range(300)]
        summed = r.submit(rt.total, {"xs": leaves})
        fan = [r.submit(rt.add, {"x": summed, "y": i}) for i in range(300)]
        assert summed.result(timeout=20) == sum(range(300))
        assert [f.result(timeout=20) for f in fan] == [sum(range(300)) + i for i in range(300)]


def test_long_chain_completes(runner_factory):
    with runner_factory() as r:
        f = r.submit(rt.identity, {"x": 0})
        for _ in range(1500):
            f = r.submit(rt.inc, {"x": f})
        assert f.result(timeout=50) == 1500


def test_quote_passes_a_value_without_the_wrapper(runner_factory):
    with runner_factory() as r:
        got = r.submit(rt.identity, {"x": quote({"a": [1, (2,)]})}).result(timeout=10)
    assert got == {"a": [1, (2,)]}
    assert type(got) is dict


def test_quote_passes_the_very_object_without_resolving(inprocess_runner_factory, make_gate):
    with inprocess_runner_factory() as r, make_gate() as gate:
        blocked = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        payload = [blocked, {"k": blocked}]
        received = r.submit(rt.identity, {"x": quote(payload)})
        got = received.result(timeout=10)  # does not wait for `blocked`
        assert got is payload
        assert got[0] is blocked and got[1]["k"] is blocked
        assert not blocked.done()


def test_quoted_future_is_not_an_upstream(inprocess_runner_factory, make_gate):
    with inprocess_runner_factory() as r, make_gate() as gate:
        blocked = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        got = r.submit(rt.identity, {"x": quote(blocked)}).result(timeout=10)
        assert got is blocked
        assert not blocked.done()


# ============================================================ 3. wait_for


def test_wait_for_orders_runs_and_passes_no_result(runner_factory, make_gate, make_path):
    log = make_path()
    with runner_factory() as r, make_gate() as gate:
        a = r.submit(rt.gated, {"value": "A", "gate": gate.path, "log": log, "tag": "A"})
        b = r.submit(rt.log_value, {"log": log, "tag": "B", "value": 7}, wait_for=[a])
        time.sleep(0.3)
        assert read_lines(log) == []
        assert not b.done()
        gate.open()
        assert b.result(timeout=10) == 7
    assert read_lines(log) == ["A", "B"]


def test_wait_for_several_futures(runner_factory, make_gate, make_path):
    log = make_path()
    with runner_factory() as r, make_gate() as g1, make_gate() as g2:
        a1 = r.submit(rt.gated, {"value": 1, "gate": g1.path})
        a2 = r.submit(rt.gated, {"value": 2, "gate": g2.path})
        b = r.submit(rt.log_value, {"log": log, "tag": "B", "value": "b"}, wait_for=[a1, a2])
        g1.open()
        assert a1.result(timeout=10) == 1
        time.sleep(0.2)
        assert not b.done()
        g2.open()
        assert b.result(timeout=10) == "b"
    assert read_lines(log) == ["B"]


def test_wait_for_and_parameters_together(runner_factory):
    with runner_factory() as r:
        a = r.submit(rt.inc, {"x": 1})
        b = r.submit(rt.identity, {"x": 100})
        assert r.submit(rt.inc, {"x": a}, wait_for=[b]).result(timeout=10) == 3


# ================================================ 4. NotReady, allow_failure


def test_failed_upstream_makes_the_downstream_not_ready(runner_factory, make_path):
    ran = make_path()
    with runner_factory() as r:
        up = r.submit(rt.fail, {"message": "kaput"})
        down = r.submit(rt.record, {"path": ran, "x": up})
        err = assert_not_ready(down, up)
        assert "fail" in str(err)
        assert isinstance(down.exception(timeout=10), UpstreamTaskError)
    assert not os.path.exists(ran)


def test_failed_upstream_at_depth_and_in_wait_for(runner_factory, make_path):
    ran = make_path()
    with runner_factory() as r:
        up = r.submit(rt.fail, {"message": "kaput"})
        deep = r.submit(rt.record, {"path": ran, "x": {"k": [(up,)]}})
        waiting = r.submit(rt.record, {"path": ran, "x": 1}, wait_for=[up])
        assert_not_ready(deep, up)
        assert_not_ready(waiting, up)
    assert not os.path.exists(ran)


def test_not_ready_on_an_upstream_that_fails_later(runner_factory, make_gate, make_path):
    ran = make_path()
    with runner_factory() as r, make_gate() as gate:
        up = r.submit(rt.gated_fail, {"gate": gate.path})
        down = r.submit(rt.record, {"path": ran, "x": up})
        time.sleep(0.2)
        assert not down.done()
        gate.open()
        assert_not_ready(down, up)
    assert not os.path.exists(ran)


def test_not_ready_spreads_transitively(runner_factory, make_path):
    ran = make_path()
    with runner_factory() as r:
        a = r.submit(rt.fail, {"message": "root"})
        b = r.submit(rt.inc, {"x": a})
        c = r.submit(rt.inc, {"x": b})
        d = r.submit(rt.record, {"path": ran, "x": [c]}, wait_for=[b])
        assert_not_ready(b, a)
        assert_not_ready(c, b, a)
        assert_not_ready(d, c, b, a)
    assert not os.path.exists(ran)


def test_not_ready_spreads_down_a_long_chain(runner_factory):
    with runner_factory() as r:
        head = r.submit(rt.fail, {"message": "head"})
        chain = [head]
        for _ in range(3000):
            chain.append(r.submit(rt.inc, {"x": chain[-1]}))
        done, not_done = wait(chain, timeout=50)
        assert not not_done
        assert chain[-1].state.name == "NotReady"
        assert all(f.state.name == "NotReady" for f in chain[1:])


def test_submitting_below_an_already_failed_future(runner_factory, make_path):
    ran = make_path()
    with runner_factory() as r:
        up = r.submit(rt.fail, {"message": "early"})
        up.wait(timeout=10)
        assert up.state.is_failed()
        down = r.submit(rt.record, {"path": ran, "x": up})
        assert_not_ready(down, up)
    assert not os.path.exists(ran)


def test_cancelled_upstream_makes_the_downstream_not_ready(runner_factory, make_gate, make_path):
    ran = make_path()
    with runner_factory() as r, make_gate() as gate:
        blocker = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        victim = r.submit(task(rt.identity, name="victim"), {"x": 1}, wait_for=[blocker])
        before = r.submit(rt.record, {"path": ran, "x": victim})
        assert victim.cancel() is True
        after = r.submit(rt.record, {"path": ran, "x": [victim]})
        err = assert_not_ready(before, victim)
        assert "victim" in str(err)
        assert_not_ready(after, victim)
    assert not os.path.exists(ran)


def test_allow_failure_parameter_receives_the_exception(runner_factory):
    with runner_factory() as r:
        up = r.submit(rt.fail, {"message": "kaput"})
        down = r.submit(rt.describe, {"x": allow_failure(up)})
        assert down.result(timeout=10) == ("ValueError", "kaput")
        assert_state(down.state, "COMPLETED")


def test_allow_failure_at_depth(runner_factory):
    with runner_factory() as r:
        up = r.submit(rt.fail_custom, {"message": "deep"})
        down = r.submit(rt.describe_nested, {"payload": {"deep": [allow_failure(up)]}})
        assert down.result(timeout=10) == ("dict", "list", ("TaskError", "deep"))


def test_allow_failure_of_a_successful_upstream_passes_its_result(runner_factory):
    with runner_factory() as r:
        up = r.submit(rt.inc, {"x": 1})
        assert r.submit(rt.identity, {"x": [allow_failure(up)]}).result(timeout=10) == [2]


def test_allow_failure_still_waits_for_the_upstream(runner_factory, make_gate):
    with runner_factory() as r, make_gate() as gate:
        up = r.submit(rt.gated_fail, {"gate": gate.path, "message": "late"})
        down = r.submit(rt.describe, {"x": allow_failure(up)})
        time.sleep(0.2)
        assert not down.done()
        gate.open()
        assert down.result(timeout=10) == ("ValueError", "late")


def test_allow_failure_of_a_not_ready_upstream_receives_its_upstream_error(runner_factory):
    with runner_factory() as r:
        a = r.submit(rt.fail, {"message": "root"})
        b = r.submit(rt.inc, {"x": a})
        c = r.submit(rt.describe, {"x": allow_failure(b)})
        kind, message = c.result(timeout=10)
        assert kind == "UpstreamTaskError"
        assert str(a.task_run_id) in message or a.task_run_id.hex in message
        assert_not_ready(b, a)


def test_allow_failure_in_wait_for(runner_factory, make_gate, make_path):
    ran = make_path()
    with runner_factory() as r, make_gate() as gate:
        failed = r.submit(rt.fail, {"message": "x"})
        blocker = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        cancelled = r.submit(rt.inc, {"x": 1}, wait_for=[blocker])
        assert cancelled.cancel() is True
        down = r.submit(
            rt.record, {"path": ran, "x": 5},
            wait_for=[allow_failure(failed), allow_failure(cancelled)],
        )
        assert down.result(timeout=10) == 5
        assert_state(down.state, "COMPLETED")
    assert read_lines(ran) == ["5"]


def test_allow_failure_on_one_upstream_does_not_cover_another(runner_factory, make_path):
    ran = make_path()
    with runner_factory() as r:
        f1 = r.submit(rt.fail, {"message": "one"})
        f2 = r.submit(rt.fail, {"message": "two"})
        down = r.submit(rt.record, {"path": ran, "x": [allow_failure(f1), f2]})
        assert_not_ready(down, f2)
    assert not os.path.exists(ran)


def test_allow_failure_receives_the_same_exception_object(inprocess_runner_factory):
    with inprocess_runner_factory() as r:
        up = r.submit(rt.fail, {"message": "kaput"})
        got = r.submit(rt.identity, {"x": {"e": allow_failure(up)}}).result(timeout=10)
        assert got["e"] is up.exception(timeout=10)


# =================================================== 5. task exceptions


def test_task_exception_is_reraised_and_recorded(runner_factory):
    with runner_factory() as r:
        f = r.submit(rt.fail_custom, {"message": "bad 42"})
        f.wait(timeout=10)
        state = f.state
        assert_state(state, "FAILED")
        assert state.name != "NotReady"
        with pytest.raises(rt.TaskError) as info:
            f.result(timeout=10)
        err = info.value
        assert type(err) is rt.TaskError
        assert str(err) == "bad 42"
        assert repr(err) in state.message
        assert f.exception(timeout=10) is err
        assert f.result(timeout=10, raise_on_failure=False) is err
        with pytest.raises(rt.TaskError) as again:
            f.result()
        assert again.value is err


def test_task_exception_is_the_very_object_raised(inprocess_runner_factory):
    err = rt.TaskError("the one")

    def boom():
        raise err

    with inprocess_runner_factory() as r:
        f = r.submit(boom)
        with pytest.raises(rt.TaskError) as info:
            f.result(timeout=10)
        assert info.value is err
        assert f.exception() is err
        assert f.result(raise_on_failure=False) is err
        assert repr(err) in f.state.message


def test_a_task_raising_system_exit_still_ends_final(runner_factory):
    with runner_factory() as r:
        f = r.submit(rt.exit_task)
        f.wait(timeout=20)
        assert f.done()
        assert f.state.is_failed() or f.state.is_crashed(), f.state
        with pytest.raises((SystemExit, CrashedRun)):
            f.result(timeout=10)
        assert_not_ready(r.submit(rt.inc, {"x": f}), f)
        assert r.submit(rt.inc, {"x": 1}).result(timeout=20) == 2


def test_successful_future_result_and_exception(runner_factory):
    with runner_factory() as r:
        f = r.submit(rt.inc, {"x": 1})
        assert f.result(timeout=10) == 2
        assert f.result(timeout=10, raise_on_failure=False) == 2
        assert f.exception(timeout=10) is None
        assert_state(f.state, "COMPLETED")
        assert f.done()


def test_result_timeout_raises_builtin_timeout_error(runner_factory, make_gate):
    with runner_factory() as r, make_gate() as gate:
        f = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            f.result(timeout=0.2)
        elapsed = time.monotonic() - t0
        assert 0.15 <= elapsed < 5
        with pytest.raises(TimeoutError):
            f.exception(timeout=0.1)
        with pytest.raises(TimeoutError):
            f.result(timeout=0)
        assert not f.done()
        gate.open()
        assert f.result(timeout=10) == 1


def test_future_wait_returns_at_the_timeout_without_raising(runner_factory, make_gate):
    with runner_factory() as r, make_gate() as gate:
        f = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        t0 = time.monotonic()
        f.wait(timeout=0.2)
        elapsed = time.monotonic() - t0
        assert 0.15 <= elapsed < 5
        assert not f.done()
        gate.open()
        f.wait()
        assert f.done()
        assert f.result() == 1


# ============================================================= states


def test_pending_running_completed_states(runner_factory, make_gate, make_path):
    started = make_path()
    with runner_factory() as r, make_gate() as gate:
        a = r.submit(rt.gated, {"value": 1, "gate": gate.path, "started": started})
        b = r.submit(rt.inc, {"x": a})
        wait_path(started, 10)
        assert_state(a.state, "RUNNING")
        assert not a.done()
        assert_state(b.state, "PENDING")
        assert not b.done()
        gate.open()
        assert b.result(timeout=10) == 2
        assert_state(a.state, "COMPLETED")
        assert_state(b.state, "COMPLETED")
        assert a.done() and b.done()


# ===================================================================== map


def test_map_returns_a_future_list_in_input_order(runner_factory):
    with runner_factory() as r:
        futures = r.map(rt.inc, {"x": [1, 2, 3]})
        assert isinstance(futures, FutureList)
        assert isinstance(futures, list)
        assert len(futures) == 3
        assert all(isinstance(f, TaskFuture) for f in futures)
        assert futures.result(timeout=10) == [2, 3, 4]
        assert [f.result() for f in futures] == [2, 3, 4]


def test_map_results_keep_input_order_when_completion_order_differs(runner_factory):
    n = 6
    with runner_factory(max_workers=n) as r:
        futures = r.map(rt.sleep_reverse, {"x": range(n), "n": n, "unit": 0.03})
        assert futures.result(timeout=20) == [i * 10 for i in range(n)]


def test_map_items_of_every_kind_reach_the_task_as_they_are(runner_factory):
    # None, tuples and empty tuples among the items: each call gets its item
    # as its one argument, never unpacked or taken for "no argument".
    items = [None, (), (1, 2), [3], 0, "s", None]
    with runner_factory() as r:
        futures = r.map(rt.identity, {"x": items})
        assert futures.result(timeout=20) == items
        described = r.map(rt.concat, {"x": [None, (1,)], "s": unmapped("!")})
        assert described.result(timeout=20) == ["None:!", "(1,):!"]


def test_map_with_keyword_parameters_beside_the_mapped_one(runner_factory):
    with runner_factory() as r:
        futures = r.map(rt.kwonly, {"x": [1, 2, 3], "y": unmapped(10)})
        assert futures.result(timeout=20) == [10, 20, 30]
        futures = r.map(rt.with_kwargs, {"a": [None, 2], "b": unmapped(1)})
        assert futures.result(timeout=20) == [{"a": None, "b": 1}, {"a": 2, "b": 1}]


@pytest.mark.parametrize("kind", ["int", "big", "bool", "float", "enum", "mixed", "last-differs"])
def test_results_keep_their_exact_type_and_value(runner_factory, kind):
    with runner_factory() as r:
        got = r.map(rt.value_of_kind, {"x": range(200), "kind": kind}).result(timeout=30)
    expected = [rt.value_of_kind(x, kind) for x in range(200)]
    assert [(type(v), v) for v in got] == [(type(v), v) for v in expected]


def test_map_zips_iterables(runner_factory):
    with runner_factory() as r:
        assert r.map(rt.add, {"x": [1, 2, 3], "y": (10, 20, 30)}).result(timeout=10) == [11, 22, 33]
        assert r.map(rt.add, {"x": range(3), "y": [0, 1, 2]}).result(timeout=10) == [0, 2, 4]
        gen = (i * i for i in range(3))
        assert r.map(rt.add, {"x": gen, "y": [1, 1, 1]}).result(timeout=10) == [1, 2, 5]


def test_map_broadcasts_non_iterables_unmapped_and_strings(runner_factory):
    with runner_factory() as r:
        assert r.map(rt.add, {"x": [1, 2], "y": 10}).result(timeout=10) == [11, 12]
        assert r.map(rt.length, {"x": [1, 2, 3], "y": unmapped([9, 9])}).result(timeout=10) == [
            (1, 2), (2, 2), (3, 2)]
        assert r.map(rt.concat, {"x": [1, 2], "s": "abc"}).result(timeout=10) == ["1:abc", "2:abc"]
        assert r.map(rt.concat, {"x": [1, 2], "s": b"ab"}).result(timeout=10) == [
            "1:b'ab'", "2:b'ab'"]
        assert r.map(rt.add_default, {"x": [1, 2]}).result(timeout=10) == [101, 102]


def test_map_over_a_string_alone_is_missing_an_iterable(runner_factory, make_path):
    ran = make_path()
    with runner_factory() as r:
        with pytest.raises(MappingMissingIterable):
            r.map(rt.record, {"path": ran, "x": "abc"})
        with pytest.raises(MappingMissingIterable):
            r.map(rt.record, {"path": ran, "x": b"abc"})
    assert not os.path.exists(ran)


def test_map_does_not_iterate_file_objects(inprocess_runner_factory, make_path):
    path = make_path()
    with open(path, "w") as fh:
        fh.write("line one\nline two\nline three\n")
    with open(path) as fh, inprocess_runner_factory() as r:
        got = r.map(rt.pair, {"x": [1, 2], "y": fh}).result(timeout=10)
        assert [x for x, _ in got] == [1, 2]
        assert all(y is fh for _, y in got)


def test_map_unmapped_future_goes_to_every_call(runner_factory):
    with runner_factory() as r:
        ten = r.submit(rt.identity, {"x": 10})
        assert r.map(rt.add, {"x": [1, 2], "y": unmapped(ten)}).result(timeout=10) == [11, 12]


def test_map_over_a_list_of_futures(runner_factory):
    with runner_factory() as r:
        futures = [r.submit(rt.inc, {"x": i}) for i in range(4)]
        assert r.map(rt.inc, {"x": futures}).result(timeout=10) == [2, 3, 4, 5]


def test_map_items_holding_futures_and_allow_failure(runner_factory):
    with runner_factory() as r:
        one = r.submit(rt.identity, {"x": 1})
        bad = r.submit(rt.fail, {"message": "m"})
        assert r.map(rt.total, {"xs": [[one, one], [one], []]}).result(timeout=10) == [2, 1, 0]
        got = r.map(rt.describe, {"x": [allow_failure(bad), one]}).result(timeout=10)
        assert got == [("ValueError", "m"), ("int", "1")]


def test_map_unmapped_future_list_goes_whole_to_every_call(runner_factory):
    with runner_factory() as r:
        first = r.map(rt.inc, {"x": range(3)})
        got = r.map(rt.pair, {"x": [1, 2], "y": unmapped(first)}).result(timeout=10)
        assert got == [(1, [1, 2, 3]), (2, [1, 2, 3])]


def test_map_over_a_single_task_future_maps_its_result(runner_factory):
    with runner_factory() as r:
        f = r.submit(rt.make_range, {"n": 4})
        mapped = r.map(rt.add, {"x": f, "y": 100})
        assert isinstance(mapped, FutureList)
        assert len(mapped) == 4
        assert mapped.result(timeout=10) == [100, 101, 102, 103]


def test_map_over_the_output_of_map(runner_factory):
    with runner_factory() as r:
        first = r.map(rt.inc, {"x": range(20)})
        second = r.map(rt.add, {"x": first, "y": range(20)})
        assert second.result(timeout=20) == [2 * i + 1 for i in range(20)]


def test_map_over_a_future_list_streams_without_blocking(runner_factory, make_gate):
    with runner_factory(max_workers=4) as r, make_gate() as gate:
        first = r.map(rt.gated_item, {"x": range(6), "block_on": 0, "gate": gate.path})
        t0 = time.monotonic()
        second = r.map(rt.inc, {"x": first})
        assert time.monotonic() - t0 < 2.0
        assert isinstance(second, FutureList) and len(second) == 6
        done, not_done = wait(second[1:], timeout=10)
        assert not not_done
        assert [f.result() for f in second[1:]] == [2, 3, 4, 5, 6]
        assert not first[0].done()
        assert not second[0].done()
        gate.open()
        assert second.result(timeout=10) == [1, 2, 3, 4, 5, 6]


def test_map_over_a_future_list_with_a_failure(runner_factory):
    with runner_factory() as r:
        first = r.map(rt.fail_if, {"x": range(4), "bad": 2})
        second = r.map(rt.inc, {"x": first})
        second.wait(timeout=10)
        assert [second[i].result() for i in (0, 1, 3)] == [1, 2, 4]
        assert_not_ready(second[2], first[2])
        with pytest.raises(ValueError):
            first.result(timeout=10)
        got = first.result(timeout=10, raise_on_failure=False)
        assert got[:2] == [0, 1] and got[3] == 3
        assert isinstance(got[2], ValueError)
        assert got[2] is first[2].exception()


def test_map_over_allow_failure_of_a_future_list_maps_each_item_allowed(runner_factory):
    # Prefect maps an annotated iterable item by item and wraps each item
    # in the annotation again (issue 13, point 12).
    with runner_factory() as r:
        ups = r.map(rt.fail_if, {"x": range(4), "bad": 2})
        shown = r.map(rt.show, {"x": allow_failure(ups)})
        assert len(shown) == 4
        got = shown.result(timeout=20)
        assert got[0] == ("value", 0) and got[1] == ("value", 1) and got[3] == ("value", 3)
        assert got[2] == ("error", "ValueError", "bad item 2")


def test_map_over_a_quoted_list_maps_each_item_quoted(runner_factory):
    with runner_factory() as r:
        assert r.map(rt.show, {"x": quote([1, 2])}).result(timeout=20) == [
            ("value", 1), ("value", 2)]
        # A quoted item is passed as it is: a nested list stays a list.
        assert r.map(rt.types_of, {"x": quote([[1], (2,)])}).result(timeout=20) == [
            ("list", ["int"]), ("tuple", ["int"])]


def test_a_future_list_parameter_reaches_the_task_as_a_plain_list(runner_factory):
    # Empty or not (issue 13, point 18).
    with runner_factory() as r:
        empty = r.map(rt.inc, {"x": []})
        full = r.map(rt.inc, {"x": [1, 2]})
        assert r.submit(rt.type_name, {"x": empty}).result(timeout=20) == "list"
        assert r.submit(rt.type_name, {"x": full}).result(timeout=20) == "list"
        assert r.submit(rt.identity, {"x": empty}).result(timeout=20) == []


class _NoIteration:
    """Has __iter__, but iter() of it raises TypeError, as a 0-d array's does."""

    def __iter__(self):
        raise TypeError("iteration over a 0-d array")


def test_a_value_whose_iter_raises_type_error_is_not_mapped(runner_factory, make_path):
    ran = make_path()
    with runner_factory() as r:
        with pytest.raises(MappingMissingIterable):
            r.map(rt.record, {"path": ran, "x": _NoIteration()})
    assert not os.path.exists(ran)


def test_map_length_mismatch_raises_before_scheduling(runner_factory, make_path):
    ran = make_path()
    with runner_factory() as r:
        with pytest.raises(MappingLengthMismatch) as info:
            r.map(rt.record_add, {"path": ran, "x": [1, 2], "y": [1, 2, 3]})
        assert isinstance(info.value, ValueError)
        first = r.map(rt.inc, {"x": range(3)})
        with pytest.raises(MappingLengthMismatch):
            r.map(rt.record_add, {"path": ran, "x": first, "y": [1, 2]})
        with pytest.raises(MappingLengthMismatch):
            r.map(rt.record_add, {"path": ran, "x": range(5), "y": (i for i in range(4))})
        three = r.submit(rt.make_range, {"n": 3})
        with pytest.raises(MappingLengthMismatch):
            r.map(rt.record_add, {"path": ran, "x": three, "y": [1, 2]})
        assert first.result(timeout=10) == [1, 2, 3]
    assert not os.path.exists(ran)


def test_map_without_an_iterable_raises_before_scheduling(runner_factory, make_path):
    ran = make_path()
    with runner_factory() as r:
        with pytest.raises(MappingMissingIterable) as info:
            r.map(rt.record_add, {"path": ran, "x": 1, "y": 2})
        assert isinstance(info.value, ValueError)
        with pytest.raises(MappingMissingIterable):
            r.map(rt.record_add, {"path": ran, "x": unmapped([1, 2]), "y": 2})
        with pytest.raises(MappingMissingIterable):
            r.map(rt.record_add, {"path": ran, "x": "ab", "y": "cd"})
    assert not os.path.exists(ran)


def test_map_wait_for(runner_factory, make_gate, make_path):
    log = make_path()
    with runner_factory() as r, make_gate() as gate:
        a = r.submit(rt.gated, {"value": 0, "gate": gate.path, "log": log, "tag": "A"})
        mapped = r.map(rt.log_value, {"log": log, "tag": ["x", "y", "z"]}, wait_for=[a])
        time.sleep(0.3)
        assert read_lines(log) == []
        assert not any(f.done() for f in mapped)
        gate.open()
        mapped.wait(timeout=10)
        assert all(f.state.is_completed() for f in mapped)
    lines = read_lines(log)
    assert lines[0] == "A" and sorted(lines[1:]) == ["x", "y", "z"]


def test_map_gives_each_call_its_own_run(runner_factory):
    with runner_factory() as r:
        futures = r.map(rt.inc, {"x": range(50)})
        ids = {f.task_run_id for f in futures}
        assert len(ids) == 50
        assert len(set(futures)) == 50


# ============================================ FutureList, wait, as_completed


def test_future_list_built_by_the_user(runner_factory):
    with runner_factory() as r:
        futures = FutureList(r.submit(rt.inc, {"x": i}) for i in range(5))
        assert isinstance(futures, list)
        futures.wait(timeout=10)
        assert all(f.done() for f in futures)
        assert futures.result(timeout=10) == [1, 2, 3, 4, 5]


def test_future_list_wait_and_result_timeouts(runner_factory, make_gate):
    with runner_factory() as r, make_gate() as gate:
        futures = FutureList([r.submit(rt.inc, {"x": 1}),
                              r.submit(rt.gated, {"value": 2, "gate": gate.path})])
        t0 = time.monotonic()
        futures.wait(timeout=0.2)
        assert 0.15 <= time.monotonic() - t0 < 5
        assert not futures[1].done()
        with pytest.raises(TimeoutError):
            futures.result(timeout=0.2)
        gate.open()
        assert futures.result(timeout=10) == [2, 2]


def test_wait_returns_named_tuple_of_sets(runner_factory):
    with runner_factory() as r:
        futures = [r.submit(rt.inc, {"x": i}) for i in range(5)]
        res = wait(futures)
        assert isinstance(res, tuple) and res._fields == ("done", "not_done")
        done, not_done = res
        assert res.done is done and res.not_done is not_done
        assert isinstance(done, set) and isinstance(not_done, set)
        assert done == set(futures) and not_done == set()
        assert all(f.done() for f in futures)


def test_wait_with_timeout_splits_done_and_not_done(runner_factory, make_gate):
    with runner_factory() as r, make_gate() as gate:
        quick = r.submit(rt.inc, {"x": 1})
        quick.result(timeout=10)
        slow = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        t0 = time.monotonic()
        done, not_done = wait([quick, slow], timeout=0.2)
        assert 0.15 <= time.monotonic() - t0 < 5
        assert done == {quick} and not_done == {slow}
        gate.open()
        done, not_done = wait([quick, slow], timeout=10)
        assert done == {quick, slow} and not_done == set()


def test_wait_on_nothing():
    done, not_done = wait([])
    assert done == set() and not_done == set()


def test_as_completed_yields_in_completion_order(runner_factory, make_gate):
    with runner_factory(max_workers=3) as r:
        gates = [make_gate() for _ in range(3)]
        futures = [r.submit(rt.gated, {"value": i, "gate": g.path}) for i, g in enumerate(gates)]
        opening = iter([gates[2], gates[0], gates[1]])
        next(opening).open()
        seen = []
        for f in as_completed(futures, timeout=20):
            seen.append(f)
            following = next(opening, None)
            if following is not None:
                following.open()
        assert seen == [futures[2], futures[0], futures[1]]


def test_as_completed_yields_each_future_once(runner_factory):
    with runner_factory() as r:
        a = r.submit(rt.inc, {"x": 1})
        b = r.submit(rt.fail, {"message": "x"})
        c = r.submit(rt.inc, {"x": b})
        seen = list(as_completed([a, b, a, c, b], timeout=20))
        assert len(seen) == 3
        assert set(seen) == {a, b, c}


def test_as_completed_timeout_raises_after_the_done_ones(runner_factory, make_gate):
    with runner_factory() as r, make_gate() as gate:
        quick = r.submit(rt.inc, {"x": 1})
        quick.result(timeout=10)
        slow = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        seen = []
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            for f in as_completed([quick, slow], timeout=0.3):
                seen.append(f)
        assert seen == [quick]
        assert 0.2 <= time.monotonic() - t0 < 5


# ================================================================ futures


def test_futures_are_hashable_by_identity(runner_factory, make_gate):
    with runner_factory() as r, make_gate() as gate:
        pending = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        h = hash(pending)
        a = r.submit(rt.identity, {"x": 1})
        b = r.submit(rt.identity, {"x": 1})
        assert a.result(timeout=10) == b.result(timeout=10)
        assert a == a and a != b
        assert len({a, b, pending}) == 3
        table = {a: "a", b: "b", pending: "p"}
        assert table[a] == "a" and table[b] == "b" and table[pending] == "p"
        gate.open()
        pending.result(timeout=10)
        assert hash(pending) == h
        assert table[pending] == "p"


def test_task_run_id_is_a_stable_unique_uuid(runner_factory):
    with runner_factory() as r:
        futures = [r.submit(rt.inc, {"x": i}) for i in range(100)]
        futures += list(r.map(rt.inc, {"x": range(100)}))
        ids = [f.task_run_id for f in futures]
        assert all(isinstance(i, uuid.UUID) for i in ids)
        assert len(set(ids)) == 200
        wait(futures, timeout=20)
        assert [f.task_run_id for f in futures] == ids


def test_done_callback_is_called_once_when_the_run_finishes(runner_factory, make_gate):
    calls = []
    called = threading.Event()

    def callback(fut):
        calls.append(fut)
        called.set()

    with runner_factory() as r, make_gate() as gate:
        f = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        f.add_done_callback(callback)
        time.sleep(0.1)
        assert calls == []
        gate.open()
        assert called.wait(10)
        assert f.result(timeout=10) == 1
    time.sleep(0.1)
    assert len(calls) == 1 and calls[0] is f


def test_done_callback_on_a_done_future_is_called_at_once(runner_factory):
    calls = []
    with runner_factory() as r:
        f = r.submit(rt.inc, {"x": 1})
        f.result(timeout=10)
        f.add_done_callback(calls.append)
        assert len(calls) == 1 and calls[0] is f
    assert len(calls) == 1


def test_several_done_callbacks_and_failed_or_not_ready_futures(runner_factory):
    calls = []
    lock = threading.Lock()

    def make(tag):
        def callback(fut):
            with lock:
                calls.append((tag, fut))
        return callback

    with runner_factory() as r:
        failed = r.submit(rt.fail, {"message": "x"})
        not_ready = r.submit(rt.inc, {"x": failed})
        for f in (failed, not_ready):
            f.add_done_callback(make("one"))
            f.add_done_callback(make("two"))
        wait([failed, not_ready], timeout=10)
    assert wait_until(lambda: len(calls) >= 4, timeout=5)
    time.sleep(0.1)
    assert sorted((tag, id(f)) for tag, f in calls) == sorted(
        (tag, id(f)) for tag in ("one", "two") for f in (failed, not_ready))


def _raising_callback(fut):
    raise RuntimeError("callback failure (expected in this test)")


def test_a_raising_done_callback_does_not_stop_the_others(runner_factory):
    calls = []
    with runner_factory() as r:
        f = r.submit(rt.inc, {"x": 1})
        f.add_done_callback(_raising_callback)
        f.add_done_callback(calls.append)
        assert f.result(timeout=10) == 2
        assert wait_until(lambda: len(calls) == 1, timeout=5)
        g = r.submit(rt.inc, {"x": f})
        assert g.result(timeout=10) == 3
        g.add_done_callback(_raising_callback)  # already done: must not raise here either
    assert calls == [f]


def test_a_done_callback_may_submit_to_its_runner_and_wait(runner_factory, make_gate):
    # With one worker, and for the runners that end runs on one thread:
    # the callback must not block the thread that completes other runs
    # (issue 13, point 3).
    got = []
    done = threading.Event()
    with running(runner_factory(max_workers=1)) as r:
        def callback(fut):
            follow = r.submit(rt.inc, {"x": fut.result()})
            got.append(follow.result(timeout=30))
            got.append(r.map(rt.inc, {"x": [1, 2]}).result(timeout=30))
            done.set()

        first = r.submit(rt.inc, {"x": 1})
        first.add_done_callback(callback)
        assert done.wait(40), "the done callback never finished"
        assert got == [3, [2, 3]]
        # Several callbacks blocked on a future at once (of another runner,
        # held by a gate) stop neither the runner nor each other.
        waiting = []
        with ThreadPoolTaskRunner(1) as other, make_gate() as gate:
            held = other.submit(rt.gated, {"value": 4, "gate": gate.path})
            for i in range(3):
                r.submit(rt.inc, {"x": i}).add_done_callback(
                    lambda fut: waiting.append(held.result(timeout=30)))
            assert r.submit(rt.inc, {"x": 5}).result(timeout=30) == 6
            assert r.map(rt.inc, {"x": range(10)}).result(timeout=30) == list(range(1, 11))
            assert waiting == []
    assert waiting == [4, 4, 4]


def _in_exit_of(runner):
    """Whether some thread is inside runner.__exit__ now."""
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "__exit__" and frame.f_locals.get("self") is runner:
                return True
            frame = frame.f_back
    return False


def test_a_done_callback_may_submit_while_the_runner_exits(runner_factory, make_gate):
    # The exit waits for the callbacks of runs that ended before it
    # returns, and for the runs they submit (issue 13, point 13).
    follow = []
    errors = []
    r = runner_factory()

    def callback(fut):
        try:
            assert wait_until(lambda: _in_exit_of(r), timeout=20), "the exit never began"
            follow.append(r.submit(rt.inc, {"x": fut.result()}))
            follow.append(r.map(rt.inc, {"x": [7, 8]}))
        except BaseException as error:
            errors.append(error)

    with running(r), make_gate() as gate:
        # Held until the callback is in place: it must not run right here.
        first = r.submit(rt.gated, {"value": 2, "gate": gate.path})
        first.add_done_callback(callback)
    assert errors == []
    assert follow[0].done() and follow[0].result() == 3
    assert follow[1].result(timeout=0) == [8, 9]


def test_done_callback_on_a_cancelled_future(runner_factory, make_gate):
    calls = []
    with runner_factory() as r, make_gate() as gate:
        blocker = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        f = r.submit(rt.inc, {"x": 1}, wait_for=[blocker])
        f.add_done_callback(calls.append)
        assert f.cancel() is True
        assert wait_until(lambda: len(calls) == 1, timeout=5)
        assert calls[0] is f
    time.sleep(0.05)
    assert len(calls) == 1


# ============================================================== cancel()


def test_cancel_a_run_blocked_behind_an_upstream(runner_factory, make_gate, make_path):
    ran = make_path()
    with runner_factory() as r, make_gate() as gate:
        blocker = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        f = r.submit(rt.record, {"path": ran, "x": blocker})
        assert f.cancel() is True
        assert f.done()
        assert_state(f.state, "CANCELLED")
        with pytest.raises(CancelledRun):
            f.result(timeout=10)
        gate.open()
        assert blocker.result(timeout=10) == 1
        time.sleep(0.1)
        assert_state(f.state, "CANCELLED")
    assert not os.path.exists(ran)


def test_cancel_a_run_queued_for_a_worker(runner_factory, make_gate, make_path):
    started, ran = make_path(), make_path()
    with runner_factory(max_workers=1) as r, make_gate() as gate:
        running = r.submit(rt.gated, {"value": 1, "gate": gate.path, "started": started})
        wait_path(started, 10)
        queued = r.submit(rt.record, {"path": ran, "x": 2})
        assert queued.cancel() is True
        assert_state(queued.state, "CANCELLED")
        gate.open()
        assert running.result(timeout=10) == 1
    with pytest.raises(CancelledRun):
        queued.result()
    assert not os.path.exists(ran)


def test_cancelling_a_cancelled_run_again_returns_true(runner_factory, make_gate, make_path):
    # As concurrent.futures.Future.cancel() does (issue 13, point 14).
    with runner_factory() as r, make_gate() as gate:
        blocker = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        f = r.submit(rt.inc, {"x": blocker})
        also = r.submit(rt.inc, {"x": blocker})
        assert f.cancel() is True
        assert f.cancel() is True
        r.cancel_all()
        assert_state(also.state, "CANCELLED")
        assert also.cancel() is True
        assert_state(f.state, "CANCELLED")


def test_cancel_a_running_or_finished_run_returns_false(runner_factory, make_gate, make_path):
    started = make_path()
    with runner_factory() as r, make_gate() as gate:
        running = r.submit(rt.gated, {"value": 1, "gate": gate.path, "started": started})
        wait_path(started, 10)
        assert running.cancel() is False
        gate.open()
        assert running.result(timeout=10) == 1
        assert_state(running.state, "COMPLETED")
        assert running.cancel() is False
        assert_state(running.state, "COMPLETED")
        failed = r.submit(rt.fail, {"message": "x"})
        failed.wait(timeout=10)
        assert failed.cancel() is False
        assert_state(failed.state, "FAILED")


# ==================================== 7. every future reaches a final state


def test_normal_exit_waits_for_every_run(runner_factory):
    with runner_factory(max_workers=2) as r:
        leaves = [r.submit(rt.sleep_then, {"x": i, "seconds": 0.1}) for i in range(4)]
        summed = r.submit(rt.total, {"xs": leaves})
        mapped = r.map(rt.inc, {"x": leaves})
    assert all(f.done() for f in leaves)
    assert summed.done() and summed.result() == 6
    assert all(f.done() for f in mapped) and mapped.result() == [1, 2, 3, 4]


def test_normal_exit_waits_for_a_slow_run(runner_factory, make_gate, make_path):
    gate = make_gate()
    log = make_path()
    t0 = time.monotonic()
    with runner_factory() as r:
        f = r.submit(rt.gated, {"value": 1, "gate": gate.path, "log": log, "tag": "done"})
        down = r.submit(rt.inc, {"x": f})
        gate.open_after(0.4)
    assert time.monotonic() - t0 >= 0.35
    assert f.done() and down.done()
    assert down.result() == 2
    assert read_lines(log) == ["done"]


def test_normal_exit_runs_unreferenced_submissions(runner_factory, make_path):
    log = make_path()
    with runner_factory() as r:
        for i in range(50):
            r.submit(rt.record, {"path": log, "x": i})
        r.map(rt.record, {"path": log, "x": range(50, 60)})
    assert sorted(int(x) for x in read_lines(log)) == list(range(60))


class _Boom(Exception):
    pass


def test_exit_by_exception_cancels_unstarted_and_waits_for_running(
    runner_factory, make_gate, make_path
):
    gate = make_gate()
    started, ran_b, ran_c, ran_d = make_path(), make_path(), make_path(), make_path()
    t0 = time.monotonic()
    with pytest.raises(_Boom):
        with runner_factory(max_workers=1) as r:
            a = r.submit(rt.gated, {"value": "a", "gate": gate.path, "started": started})
            wait_path(started, 10)
            b = r.submit(rt.record, {"path": ran_b, "x": 1})  # ready, queued
            c = r.submit(rt.record, {"path": ran_c, "x": a})  # waiting for a
            d = r.map(rt.record, {"path": ran_d, "x": [c, b]})
            gate.open_after(0.5)
            raise _Boom()
    assert time.monotonic() - t0 >= 0.4  # waited for the running one
    assert a.done()
    assert_state(a.state, "COMPLETED")
    assert a.result() == "a"
    for f in (b, c):
        assert f.done()
        assert_state(f.state, "CANCELLED")
        with pytest.raises(CancelledRun):
            f.result()
    for f in d:  # downstream of cancelled runs: cancelled itself, or NotReady
        assert f.done()
        assert f.state.is_cancelled() or f.state.name == "NotReady", f.state
        with pytest.raises((CancelledRun, UpstreamTaskError)):
            f.result()
    time.sleep(0.1)
    for path in (ran_b, ran_c, ran_d):
        assert not os.path.exists(path)


def test_cancel_all_cancels_unstarted_and_lets_running_finish(
    runner_factory, make_gate, make_path
):
    started, ran_b, ran_c = make_path(), make_path(), make_path()
    with runner_factory(max_workers=1) as r, make_gate() as gate:
        a = r.submit(rt.gated, {"value": "a", "gate": gate.path, "started": started})
        wait_path(started, 10)
        b = r.submit(rt.record, {"path": ran_b, "x": 1})
        c = r.submit(rt.record, {"path": ran_c, "x": a})
        gate.open_after(0.5)  # in case cancel_all waits for the running run
        r.cancel_all()
        for f in (b, c):
            f.wait(timeout=10)
            assert_state(f.state, "CANCELLED")
            with pytest.raises(CancelledRun):
                f.result(timeout=10)
        assert a.result(timeout=10) == "a"
        assert_state(a.state, "COMPLETED")
    time.sleep(0.1)
    assert not os.path.exists(ran_b) and not os.path.exists(ran_c)


def test_random_graph_with_failures_and_cancellations(runner_factory, make_gate):
    rng = random.Random(20240601)
    n = 400
    outcome = {}  # i -> ("ok", value) | ("failed",) | ("notready",) | ("cancelled",)
    futures = []
    with runner_factory(max_workers=4) as r, make_gate() as gate:
        blocker = r.submit(rt.gated, {"value": 0, "gate": gate.path})
        for i in range(n):
            ups = rng.sample(range(i), k=min(i, rng.randint(0, 3)))
            bad = rng.random() < 0.05
            cancel = rng.random() < 0.05
            wait_for = [blocker] if cancel or rng.random() < 0.05 else None
            f = r.submit(rt.node, {"i": i, "xs": [futures[j] for j in ups], "bad": bad},
                         wait_for=wait_for)
            futures.append(f)
            upstream_bad = any(outcome[j][0] != "ok" for j in ups)
            if cancel and f.cancel():
                outcome[i] = ("cancelled",)
            elif cancel and not upstream_bad:
                pytest.fail(f"cancel() of a run waiting for a gated upstream returned False ({i})")
            elif upstream_bad:  # (a cancel may lose the race with NotReady here)
                outcome[i] = ("notready",)
            elif bad:
                outcome[i] = ("failed",)
            else:
                outcome[i] = ("ok", i + sum(outcome[j][1] for j in ups))
    for i, f in enumerate(futures):
        assert f.done(), i
        expected = outcome[i]
        if expected[0] == "ok":
            assert f.result() == expected[1], i
        elif expected[0] == "failed":
            assert_state(f.state, "FAILED")
            assert f.state.name != "NotReady"
            with pytest.raises(ValueError):
                f.result()
        elif expected[0] == "notready":
            assert f.state.name == "NotReady", i
            with pytest.raises(UpstreamTaskError):
                f.result()
        else:
            assert_state(f.state, "CANCELLED")


def test_many_submissions_from_several_threads(runner_factory):
    results = {}
    errors = []

    def submitter(k, r):
        try:
            fs = [r.submit(rt.add, {"x": k * 1000, "y": i}) for i in range(300)]
            chained = r.submit(rt.total, {"xs": fs})
            results[k] = chained.result(timeout=30)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with runner_factory() as r:
        threads = [threading.Thread(target=submitter, args=(k, r)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
    assert errors == []
    assert results == {k: 300 * k * 1000 + sum(range(300)) for k in range(4)}


# ============================== 8. nested submit (in process), async tasks


def test_task_submits_to_its_own_runner_with_one_worker(inprocess_runner_factory):
    r = inprocess_runner_factory(max_workers=1)

    def outer(x):
        inner = r.submit(rt.inc, {"x": x})
        return inner.result(timeout=20) * 10

    with r:
        assert r.submit(outer, {"x": 1}).result(timeout=30) == 20


def test_as_completed_inside_a_task_with_one_worker(inprocess_runner_factory):
    # as_completed() makes room while it waits, as result() and wait() do
    # (issue 13, point 7).
    r = inprocess_runner_factory(max_workers=1)

    def outer(n):
        inner = [r.submit(rt.inc, {"x": i}) for i in range(n)]
        return sorted(f.result() for f in as_completed(inner, timeout=20))

    with running(r):
        assert r.submit(outer, {"n": 5}).result(timeout=30) == [1, 2, 3, 4, 5]


def test_nested_submissions_three_deep_with_one_worker(inprocess_runner_factory):
    r = inprocess_runner_factory(max_workers=1)

    def level(n):
        if n == 0:
            return 0
        return r.submit(level, {"n": n - 1}).result(timeout=30) + 1

    with r:
        assert r.submit(level, {"n": 4}).result(timeout=40) == 4


def test_nested_map_and_dependencies_with_one_worker(inprocess_runner_factory):
    r = inprocess_runner_factory(max_workers=1)

    def outer(n):
        first = r.submit(rt.inc, {"x": 0})
        second = r.submit(rt.inc, {"x": first})
        mapped = r.map(rt.add, {"x": range(n), "y": unmapped(second)})
        return sum(mapped.result(timeout=20))

    with r:
        assert r.submit(outer, {"n": 5}).result(timeout=30) == sum(range(5)) + 5 * 2


def test_many_blocking_parents_do_not_deadlock(inprocess_runner_factory):
    r = inprocess_runner_factory(max_workers=2)

    def outer(x):
        return r.submit(rt.inc, {"x": x}).result(timeout=30)

    with r:
        outers = [r.submit(outer, {"x": i}) for i in range(12)]
        assert [f.result(timeout=40) for f in outers] == [i + 1 for i in range(12)]


def test_async_task(runner_factory):
    with runner_factory() as r:
        assert r.submit(rt.async_inc, {"x": 1}).result(timeout=10) == 2
        assert r.submit(task(rt.async_inc), {"x": 2}).result(timeout=10) == 3
        assert r.submit(rt.async_gather, {"n": 10}).result(timeout=10) == 45


def test_async_tasks_with_upstreams_and_map(runner_factory):
    with runner_factory() as r:
        a = r.submit(rt.async_inc, {"x": 1})
        b = r.submit(rt.async_add, {"x": a, "y": 10})
        assert b.result(timeout=10) == 12
        mapped = r.map(rt.async_inc, {"x": range(30)})
        assert mapped.result(timeout=20) == list(range(1, 31))
        sync_after = r.submit(rt.inc, {"x": b})
        assert sync_after.result(timeout=10) == 13


def test_async_task_failure(runner_factory):
    with runner_factory() as r:
        f = r.submit(rt.async_fail, {"message": "async bad"})
        with pytest.raises(rt.TaskError) as info:
            f.result(timeout=10)
        assert str(info.value) == "async bad"
        assert_state(f.state, "FAILED")
        assert repr(info.value) in f.state.message
        assert_not_ready(r.submit(rt.inc, {"x": f}), f)


# =========================================== 9. dependencies are lineage


def test_dependencies_are_never_waited_on(runner_factory, make_gate):
    with runner_factory() as r, make_gate() as gate:
        blocked = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        f = r.submit(rt.inc, {"x": 1}, dependencies={"x": {blocked}})
        assert f.result(timeout=10) == 2
        assert not blocked.done()


def test_failed_or_cancelled_dependencies_do_not_stop_the_run(runner_factory, make_gate):
    with runner_factory() as r, make_gate() as gate:
        failed = r.submit(rt.fail, {"message": "x"})
        failed.wait(timeout=10)
        blocker = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        cancelled = r.submit(rt.inc, {"x": 1}, wait_for=[blocker])
        assert cancelled.cancel() is True
        f = r.submit(rt.add, {"x": 1, "y": 2},
                     dependencies={"x": {failed}, "y": {cancelled, blocker}})
        assert f.result(timeout=10) == 3
        assert_state(f.state, "COMPLETED")


def test_dependencies_do_not_change_the_parameters(runner_factory):
    with runner_factory() as r:
        up = r.submit(rt.identity, {"x": "upstream"})
        up.result(timeout=10)
        f = r.submit(rt.identity, {"x": "own"}, dependencies={"x": {up}})
        assert f.result(timeout=10) == "own"
        assert r.submit(rt.noop, dependencies={}).result(timeout=10) is None
