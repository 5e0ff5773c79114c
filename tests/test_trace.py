"""The run trace (`trace=` on every runner): the Chrome trace-event file
written at exit, its slices, tracks, flows and waits."""

import json
import logging
import os
import shutil
import time

import pytest

from taskrunner import DaskTaskRunner, ProcessPoolTaskRunner, ThreadPoolTaskRunner, task, unmapped

from harness import running
from runner_tasks import fail, fail_until, inc, meet, noop, total

pytestmark = pytest.mark.timeout(180)


def _threads(path, workers=2):
    return ThreadPoolTaskRunner(max_workers=workers, trace=path)


def _processes(path, workers=2):
    return ProcessPoolTaskRunner(max_workers=workers, trace=path)


def _dask(path, workers=2):
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None},
                          trace=path)


MAKERS = {"threadpool": _threads, "processpool": _processes, "dask": _dask}


@pytest.fixture(params=sorted(MAKERS))
def make(request):
    """(path, workers=2) -> a new runner of each kind that traces to path."""
    return MAKERS[request.param]


def _events(path):
    with open(path) as f:
        trace = json.load(f)
    return trace["traceEvents"]


def _slices(events):
    return [e for e in events if e["ph"] == "X" and e.get("cat") != "wait"]


def _track_names(events):
    """(pid, tid) -> (process name, thread name)."""
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e["ph"] == "M" and e["name"] == "process_name"}
    return {(e["pid"], e["tid"]): (processes[e["pid"]], e["args"]["name"]) for e in events
            if e["ph"] == "M" and e["name"] == "thread_name"}


def _slice_of(events, future):
    [found] = [e for e in _slices(events) if e["args"]["run_id"] == str(future.task_run_id)]
    return found


def test_one_slice_per_run_with_its_args(make, tmp_path):
    path = tmp_path / "run.json"
    with running(make(path)) as runner:
        one = runner.submit(inc, {"x": 1})
        items = runner.map(inc, {"x": range(20)})
        bad = runner.submit(fail, {"message": "no"})
        assert one.result() == 2 and items.result() == list(range(1, 21))
        bad.wait()
    events = _events(path)
    slices = _slices(events)
    assert len(slices) == 22
    tracks = _track_names(events)
    for event in slices:
        assert event["name"] == event["args"]["task"]
        assert event["dur"] >= 0 and event["ts"] >= 0
        assert event["args"]["attempt"] == 1
        assert (event["pid"], event["tid"]) in tracks
    assert _slice_of(events, one)["args"] == {
        "task": "inc", "run_id": str(one.task_run_id), "state": "Completed", "attempt": 1}
    # The items' futures, made after their runs, show the ids the trace gave them.
    assert {str(f.task_run_id) for f in items} == {
        e["args"]["run_id"] for e in slices if e["name"] == "inc"} - {str(one.task_run_id)}
    assert _slice_of(events, bad)["args"]["state"] == "Failed"
    assert len({e["args"]["run_id"] for e in slices}) == 22


def test_a_track_per_worker(make, tmp_path):
    path = tmp_path / "run.json"
    folder = tmp_path / "met"
    folder.mkdir()
    with running(make(path, 2)) as runner:
        assert runner.map(meet, {"x": range(2), "folder": unmapped(str(folder)),
                                 "count": unmapped(2)}).result() == [0, 1]
    events = _events(path)
    used = {(e["pid"], e["tid"]) for e in _slices(events)}
    assert len(used) == 2
    names = _track_names(events)
    if isinstance(runner, ThreadPoolTaskRunner):
        assert {names[track][0] for track in used} == {f"threads (pid {os.getpid()})"}
    else:
        # Two worker processes: two process rows, each naming its worker's pid.
        assert len({track[0] for track in used}) == 2
        pids = {name.split("(pid ")[1].rstrip(")") for name, _ in (names[t] for t in used)}
        assert len(pids) == 2 and str(os.getpid()) not in pids


def test_flow_arrows_along_dependencies(make, tmp_path):
    path = tmp_path / "run.json"
    with running(make(path)) as runner:
        first = runner.submit(inc, {"x": 1})
        second = runner.submit(inc, {"x": first})                   # a parameter
        after = runner.submit(noop, wait_for=[second])              # wait_for
        items = runner.map(inc, {"x": range(3)})
        summed = runner.submit(total, {"xs": items})                # a FutureList
        assert after.result() is None and summed.result() == 6
    events = _events(path)
    flows = {}
    for e in events:
        if e["ph"] in ("s", "f") and e["cat"] == "dependency":
            flows.setdefault(e["id"], {})[e["ph"]] = e
    edges = set()
    by_track = {}
    for e in _slices(events):
        by_track.setdefault((e["pid"], e["tid"]), []).append(e)
    for flow in flows.values():
        assert flow["f"]["bp"] == "e"
        ends = []
        for end in (flow["s"], flow["f"]):
            # Each end lies inside one slice of its track: the one it binds to.
            [bound] = [e for e in by_track[(end["pid"], end["tid"])]
                       if e["ts"] <= end["ts"] <= e["ts"] + e["dur"]]
            ends.append(bound["args"]["run_id"])
        edges.add(tuple(ends))
    ids = {name: str(f.task_run_id) for name, f in
           [("first", first), ("second", second), ("after", after), ("summed", summed)]}
    expected = {(ids["first"], ids["second"]), (ids["second"], ids["after"])}
    expected |= {(str(item.task_run_id), ids["summed"]) for item in items}
    assert edges == expected


