"""Logging (issue 10, point 7): through "taskrunner" and its children only.

Failures and crashes are logged at WARNING with the task name, run id and
attempt (as `extra=` fields too); lifecycle at DEBUG; nothing at INFO or
above on success.  Records a task logs in a process worker reach this
process's handlers, tagged with the run they came from.  Many failures of
one task are held to a budget at WARNING, the rest at DEBUG.

Records are read from caplog once the run they are about is final: they
are emitted before the run is marked final (and a worker's records before
its answer), so no wait is needed.
"""

import logging
import os
import types
import uuid

import pytest

from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner, task
from taskrunner import _logging as logs

import runner_tasks as rt
from harness import running

pytestmark = pytest.mark.timeout(120)

KINDS = ["threadpool", "processpool", "dask"]


def bad_ends(caplog):
    """The WARNINGs about runs that ended badly."""
    return [r for r in caplog.records
            if r.name == "taskrunner.runs" and r.levelno >= logging.WARNING]


def ours(caplog):
    return [r for r in caplog.records if r.name == "taskrunner" or r.name.startswith("taskrunner.")]


# -- failures and crashes -------------------------------------------------------------


def test_a_failed_run_logs_one_warning_naming_its_task_run_and_attempt(runner_factory, caplog):
    with running(runner_factory()) as r:
        fut = r.submit(rt.fail, {"message": "logged failure"})
        fut.wait(timeout=60)
        assert fut.state.is_failed()
        assert r.submit(rt.inc, {"x": 1}).result(timeout=60) == 2
        (record,) = bad_ends(caplog)
    assert record.levelno == logging.WARNING
    assert (record.task_name, record.run_id, record.attempt) == ("fail", fut.task_run_id, 1)
    message = record.getMessage()
    for part in ("'fail'", str(fut.task_run_id), "attempt 1", "ValueError: logged failure"):
        assert part in message, message
    assert record.exc_info is None      # one line: the traceback is the future's
    assert len(bad_ends(caplog)) == 1       # the exit added none


@pytest.mark.parametrize("kind", ["threadpool", "processpool"])
def test_a_run_that_fails_after_retries_is_warned_of_with_its_last_attempt(
        kind, runner_specs, caplog):
    flaky = task(rt.fail, retries=2)
    with running(runner_specs[kind]()) as r:
        fut = r.submit(flaky, {"message": "every time"})
        items = r.map(task(rt.fail_if, retries=1), {"x": range(3), "bad": 1})
        assert isinstance(fut.exception(timeout=60), ValueError)
        items.result(timeout=60, raise_on_failure=False)
        ends = {rec.run_id: rec for rec in bad_ends(caplog) if "failed on attempt" in rec.getMessage()
                and "retrying" not in rec.getMessage()}
        item_id = items[1].task_run_id
    assert ends[fut.task_run_id].attempt == 3
    assert "failed on attempt 3" in ends[fut.task_run_id].getMessage()
    assert ends[item_id].attempt == 2 and ends[item_id].task_name == "fail_if"


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_mapped_item_is_named_by_the_id_its_future_shows(kind, runner_specs, caplog):
    with running(runner_specs[kind]()) as r:
        items = r.map(rt.fail_if, {"x": range(10), "bad": 3})
        values = items.result(timeout=60, raise_on_failure=False)   # no future made yet
        assert isinstance(values[3], ValueError)
        (record,) = bad_ends(caplog)
        assert record.task_name == "fail_if" and record.attempt == 1
        ids = [f.task_run_id for f in items]
    assert record.run_id == ids[3]
    assert str(ids[3]) in record.getMessage()
    assert len(set(ids)) == 10 and all(i.version == 4 for i in ids)


def test_a_failed_mapped_item_of_a_traced_runner_is_named_by_its_traces_id(caplog, tmp_path):
    # The run trace gives an item's future its id from the item's trace key.
    with running(ThreadPoolTaskRunner(max_workers=2, trace=str(tmp_path / "trace.json"))) as r:
        items = r.map(rt.fail_if, {"x": range(6), "bad": 4})
        items.result(timeout=60, raise_on_failure=False)
        (record,) = bad_ends(caplog)
        ids = [f.task_run_id for f in items]
    assert record.run_id == ids[4] and len(set(ids)) == 6


