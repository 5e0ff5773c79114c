"""What a progress bar costs a large map: map(inc, 1,000,000 items) then
FutureList.result() on the thread runner, without a bar, with
progress=True on a stderr that is no terminal (nothing drawn), and with
progress="always" (a bar drawn ten times a second, here to /dev/null; tqdm
if installed, else the plain line: --plain forces it).  The three are
interleaved ROUNDS times in one runner; the medians are printed, and each
with a bar against the one without.

Each is timed as wall and CPU time of map() then result() while the runs
go on, and as result() of a map already finished ("done").

With --baseline DIR (a checkout of another commit, built in place), the run
without a bar is also measured there and here, in fresh interpreters
alternated ROUNDS times: whether result() without a bar changed.

    python benchmarks/progress_overhead.py [ITEMS] [ROUNDS] [--plain] [--baseline DIR]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inc(x):
    return x + 1


def one_run(runner, items, progress):
    """(wall, cpu, finished) seconds: map() then result(), wall and cpu
    (this process's time on every thread, steadier than the wall time on a
    busy machine); and result() alone of a map already finished (one
    thread reading the block's arrays: the steadiest of the three)."""
    start, cpu = time.perf_counter(), time.process_time()
    values = result_of(runner.map(inc, {"x": range(items)}), progress)
    elapsed = (time.perf_counter() - start, time.process_time() - cpu)
    assert len(values) == items and values[-1] == items
    futures = runner.map(inc, {"x": range(items)})
    futures.wait()
    start = time.perf_counter()
    values = result_of(futures, progress)
    return elapsed + (time.perf_counter() - start,)


def result_of(futures, progress):
    return futures.result() if progress is None else futures.result(progress=progress)


def compare_bars(items, rounds):
    from taskrunner import ThreadPoolTaskRunner

    modes = {"no bar": None, "progress=True, no tty": True, 'progress="always"': "always"}
    times = {mode: [] for mode in modes}
    real_stderr = sys.stderr
    with open(os.devnull, "w") as devnull, ThreadPoolTaskRunner() as runner:
        sys.stderr = devnull
        try:
            for progress in modes.values():               # warm up (tqdm's import, say)
                one_run(runner, items // 10, progress)
        finally:
            sys.stderr = real_stderr
        order = list(modes)
        for round_ in range(rounds):
            # Each mode first in turn: none gains from coming after another.
            for mode in order[round_ % 3:] + order[:round_ % 3]:
                sys.stderr = devnull
                try:
                    times[mode].append(one_run(runner, items, modes[mode]))
                finally:
                    sys.stderr = real_stderr
    report(times, "no bar")


def report(times, base_name):
    for kind, at in (("wall", 0), ("cpu", 1), ("done", 2)):
        base = statistics.median(run[at] for run in times[base_name])
        for name, runs in times.items():
            values = [run[at] for run in runs]
            median = statistics.median(values)
            print(f"{kind:4} {name:24} median {median * 1000:7.1f} ms  "
                  f"(runs {min(values) * 1000:.0f}-{max(values) * 1000:.0f} ms)  "
                  f"{median / base:.3f}x {base_name}")


def child(items, rounds):
    """Runs without a bar in a fresh interpreter: their times, as JSON."""
    from taskrunner import ThreadPoolTaskRunner

    with ThreadPoolTaskRunner() as runner:
        one_run(runner, items, None)
        print(json.dumps([one_run(runner, items, None) for _ in range(rounds)]))


def compare_trees(items, rounds, baseline):
    trees = {"baseline": os.path.abspath(baseline), "this tree": HERE}
    times = {name: [] for name in trees}
    names = list(trees)
    for round_ in range(rounds):
        for name in names[round_ % 2:] + names[:round_ % 2]:     # each first in turn
            tree = trees[name]
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), str(items), "3", "--child"],
                capture_output=True, text=True, check=True, cwd=tree,
                env={**os.environ, "PYTHONPATH": tree})
            times[name].extend(json.loads(out.stdout))
    report({f"no bar, {name}": runs for name, runs in times.items()}, "no bar, baseline")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("items", nargs="?", type=int, default=1_000_000)
    parser.add_argument("rounds", nargs="?", type=int, default=7)
    parser.add_argument("--plain", action="store_true", help="draw without tqdm")
    parser.add_argument("--baseline", help="a built checkout to compare the run without a bar to")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        sys.modules["tqdm"] = sys.modules["tqdm.std"] = None   # type: ignore[assignment]
    if args.child:
        child(args.items, args.rounds)
        return
    import taskrunner
    from taskrunner.progress import _tqdm_class

    print(f"{args.items:,} items, {args.rounds} rounds, taskrunner from "
          f"{os.path.dirname(taskrunner.__file__)}, drawn with "
          f"{'tqdm' if _tqdm_class() is not None else 'the plain line'}")
    compare_bars(args.items, args.rounds)
    if args.baseline:
        compare_trees(args.items, args.rounds, args.baseline)


if __name__ == "__main__":
    main()