def test_a_retried_run_has_a_slice_per_attempt_and_waits_between(make, tmp_path):
    flaky = task(fail_until, retries=2, retry_delay_seconds=0.05)
    path = tmp_path / "run.json"
    with running(make(path)) as runner:
        future = runner.submit(flaky, {"path": str(tmp_path / "attempts"), "succeed_on": 3,
                                       "value": 7})
        assert future.result() == 7
    events = _events(path)
    attempts = sorted((e for e in _slices(events)), key=lambda e: e["ts"])
    assert [(e["args"]["attempt"], e["args"]["state"]) for e in attempts] == [
        (1, "Failed"), (2, "Failed"), (3, "Completed")]
    assert {e["args"]["run_id"] for e in attempts} == {str(future.task_run_id)}
    waits = sorted((e for e in events if e.get("cat") == "wait"), key=lambda e: e["ts"])
    assert [w["name"] for w in waits] == ["retry wait"] * 2
    for wait, before, after in zip(waits, attempts, attempts[1:]):
        assert wait["ts"] == pytest.approx(before["ts"] + before["dur"], abs=0.002)
        assert wait["ts"] + wait["dur"] == pytest.approx(after["ts"], abs=0.002)
        assert wait["dur"] >= 45_000        # the retry delay, 50 ms (in microseconds)
    assert sorted(e["cat"] for e in events if e["ph"] == "s") == ["retry", "retry"]


def test_written_on_an_exit_by_exception(make, tmp_path):
    path = tmp_path / "run.json"
    with pytest.raises(KeyError):
        with make(path) as runner:
            done = runner.submit(inc, {"x": 1})
            assert done.result() == 2
            raise KeyError("out")
    assert [e["args"]["run_id"] for e in _slices(_events(path))] == [str(done.task_run_id)]


def test_off_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with ThreadPoolTaskRunner(max_workers=2) as runner:
        assert runner.submit(inc, {"x": 1}).result() == 2
        assert runner._engine.trace is None
    assert os.listdir(tmp_path) == []


def test_process_workers_send_no_times_untraced():
    with ProcessPoolTaskRunner(max_workers=1) as runner:
        assert runner.submit(inc, {"x": 1}).result() == 2
        assert runner._active.trace is None
        assert not runner._active.workers.traced


@pytest.mark.parametrize("bad", [123, b"run.json", ["run.json"]])
def test_trace_that_is_no_path_is_a_type_error(bad):
    for make in (lambda: ThreadPoolTaskRunner(trace=bad),
                 lambda: ProcessPoolTaskRunner(trace=bad),
                 lambda: DaskTaskRunner(trace=bad)):
        with pytest.raises(TypeError, match="trace"):
            make()


def test_trace_in_no_directory_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="trace"):
        ThreadPoolTaskRunner(trace="")
    with pytest.raises(ValueError, match="trace"):
        ProcessPoolTaskRunner(trace=tmp_path / "missing" / "run.json")


def test_duplicate_carries_the_path(tmp_path):
    path = tmp_path / "run.json"
    for runner in (ThreadPoolTaskRunner(trace=path), ProcessPoolTaskRunner(trace=str(path)),
                   DaskTaskRunner(trace=path)):
        twin = runner.duplicate()
        assert twin._trace_path == str(path) == runner._trace_path
    assert DaskTaskRunner(trace=path) != DaskTaskRunner()


def test_each_exit_replaces_the_file_whole(tmp_path):
    path = tmp_path / "run.json"
    runner = ThreadPoolTaskRunner(max_workers=1, trace=path)
    with runner:
        runner.map(inc, {"x": range(5)}).result()
    with runner:
        last = runner.submit(inc, {"x": 1})
        last.result()
    assert [e["args"]["run_id"] for e in _slices(_events(path))] == [str(last.task_run_id)]
    assert os.listdir(tmp_path) == ["run.json"]          # no temporary file left