def test_a_never_ran_run_is_not_a_warning_and_is_logged_at_debug(caplog, make_gate):
    caplog.set_level(logging.DEBUG, logger="taskrunner")
    gate = make_gate()
    with running(ThreadPoolTaskRunner(max_workers=2)) as r:
        failed = r.submit(rt.fail, {})
        downstream = r.submit(rt.inc, {"x": failed})
        downstream.wait(timeout=60)
        held = r.submit(rt.gated, {"value": 1, "gate": gate.path})
        cancelled = r.submit(rt.inc, {"x": held})
        assert cancelled.cancel()
        gate.open()
    assert downstream.state.name == "NotReady"
    (warning,) = bad_ends(caplog)
    assert warning.run_id == failed.task_run_id
    never = {r.run_id: r.getMessage() for r in caplog.records
             if r.name == "taskrunner.runs" and r.levelno == logging.DEBUG}
    assert f"upstream task run 'fail' ({failed.task_run_id}) did not complete" in \
        never[downstream.task_run_id]
    assert "cancelled" in never[cancelled.task_run_id]


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_a_crash_logs_a_warning_and_the_workers_death_at_debug(how, caplog):
    caplog.set_level(logging.DEBUG, logger="taskrunner")
    with running(ProcessPoolTaskRunner(max_workers=2)) as r:
        fut = r.submit(rt.die, {"how": how})
        fut.wait(timeout=60)
        assert fut.state.is_crashed()
        assert r.submit(rt.inc, {"x": 1}).result(timeout=60) == 2
        (record,) = bad_ends(caplog)
    assert (record.task_name, record.run_id, record.attempt) == ("die", fut.task_run_id, 1)
    assert "crashed on attempt 1" in record.getMessage()
    assert "CrashedRun" in record.getMessage()
    workers = [r.getMessage() for r in caplog.records if r.name == "taskrunner.worker"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "taskrunner.worker")
    ending = "exited with code 3" if how == "exit" else "killed by signal 9"
    assert any(ending in m and "while running a task" in m for m in workers), workers
    assert any("replaced by pid" in m for m in workers), workers


def test_a_handler_that_raises_loses_the_record_not_the_run(caplog, monkeypatch):
    unraisable = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)

    def refuse(record):
        raise RuntimeError("a broken filter")

    runs_logger = logging.getLogger("taskrunner.runs")
    runs_logger.addFilter(refuse)
    try:
        with running(ThreadPoolTaskRunner(max_workers=2)) as r:
            items = r.map(rt.fail_if, {"x": range(4), "bad": 2})
            assert isinstance(items.result(timeout=60, raise_on_failure=False)[2], ValueError)
            fut = r.submit(rt.fail, {})
            assert isinstance(fut.exception(timeout=60), ValueError)
    finally:
        runs_logger.removeFilter(refuse)
    assert unraisable == []


def test_filters_that_raise_lose_their_records_not_the_runners_steps(caplog):
    # Entering, a worker's death and its replacement, the exit: each logs
    # at DEBUG, and a filter that raises must not stop it midway.
    caplog.set_level(logging.DEBUG, logger="taskrunner")

    def refuse(record):
        raise RuntimeError("a broken filter")

    loggers = [logging.getLogger(f"taskrunner.{name}") for name in ("runner", "worker", "runs")]
    for logger in loggers:
        logger.addFilter(refuse)
    try:
        with running(ProcessPoolTaskRunner(max_workers=1), exit_timeout=30) as r:
            fut = r.submit(rt.die, {"how": "exit"})
            fut.wait(timeout=60)
            assert fut.state.is_crashed()
            assert r.submit(rt.inc, {"x": 1}).result(timeout=60) == 2
    finally:
        for logger in loggers:
            logger.removeFilter(refuse)


# -- nothing at INFO on success; lifecycle at DEBUG -----------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_success_logs_nothing_at_info_or_above_and_the_lifecycle_at_debug(
        kind, runner_specs, caplog):
    caplog.set_level(logging.DEBUG, logger="taskrunner")
    with running(runner_specs[kind]()) as r:
        one = r.submit(rt.inc, {"x": 1})
        many = r.map(rt.add, {"x": range(100), "y": one})
        assert many.result(timeout=60) == [x + 2 for x in range(100)]
    records = ours(caplog)
    assert [r for r in records if r.levelno >= logging.INFO] == []
    said = [(r.name, r.getMessage()) for r in records]
    assert any(n == "taskrunner.runner" and "runner entered" in m for n, m in said), said
    assert any(n == "taskrunner.runner" and "runner exited" in m for n, m in said), said
    if kind == "processpool":
        assert any(n == "taskrunner.worker" and "started (pid" in m for n, m in said), said
        assert any(n == "taskrunner.worker" and "ready (pid" in m for n, m in said), said
    if kind == "dask":
        assert any(n == "taskrunner.dask" and "client connected" in m for n, m in said), said
        assert any(n == "taskrunner.dask" and "client closed" in m for n, m in said), said


