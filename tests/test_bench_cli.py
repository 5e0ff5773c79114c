"""The command `python -m taskrunner bench`, at quick sizes, in this process:
its table, --json, --workload/--system, --quick/--full sizes, warm-ups,
skipped peers, the progress line, --plot and --scaling."""

import contextlib
import dataclasses
import io
import json
import re
import sys

import pytest

from taskrunner import bench
from taskrunner.__main__ import main

pytestmark = pytest.mark.timeout(240)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(*argv):
    """(exit code, stdout) of `python -m taskrunner bench ARGV`, in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", *argv])
    return code, out.getvalue()


def run_json(tmp_path, *argv):
    """(stdout, the JSON report) of a bench run that must succeed."""
    out = tmp_path / "out.json"
    code, stdout = run_bench(*argv, "--json", str(out))
    assert code == 0
    return stdout, json.loads(out.read_text())


def with_peers(monkeypatch, name, *peers):
    """Make workload `name` have these peers for the test."""
    workload = dataclasses.replace(bench.WORKLOADS[name], peers=peers, targets=())
    monkeypatch.setitem(bench.WORKLOADS, name, workload)
    return workload


class Recorder:
    """A peer's run that records the items of each call, then does the chain
    row's job as ThreadPoolExecutor does it."""

    def __init__(self):
        self.calls = []

    def __call__(self, n, workers):
        self.calls.append(n)
        return bench.chain_executor(n, workers)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run of two graph workloads and of a memory one: (stdout, JSON)."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    code, stdout = run_bench("--quick", "--workload", "fan-out-in,chain,memory",
                             "--json", str(out))
    assert code == 0
    return stdout, json.loads(out.read_text())


def test_fan_answer_is_the_sum_by_hand():
    assert bench.fan_answer(5_000) == sum(i + bench.first() for i in range(5_000))


def test_json_has_every_figure(quick_run):
    """Every variant ran (a wrong answer would have failed the run) and has
    its samples, median, min, max, throughput, items and ratio; --quick
    runs each once."""
    _, report = quick_run
    assert report["repeat"] == 1 and report["quick"] is True and report["full"] is False
    workloads = {w["workload"]: w for w in report["workloads"]}
    assert list(workloads) == ["fan-out-in", "chain", "memory"]
    assert (workloads["fan-out-in"]["size"], workloads["chain"]["size"]) == (5_000, 1_000)
    for name in ("fan-out-in", "chain"):
        summary = workloads[name]
        variants = summary["variants"]
        assert set(variants) == {v.name for v in bench.WORKLOADS[name].variants}
        for entry in variants.values():
            if "skipped" in entry:
                continue
            assert len(entry["samples"]) == 1
            assert entry["min"] == entry["median"] == entry["max"] == entry["samples"][0]
            assert entry["throughput"] == pytest.approx(summary["size"] / entry["median"])
            assert 0 < entry["items"] <= summary["size"]
        ours = variants["taskrunner"]["median"]
        assert summary["ratios"][bench.THREAD_POOL] == pytest.approx(
            variants[bench.THREAD_POOL]["median"] / ours)
    assert workloads["memory"]["variants"]["taskrunner"]["throughput"] is None
    assert report["machine_line"].startswith("machine: ")
    assert set(report["peer_versions"]) == set(bench.PEER_PACKAGES)


def test_table_has_spread_throughput_and_versions(quick_run):
    stdout, report = quick_run
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("| workload"))
    assert [c.strip() for c in header.strip("|").split("|")] == bench.HEADER
    ours = next(line for line in lines if line.startswith("| chain "))
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells[:3] == ["chain", "1,000", "taskrunner"]
    assert re.fullmatch(r"[\d.]+–[\d.]+ m?s", cells[4])
    assert re.fullmatch(r"[\d.]+[kMG]?/s", cells[5])
    memory = next(line for line in lines if line.startswith("| memory "))
    assert [c.strip() for c in memory.strip("|").split("|")][5] == "-"
    assert lines[0] == report["machine_line"]
    assert lines[1].startswith("peers: dask ") and "prefect " in lines[1] and "ray " in lines[1]
    assert lines[1].endswith(f"Python {report['machine']['python']}")
    assert stdout.count("Figures are medians") == 1
    assert "not timed" in stdout     # peers' start is said to be outside the figures