def test_an_id_read_before_the_run_is_the_one_in_the_file(tmp_path):
    path = tmp_path / "run.json"
    gate = tmp_path / "gate"
    from runner_tasks import gated
    with ThreadPoolTaskRunner(max_workers=1, trace=path) as runner:
        waiting = runner.submit(gated, {"value": 1, "gate": str(gate)})
        known = waiting.task_run_id
        after = runner.submit(inc, {"x": waiting})
        gate.touch()
        assert after.result() == 2
    events = _events(path)
    assert _slice_of(events, waiting)["args"]["run_id"] == str(known)
    flows = [e for e in events if e["ph"] == "s"]
    assert len(flows) == 1


def test_a_failed_write_raises_at_a_normal_exit_and_is_logged_at_an_exit_by_exception(
        tmp_path, caplog):
    folder = tmp_path / "gone"
    folder.mkdir()
    with pytest.raises(FileNotFoundError):
        with ThreadPoolTaskRunner(max_workers=1, trace=folder / "run.json") as runner:
            runner.submit(inc, {"x": 1}).result()
            shutil.rmtree(folder)
    folder.mkdir()
    with caplog.at_level(logging.ERROR, logger="taskrunner"):
        with pytest.raises(KeyError):
            with ThreadPoolTaskRunner(max_workers=1, trace=folder / "run.json") as runner:
                runner.submit(inc, {"x": 1}).result()
                shutil.rmtree(folder)
                raise KeyError("the exit's own error goes on")
    assert "could not write the run trace" in caplog.text


def _recorded(tmp_path, task, **params):
    """A traced thread runner's trace, kept open after its one run, and
    that run's future."""
    path = tmp_path / "run.json"
    runner = ThreadPoolTaskRunner(max_workers=1, trace=path)
    runner.__enter__()
    future = runner.submit(task, params)
    future.wait()
    return runner, runner._trace, future, path


def test_limit_wait_is_a_slice_in_the_waits_rows(tmp_path):
    runner, trace, future, path = _recorded(tmp_path, inc, x=1)
    now = time.monotonic()
    other = runner.submit(inc, {"x": 2})
    other.wait()
    trace.limit_wait(future, now, now + 0.01, "database")
    trace.limit_wait(other, now + 0.005, now + 0.02, "database")      # overlaps: a second lane
    runner.__exit__(None, None, None)
    events = _events(path)
    waits = sorted((e for e in events if e.get("cat") == "wait"), key=lambda e: e["ts"])
    assert [w["name"] for w in waits] == ["waiting for limit database"] * 2
    assert [w["args"]["run_id"] for w in waits] == [str(future.task_run_id),
                                                     str(other.task_run_id)]
    assert waits[0]["dur"] == pytest.approx(10_000, abs=2)
    names = _track_names(events)
    assert [names[(w["pid"], w["tid"])] for w in waits] == [("waits", "waits 1"),
                                                             ("waits", "waits 2")]


def test_records_after_the_write_are_dropped(tmp_path):
    runner, trace, future, path = _recorded(tmp_path, inc, x=1)
    runner.__exit__(None, None, None)
    trace.limit_wait(future, 0.0, 1.0, "late")
    assert trace.slices == 0
    # The future's id stays what the file says.
    assert _slice_of(_events(path), future)["args"]["run_id"] == str(future.task_run_id)


def test_every_run_and_edge_of_a_large_graph_is_recorded(tmp_path):
    # More slices and edges than the recorder's first arrays hold.
    path = tmp_path / "run.json"
    with ThreadPoolTaskRunner(max_workers=4, trace=path) as runner:
        firsts = runner.map(inc, {"x": range(3000)})
        seconds = runner.map(inc, {"x": firsts})
        assert seconds.result()[-1] == 3001
    events = _events(path)
    slices = _slices(events)
    assert len(slices) == 6000
    assert {e["args"]["run_id"] for e in slices} == {
        str(f.task_run_id) for f in list(firsts) + list(seconds)}
    assert sum(e["ph"] == "s" for e in events) == sum(e["ph"] == "f" for e in events) == 3000


@pytest.mark.parametrize("cls", [ThreadPoolTaskRunner, ProcessPoolTaskRunner])
def test_a_wait_for_a_limit_is_a_slice_in_the_waits_rows(cls, tmp_path):
    import runner_tasks as rt

    path = tmp_path / "run.json"
    noted = str(tmp_path / "noted")
    db_task = task(rt.note_running, tags=["db"])
    with running(cls(max_workers=2, limits={"db": 1}, trace=str(path))) as runner:
        futures = runner.map(db_task, {"path": noted, "x": range(4), "seconds": 0.05})
        futures.result(timeout=60)
    events = _events(path)
    waits = [e for e in events if e.get("ph") == "X" and e["name"] == "waiting for limit db"]
    # One slot for two workers: the runs after the first waited their turn.
    assert len(waits) >= 2
    assert all(w["dur"] > 0 for w in waits)