# -- many failures --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["threadpool", "processpool"])
def test_many_failures_of_a_task_are_warned_of_within_a_budget_and_each_is_logged(
        kind, runner_specs, caplog, monkeypatch):
    monkeypatch.setattr(logs, "WINDOW", 1e9)        # no window turns during the test
    caplog.set_level(logging.DEBUG, logger="taskrunner")
    n = 3 * logs.WARN_LIMIT
    with running(runner_specs[kind]()) as r:
        items = r.map(rt.fail_if_multiple, {"x": range(n), "of": 1})
        assert all(isinstance(v, ValueError)
                   for v in items.result(timeout=60, raise_on_failure=False))
        ids = {f.task_run_id for f in items}
        failures = [rec for rec in caplog.records
                    if rec.name == "taskrunner.runs" and "failed on attempt" in rec.getMessage()]
        assert len(bad_ends(caplog)) == logs.WARN_LIMIT
    # every failure is there, at WARNING or at DEBUG, with its run id
    assert len(failures) == n and {rec.run_id for rec in failures} == ids
    assert sorted(rec.levelno for rec in failures) == \
        [logging.DEBUG] * (n - logs.WARN_LIMIT) + [logging.WARNING] * logs.WARN_LIMIT
    # the exit counts those that went to DEBUG, once, at WARNING
    summaries = [rec for rec in bad_ends(caplog) if "more runs failed" in rec.getMessage()]
    assert len(summaries) == 1
    assert f"{n - logs.WARN_LIMIT} more runs" in summaries[0].getMessage()
    assert summaries[0].task_name == "fail_if_multiple"


