"""Fault injection (issue 14, point 2): workers killed for real while
they work.

Process runner (rules: taskrunner/processes.py): a dead worker's run in
progress ends CRASHED, the runs queued behind it run again elsewhere, and
the pool replaces it.  Dask runner: the cluster runs again what a dead
worker held (the test cluster allows one death per task).
"""

import multiprocessing
import os
import random
import signal
import threading
import time

import pytest

from taskrunner import DaskTaskRunner, ProcessPoolTaskRunner
from taskrunner.exceptions import CrashedRun

import runner_tasks as rt


def live_workers():
    """Pids of this process's live multiprocessing children (the pool)."""
    return {p.pid for p in multiprocessing.active_children() if p.is_alive()}


def rchar_of(io):
    with open(io) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.mark.timeout(300)
def test_five_workers_killed_during_a_100_000_item_map_lose_no_other_run(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    n, kills, workers = 100_000, 5, 2
    killed, kill_times, errors = [], [], []

    def serving():
        return {p for p in live_workers() if (tmp_path / str(p)).exists()}

    def killer(futures_done):
        try:
            for _ in range(kills):
                # A random moment once the pool is whole again, serving runs:
                # each worker marks its pid as it runs its first run.  (One
                # killed while it starts is another matter: see
                # test_workers_killed_while_starting_do_not_break_the_pool.)
                assert rt.wait_until(lambda: len(serving()) == workers, timeout=60), \
                    "the pool did not get back to its size"
                time.sleep(rng.uniform(0.05, 0.6))
                if futures_done.is_set():
                    return
                victim = rng.choice(sorted(serving()))
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
                kill_times.append(time.monotonic())
        except BaseException as error:      # reported by the test thread
            errors.append(error)

    with ProcessPoolTaskRunner(max_workers=workers) as runner:
        # both workers up before the map, so the kills meet a full pool
        assert runner.map(rt.getpid_of, {"x": range(50)}).result(timeout=60)
        assert rt.wait_until(lambda: len(live_workers()) == workers, timeout=60)
        futures = runner.map(rt.square_marking_pid, {"x": range(n), "marks": str(tmp_path),
                                                     "seconds": 0.0002})
        done = threading.Event()
        thread = threading.Thread(target=killer, args=(done,), daemon=True)
        thread.start()
        started_at = time.monotonic()
        futures.wait(timeout=240)
        done.set()
        finished_at = time.monotonic()
        print(f"map of {n} took {finished_at - started_at:.1f} s")
        thread.join(60)
        assert not errors, errors
        assert len(killed) == kills and max(kill_times) < finished_at, (seed, killed)
        values = futures.result(timeout=0, raise_on_failure=False)
        crashed = {i for i, v in enumerate(values) if isinstance(v, CrashedRun)}
        wrong = [i for i, v in enumerate(values) if i not in crashed and v != i * i]
        assert wrong == [], (seed, wrong[:10])
        # at most the run each killed worker had in progress
        assert len(crashed) <= kills, (seed, len(crashed), sorted(crashed)[:20])
        for i in crashed:
            assert futures[i].state.is_crashed(), (seed, i, futures[i].state)
        # the pool is whole, and runs
        assert rt.wait_until(lambda: len(live_workers()) == workers, timeout=60)
        assert runner.map(rt.square, {"x": range(100)}).result(timeout=60) == [
            i * i for i in range(100)]
    print(f"seed {seed}: killed {killed}; crashed {len(crashed)} of {n}")


@pytest.mark.timeout(180)
def test_a_worker_killed_while_it_sends_a_large_result_ends_only_its_own_runs(make_path):
    pidfile = make_path("pid")
    size = 64 << 20
    with ProcessPoolTaskRunner(max_workers=2) as runner:
        big = runner.submit(rt.big_result_after_pid, {"pidfile": pidfile, "size": size})
        rt.wait_path(pidfile, 60)
        pid = int(open(pidfile).read().split()[0])
        # runs on the other worker (and queued behind the big one) meanwhile
        others = runner.map(rt.stamped, {"i": range(3000), "size": unmapped_size()})
        # Kill it once 8 MB of the result have come up the pipe, far from
        # its end: the receiving thread's own read count says (the worker's
        # write count moves only when its one write of the message returns).
        receiver = next(t for t in threading.enumerate() if t.name == "taskrunner-receiver")
        io = f"/proc/self/task/{receiver.native_id}/io"
        start = read_count = rchar_of(io)
        deadline = time.monotonic() + 60
        while read_count < start + (8 << 20):
            assert time.monotonic() < deadline, "the result never started to come"
            time.sleep(0.0005)
            read_count = rchar_of(io)
        os.kill(pid, signal.SIGKILL)
        # cut off well before its end (the other results are 3 MB in all)
        assert read_count - start < size // 2, "the result was (nearly) whole before the kill"
        # The run had finished: the worker died sending its answer, so by
        # the process runner's rules it runs again (CRASHED is for the run
        # a worker dies in), elsewhere, and its result arrives whole.
        assert big.result(timeout=120) == b"x" * size
        assert int(open(pidfile).read().split()[0]) != pid, "it did not run again"
        values = others.result(timeout=120)
        assert all(v == rt.stamped(i, 1000) for i, v in enumerate(values)), "a result came torn"
        # the stream stays in step: later runs on a replacement worker too
        assert rt.wait_until(lambda: len(live_workers()) == 2, timeout=60)
        assert runner.map(rt.stamped, {"i": range(200), "size": unmapped_size()}).result(
            timeout=60) == [rt.stamped(i, 1000) for i in range(200)]
    print(f"killed with {read_count - start} of {size} bytes read")


def unmapped_size():
    from taskrunner import unmapped

    return unmapped(1000)


@pytest.mark.timeout(600)
def test_a_dask_worker_killed_during_a_dag_of_10_000_nodes_loses_no_node(dask_clusters, make_path):
    cluster = dask_clusters.get()
    log = make_path("log")
    width, depth = 100, 100                # 10,000 nodes, each on 2 of the layer before
    expected = {}
    try:
        with DaskTaskRunner(address=cluster.address) as runner:
            victims = sorted(set(cluster.worker_pids(runner.client).values()))
            layers = []
            for d in range(depth):
                layer = []
                for w in range(width):
                    i = d * width + w
                    ups = [] if d == 0 else [layers[-1][w], layers[-1][(w + 1) % width]]
                    expected[i] = i + sum(expected[u_i] for u_i in
                                          ([] if d == 0 else [(d - 1) * width + w,
                                                              (d - 1) * width + (w + 1) % width]))
                    layer.append(runner.submit(rt.logged_node, {"i": i, "xs": ups, "log": log}))
                layers.append(layer)
            assert rt.wait_until(lambda: len(rt.read_lines(log)) >= 2000, timeout=120)
            os.kill(random.choice(victims), signal.SIGKILL)
            at_kill = len(rt.read_lines(log))
            assert at_kill < width * depth, "the DAG had ended before the kill"
            futures = [f for layer in layers for f in layer]
            for i, f in enumerate(futures):
                assert f.result(timeout=120) == expected[i], i
            assert all(f.state.is_completed() for f in futures)
        print(f"killed a worker at {at_kill} of {width * depth} nodes; "
              f"{len(rt.read_lines(log))} node calls in all")
    finally:
        cluster.wait_for_workers()
