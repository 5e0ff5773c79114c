"""Draw a run trace (the Chrome trace-event file `trace=` writes) as a PNG:
one row per track (worker thread, worker process, Dask worker thread; the
waits rows last), one bar per attempt coloured by task (hatched red where
it failed), an arrow per flow (dependency edges; retries dashed).

    python benchmarks/render_trace.py run.json trace.png [--title TEXT]
    python benchmarks/render_trace.py --example docs/trace.png

`--example` first runs a small DAG and a map on a ProcessPoolTaskRunner
with 2 workers, traced, and draws that trace (the README's picture).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from typing import NamedTuple

FAILED_STATES = {"Failed", "Crashed"}


class Row(NamedTuple):
    pid: int
    tid: int
    label: str


def load(path):
    with open(path) as f:
        return json.load(f)["traceEvents"]


def rows_of(events):
    """The tracks that have a slice, in the file's order (by pid, then tid)."""
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e["ph"] == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e["ph"] == "M" and e["name"] == "thread_name"}
    used = sorted({(e["pid"], e["tid"]) for e in events if e["ph"] == "X"})
    return [Row(pid, tid, f"{processes.get(pid, pid)}\n{threads.get((pid, tid), tid)}")
            for pid, tid in used]


def render(events, out, title=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    rows = rows_of(events)
    y_of = {(r.pid, r.tid): len(rows) - 1 - i for i, r in enumerate(rows)}
    slices = [e for e in events if e["ph"] == "X"]
    origin = min(e["ts"] for e in slices)
    tasks = sorted({e["name"] for e in slices if e.get("cat") != "wait"})
    palette = plt.get_cmap("tab10")
    colour = {name: palette(i % 10) for i, name in enumerate(tasks)}

    fig, ax = plt.subplots(figsize=(12, 1.4 + 0.8 * len(rows)), dpi=110)
    for e in slices:
        y = y_of[(e["pid"], e["tid"])]
        start, width = (e["ts"] - origin) / 1000.0, max(e["dur"] / 1000.0, 0.0)
        if e.get("cat") == "wait":
            ax.barh(y, width, left=start, height=0.5, color="#dddddd", edgecolor="#888888",
                    linewidth=0.6)
            continue
        failed = e["args"].get("state") in FAILED_STATES
        ax.barh(y, width, left=start, height=0.62, color=colour[e["name"]],
                edgecolor="#b00000" if failed else "black", linewidth=1.4 if failed else 0.3,
                hatch="////" if failed else None)

    ends = {}
    for e in events:
        if e["ph"] in ("s", "f"):
            ends.setdefault((e["cat"], e["id"]), {})[e["ph"]] = e
    for (cat, _), pair in ends.items():
        if "s" not in pair or "f" not in pair:
            continue
        a, b = pair["s"], pair["f"]
        ax.add_patch(FancyArrowPatch(
            ((a["ts"] - origin) / 1000.0, y_of[(a["pid"], a["tid"])]),
            ((b["ts"] - origin) / 1000.0, y_of[(b["pid"], b["tid"])]),
            arrowstyle="-|>", mutation_scale=7, linewidth=0.6, alpha=0.55,
            color="#333333", linestyle="--" if cat == "retry" else "-",
            connectionstyle="arc3,rad=0.08"))

    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r.label for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("milliseconds since the runner started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[name]) for name in tasks]
    labels = list(tasks)
    if any(e["args"].get("state") in FAILED_STATES for e in slices if e.get("cat") != "wait"):
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="#b00000",
                                     hatch="////"))
        labels.append("failed")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              frameon=False)
    ax.set_title(title or "run trace", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# -- the README's example ------------------------------------------------------------

def pause(seconds):
    time.sleep(seconds)


def load_rows(n):
    time.sleep(0.004)
    return list(range(n))


def clean(row):
    time.sleep(0.001 + 0.0004 * (row % 5))
    if row == 13:
        raise ValueError("row 13 is bad")
    return row * 2


def summarize(rows):
    time.sleep(0.003)
    return sum(r for r in rows if not isinstance(r, BaseException))


def report(total, extra):
    time.sleep(0.002)
    return f"{total} + {extra}"


def example_trace(path):
    """A small DAG and a map on 2 worker processes, traced to `path`."""
    from taskrunner import ProcessPoolTaskRunner, allow_failure

    with ProcessPoolTaskRunner(max_workers=2, trace=path) as runner:
        # Both workers up before the picture starts (left out of it).
        runner.map(pause, {"seconds": [0.3, 0.3]}).result()
        rows = runner.submit(load_rows, {"n": 24})
        cleaned = runner.map(clean, {"row": range(24)}, wait_for=[rows])
        side = runner.submit(summarize, {"rows": rows})
        total = runner.submit(summarize, {"rows": allow_failure(cleaned)})
        done = runner.submit(report, {"total": total, "extra": side})
        more = runner.map(clean, {"row": range(30, 36)}, wait_for=[done])
        more.wait()
        return done.result()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", help="a trace file (not with --example)")
    parser.add_argument("png", help="the PNG to write")
    parser.add_argument("--title")
    parser.add_argument("--example", action="store_true",
                        help="trace the README's example on the process runner first")
    args = parser.parse_args(argv)
    if args.example == (args.trace is not None):
        parser.error("give a trace file, or --example")
    if args.example:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "run.json")
            example_trace(path)
            events = load(path)
        title = args.title or ("ProcessPoolTaskRunner(max_workers=2, trace=...): a DAG, a map "
                               "with a failed item, a map after it")
    else:
        events = load(args.trace)
        title = args.title
    if args.example:
        events = [e for e in events if not (e["ph"] == "X" and e["name"] == "pause")]
    render(events, args.png, title)
    print(f"wrote {args.png}", file=sys.stderr)


if __name__ == "__main__":
    main()