def test_the_warning_budget_is_per_task_and_window_and_counts_what_it_held_back(
        caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(logs, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    caplog.set_level(logging.DEBUG, logger="taskrunner")
    scope, limit = object(), logs.WARN_LIMIT

    def levels():
        records = [r for r in caplog.records if r.name == "taskrunner.runs"]
        caplog.clear()
        return records, [r.levelno for r in records]

    for i in range(limit + 3):
        logs.run_failed("t", f"id-{i}", 1, ValueError(i), scope)
    records, seen = levels()
    assert seen == [logging.WARNING] * limit + [logging.DEBUG] * 3
    assert [r.run_id for r in records] == [f"id-{i}" for i in range(limit + 3)]
    assert "go to DEBUG" in records[limit - 1].getMessage()
    # another task, or another runner, has a budget of its own
    logs.run_crashed("u", "id-u", 1, RuntimeError("gone"), scope)
    logs.run_failed("t", "id-other-runner", 1, ValueError(), object())
    assert levels()[1] == [logging.WARNING, logging.WARNING]
    # the window turns: the next warning says how many went to DEBUG since the last
    clock[0] += logs.WINDOW
    logs.run_retrying("t", "id-next", 2, ValueError(), 0.5, scope)
    records, seen = levels()
    assert seen == [logging.WARNING]
    assert "3 more bad ends" in records[0].getMessage()
    assert "retrying in 0.5 s" in records[0].getMessage() and records[0].attempt == 2
    for i in range(limit + 1):
        logs.run_timed_out("t", f"late-{i}", 1, 2.5, scope)
    assert levels()[1] == [logging.WARNING] * (limit - 1) + [logging.DEBUG] * 2
    # the exit counts what went to DEBUG since the last warning, and forgets the scope
    logs.runner_exited(types.SimpleNamespace(name="test"), scope, None)
    records, seen = levels()
    assert [r.getMessage() for r in records if r.levelno == logging.WARNING] == [
        "task 't': 2 more runs failed, crashed, timed out or retried after the last one "
        "logged at WARNING; each was logged at DEBUG on 'taskrunner.runs'"]
    logs.run_failed("t", "again", 1, ValueError(), scope)
    assert levels()[1] == [logging.WARNING]


# -- records from worker processes -------------------------------------------------------


def test_a_task_logging_in_a_worker_process_reaches_the_parents_handlers(caplog):
    caplog.set_level(logging.INFO)
    with running(ProcessPoolTaskRunner(max_workers=2)) as r:
        fut = r.submit(rt.log_then, {"x": 7, "name": "user.task", "level": logging.INFO,
                                     "message": "hello %s"})
        assert fut.result(timeout=60) == 7
        # here already: a worker sends a record before its run's result
        (record,) = [rec for rec in caplog.records if rec.name == "user.task"]
    assert record.getMessage() == "hello 7" and record.levelno == logging.INFO
    assert (record.run_id, record.task_name, record.attempt) == (fut.task_run_id, "log_then", 1)
    assert record.process != os.getpid()


def test_records_logged_by_mapped_items_in_worker_processes_name_each_items_run(caplog):
    caplog.set_level(logging.INFO)
    n = 50
    with running(ProcessPoolTaskRunner(max_workers=2)) as r:
        items = r.map(rt.log_then, {"x": range(n), "name": "user.items",
                                    "level": logging.INFO, "message": "item %s"})
        assert items.result(timeout=60) == list(range(n))   # no future made yet
        records = {rec.getMessage(): rec for rec in caplog.records if rec.name == "user.items"}
        ids = [f.task_run_id for f in items]
    assert sorted(records) == sorted(f"item {i}" for i in range(n))
    assert [records[f"item {i}"].run_id for i in range(n)] == ids
    assert len(set(ids)) == n
    assert {rec.task_name for rec in records.values()} == {"log_then"}


def test_a_worker_ships_what_the_parents_levels_let_through(caplog):
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.DEBUG, logger="user.chatty")
    with running(ProcessPoolTaskRunner(max_workers=1)) as r:
        for x, name, level in [(1, "user.chatty", logging.DEBUG), (2, "user.quiet", logging.INFO),
                               (3, "user.quiet", logging.WARNING)]:
            r.submit(rt.log_then, {"x": x, "name": name, "level": level,
                                   "message": "record %s"}).result(timeout=60)
    assert [rec.getMessage() for rec in caplog.records if rec.name.startswith("user.")] == \
        ["record 1", "record 3"]


def test_a_record_that_does_not_pickle_as_it_is_still_arrives(caplog):
    caplog.set_level(logging.INFO)
    with running(ProcessPoolTaskRunner(max_workers=1)) as r:
        fut = r.submit(rt.log_awkward, {"x": 5, "name": "user.awkward"})
        assert fut.result(timeout=60) == 5
    warning, error = [rec for rec in caplog.records if rec.name == "user.awkward"]
    assert warning.getMessage().startswith("item 5 holds <unlocked _thread.lock")
    assert isinstance(warning.thing, str) and "lock" in warning.thing
    assert error.levelno == logging.ERROR and error.getMessage() == "caught item 5"
    assert error.exc_info is None and "Traceback" in error.exc_text
    assert "KeyError: 5" in error.exc_text
    assert warning.run_id == error.run_id == fut.task_run_id
    assert "KeyError: 5" in caplog.text


def test_a_forked_worker_hands_its_records_to_the_parents_handlers_once(tmp_path):
    path = tmp_path / "records.log"
    logger = logging.getLogger("user.forked")
    handler = logging.FileHandler(path)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with running(ProcessPoolTaskRunner(max_workers=1, mp_context="fork")) as r:
            r.submit(rt.log_then, {"x": 1, "name": "user.forked", "level": logging.INFO,
                                   "message": "forked %s"}).result(timeout=60)
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(logging.NOTSET)
    # the handler the worker inherited wrote nothing: the parent's wrote it
    assert path.read_text().splitlines() == ["forked 1"]


def test_a_record_from_no_run_arrives_without_a_run_id(caplog):
    caplog.set_level(logging.INFO)
    with running(ProcessPoolTaskRunner(max_workers=1, initializer=rt.log_then,
                                       initargs=(0, "user.init", logging.INFO, "init %s"))) as r:
        assert r.submit(rt.inc, {"x": 1}).result(timeout=60) == 2
    (record,) = [rec for rec in caplog.records if rec.name == "user.init"]
    assert record.getMessage() == "init 0" and not hasattr(record, "run_id")


def test_item_run_ids_are_version_4_uuids_unique_across_maps():
    with running(ThreadPoolTaskRunner(max_workers=2)) as r:
        lists = [r.map(rt.fail_if, {"x": range(5), "bad": 1}) for _ in range(3)]
        for items in lists:
            items.result(timeout=60, raise_on_failure=False)   # ids made for item 1
        ids = [f.task_run_id for items in lists for f in items]
    assert len(set(ids)) == 15
    assert all(isinstance(i, uuid.UUID) and i.version == 4 for i in ids)