def test_workload_picks_workloads_and_only_is_its_alias(tmp_path):
    _, report = run_json(tmp_path, "--quick", "--workload", "chain,submit", "--system",
                         bench.THREAD_POOL)
    assert [w["workload"] for w in report["workloads"]] == ["chain", "submit"]
    _, report = run_json(tmp_path, "--quick", "--only", "CHAIN", "--system", bench.THREAD_POOL)
    assert [w["workload"] for w in report["workloads"]] == ["chain"]


def test_system_picks_peers_and_ours_always_runs(tmp_path):
    stdout, report = run_json(tmp_path, "--quick", "--workload", "chain,memory",
                              "--system", "threadpoolexecutor")
    for summary in report["workloads"]:
        assert set(summary["variants"]) == {"taskrunner", bench.THREAD_POOL}
        assert set(summary["ratios"]) == {bench.THREAD_POOL}
    assert bench.DASK_THREADED not in stdout


@pytest.mark.parametrize("option, value", [("--workload", "chain,nope"),
                                           ("--system", "no such peer")])
def test_unknown_name_exits_2_before_running(capsys, option, value):
    assert main(["bench", "--quick", option, value]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"unknown {option[2:]}(s): {value.split(',')[-1]}" in err


def test_missing_peer_is_skipped_with_the_extra(monkeypatch, tmp_path):
    absent = bench.Variant("absent peer", bench.chain_executor, requires=("no_such_peer_module",))
    with_peers(monkeypatch, "chain", absent)
    stdout, report = run_json(tmp_path, "--quick", "--workload", "chain")
    row = next(line for line in stdout.splitlines() if "absent peer" in line)
    skipped = "not installed (no_such_peer_module): pip install 'taskrunner[peers]'"
    assert f"skipped: {skipped}" in row
    entry = report["workloads"][0]["variants"]["absent peer"]
    assert entry == {"samples": [], "skipped": skipped}
    assert report["workloads"][0]["ratios"] == {}


def test_peer_that_fails_to_start_is_skipped_with_its_error(monkeypatch, tmp_path):
    def cannot_start(n, workers):
        raise OSError("no shared memory here")

    with_peers(monkeypatch, "chain", bench.Variant("broken peer", cannot_start))
    stdout, report = run_json(tmp_path, "--quick", "--workload", "chain", "--repeat", "2")
    entry = report["workloads"][0]["variants"]["broken peer"]
    assert entry["skipped"].startswith("failed to start: OSError('no shared memory here')")
    assert len(report["workloads"][0]["variants"]["taskrunner"]["samples"]) == 2


def test_each_variant_warms_up_before_its_samples(monkeypatch, tmp_path):
    recorder = Recorder()
    with_peers(monkeypatch, "chain", bench.Variant("recorded peer", recorder))
    _, report = run_json(tmp_path, "--quick", "--workload", "chain", "--repeat", "3")
    assert recorder.calls == [bench.WARM_UP_ITEMS, 1_000, 1_000, 1_000]
    assert len(report["workloads"][0]["variants"]["recorded peer"]["samples"]) == 3


def test_quick_leaves_out_slow_starting_peers_unless_named(monkeypatch, tmp_path):
    recorder = Recorder()
    with_peers(monkeypatch, "chain", bench.Variant("service peer", recorder, start_seconds=20))
    stdout, report = run_json(tmp_path, "--quick", "--workload", "chain")
    assert recorder.calls == []
    skipped = report["workloads"][0]["variants"]["service peer"]["skipped"]
    assert "--quick" in skipped and "--system" in skipped
    _, report = run_json(tmp_path, "--quick", "--workload", "chain", "--system", "service peer")
    assert recorder.calls and report["workloads"][0]["variants"]["service peer"]["samples"]


def test_slow_peer_is_scaled_by_default_and_full_with_full(monkeypatch, tmp_path, capsys):
    """A peer's size_cap (its items in the default run, shrunk in proportion
    by --quick) is marked as scaled in the table; --full gives it every item."""
    recorder = Recorder()
    with_peers(monkeypatch, "chain", bench.Variant("slow peer", recorder, size_cap=4_000))
    stdout, report = run_json(tmp_path, "--quick", "--workload", "chain")
    entry = report["workloads"][0]["variants"]["slow peer"]
    assert recorder.calls[-1] == entry["items"] == 4_000 * 1_000 // 20_000
    row = next(line for line in stdout.splitlines() if "slow peer" in line)
    assert "[scaled from 200 items]" in row
    _, report = run_json(tmp_path, "--quick", "--full", "--workload", "chain")
    assert recorder.calls[-1] == report["workloads"][0]["variants"]["slow peer"]["items"] == 1_000
    assert report["full"] is True


def test_sizes():
    dag = bench.WORKLOADS["dag"]
    capped = bench.Variant("capped", None, size_cap=2_500, full_size_cap=100_000)
    assert bench.Sizes().items(dag, capped) == 2_000              # whole layers
    assert bench.Sizes(quick=True).items(dag, capped) == 1_000    # at least one layer
    assert bench.Sizes(full=True).items(dag, capped) == 100_000
    assert bench.Sizes(full=True).items(dag, dag.ours) == 200_000
    assert bench.Sizes(quick=True).of(dag) == dag.quick_size


def test_progress_line_says_what_is_running(capsys):
    assert main(["bench", "--quick", "--workload", "chain", "--system", bench.THREAD_POOL]) == 0
    err = capsys.readouterr().err
    assert re.search(r"\[0:\d\d\] chain: taskrunner warm-up", err)
    assert re.search(r"\[0:\d\d\] chain: ThreadPoolExecutor run 1 of 1, 1,000 items", err)


def test_quick_default_runs_the_dask_peer_of_chain(tmp_path):
    """A peer sampled in a fresh process (dask threaded) runs in --quick too."""
    _, report = run_json(tmp_path, "--quick", "--workload", "chain", "--system",
                         bench.DASK_THREADED)
    assert len(report["workloads"][0]["variants"][bench.DASK_THREADED]["samples"]) == 1


def test_plot_without_matplotlib_exits_before_running(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # find_spec: not importable
    assert main(["bench", "--quick", "--workload", "chain", "--plot",
                 str(tmp_path / "c.png")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "pip install 'taskrunner[bench]'" in err
    assert not (tmp_path / "c.png").exists()


def test_plot_writes_a_png(tmp_path):
    chart = tmp_path / "chart.png"
    code, _ = run_bench("--quick", "--workload", "chain,memory", "--system", bench.THREAD_POOL,
                        "--plot", str(chart))
    assert code == 0
    assert chart.read_bytes().startswith(PNG_MAGIC) and chart.stat().st_size > 10_000


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory):
    """One --scaling --quick run, charted: (stdout, JSON, the chart's path)."""
    folder = tmp_path_factory.mktemp("scaling")
    chart = folder / "scaling.png"
    code, stdout = run_bench("--scaling", "--quick", "--json", str(folder / "out.json"),
                             "--plot", str(chart))
    assert code == 0
    return stdout, json.loads((folder / "out.json").read_text()), chart


def test_scaling_quick_has_a_row_per_size_and_system(scaling_run):
    stdout, report, _ = scaling_run
    sizes = (1_000, 10_000, 100_000)
    expected = {(series, runs, system) for series in ("scaling-submit", "scaling-map")
                for runs in sizes for system in ("taskrunner", bench.THREAD_POOL)}
    points = report["scaling"]
    assert {(p["series"], p["runs"], p["system"]) for p in points} == expected
    for point in points:
        assert point["skipped"] is None and len(point["samples"]) == 1
        assert point["us_per_run"] > 0 and point["bytes_per_run"] >= 0
    rows = [line for line in stdout.splitlines() if line.startswith("| scaling-")]
    assert len(rows) == len(expected)
    assert {row.split("|")[2].strip() for row in rows} == {f"{n:,}" for n in sizes}
    assert "| workload" not in stdout
    assert stdout.count("Figures are medians") == 1


def test_scaling_plot_writes_a_png(scaling_run):
    chart = scaling_run[2]
    assert chart.read_bytes().startswith(PNG_MAGIC) and chart.stat().st_size > 10_000
