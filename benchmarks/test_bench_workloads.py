"""The workloads of taskrunner.bench (ours and every peer, thread and
process pools) under pytest-benchmark:
`python -m pytest benchmarks/ --benchmark-only`; then the command
`python -m taskrunner bench` itself, at quick sizes: its table, --json,
--plot and --scaling."""

import contextlib
import dataclasses
import gc
import importlib.util
import io
import json
import re
import statistics
import sys

import pytest

from taskrunner import bench
from taskrunner.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
has_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                    reason="--plot needs matplotlib")

CASES = [pytest.param(workload, variant, id=f"{workload.name}-{variant.name}")
         for workload in bench.WORKLOADS.values() for variant in workload.variants]
ROUNDS = 3


@pytest.mark.parametrize("workload, variant", CASES)
def test_workload(benchmark, workload, variant, workers, processes, full_size):
    """Each round does the whole job and must give the expected answer.
    Timed workloads are timed by pytest-benchmark; the others (memory)
    record their own figure, median of the rounds, in extra_info."""
    if not variant.available():
        pytest.skip(f"{variant.name} needs {', '.join(variant.requires)}")
    size = bench.variant_size(variant, workload.size if full_size else workload.quick_size)
    workers = bench.workers_for(workload, workers, processes)
    data = workload.prepare(size)
    expected = workload.expected(data)
    benchmark.group = workload.name
    benchmark.extra_info.update(size=size, workers=workers)
    figures = []

    def timed_round():
        assert variant.run(data, workers) == expected

    def measured_round():
        try:
            figures.append(bench.measure(workload, variant, data, size, workers, expected))
        except bench.NotFinished as error:
            benchmark.extra_info["not_finished"] = str(error)

    def setup():
        gc.collect()

    timed = (variant.measure or workload.measure) is bench.measure_time
    benchmark.pedantic(timed_round if timed else measured_round, setup=setup,
                       rounds=min(ROUNDS, variant.max_repeat or ROUNDS), iterations=1)
    if figures:
        benchmark.extra_info[workload.unit] = statistics.median(figures)


def run_bench(*argv):
    """(exit code, stdout) of `python -m taskrunner bench ARGV`, in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", *argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run of the new workloads and of a memory one: (stdout, JSON)."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    code, stdout = run_bench("--quick", "--only", "fan-out-in,chain,memory", "--repeat", "1",
                             "--json", str(out))
    assert code == 0
    return stdout, json.loads(out.read_text())


def test_fan_answer_is_the_sum_by_hand():
    assert bench.fan_answer(5_000) == sum(i + bench.first() for i in range(5_000))


def test_json_has_every_figure(quick_run):
    """Every variant ran (a wrong answer would have failed the run) and has
    its samples, median, min, max, throughput and ratio."""
    _, report = quick_run
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
    assert lines[1].startswith("peers: dask ") and "prefect " in lines[1]
    assert lines[1].endswith(f"Python {report['machine']['python']}")
    assert stdout.count("Figures are medians") == 1


def test_missing_peer_is_skipped_with_the_extra(monkeypatch, tmp_path):
    absent = bench.Variant("absent peer", bench.chain_executor, requires=("no_such_peer_module",))
    chain = dataclasses.replace(bench.WORKLOADS["chain"], peers=(absent,))
    monkeypatch.setitem(bench.WORKLOADS, "chain", chain)
    out = tmp_path / "out.json"
    code, stdout = run_bench("--quick", "--only", "chain", "--repeat", "1", "--json", str(out))
    assert code == 0
    row = next(line for line in stdout.splitlines() if "absent peer" in line)
    assert "skipped: not installed: pip install 'taskrunner[peers]'" in row
    entry = json.loads(out.read_text())["workloads"][0]["variants"]["absent peer"]
    assert entry == {"samples": [], "skipped": bench.NOT_INSTALLED}


def test_joblib_threading_is_a_peer_of_map():
    peer = bench.WORKLOADS["map"].variant(bench.JOBLIB_THREADS)
    assert peer.requires == ("joblib",)
    if peer.available():
        assert peer.run(1_000, 2) == bench.sum_of_incs(1_000)


def test_plot_without_matplotlib_exits_before_running(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # find_spec: not importable
    assert main(["bench", "--quick", "--only", "chain", "--plot", str(tmp_path / "c.png")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "pip install 'taskrunner[bench]'" in err
    assert not (tmp_path / "c.png").exists()


@has_matplotlib
def test_plot_writes_a_png(tmp_path):
    chart = tmp_path / "chart.png"
    code, _ = run_bench("--quick", "--only", "chain,memory", "--repeat", "1",
                        "--plot", str(chart))
    assert code == 0
    assert chart.read_bytes().startswith(PNG_MAGIC) and chart.stat().st_size > 10_000


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory):
    """One --scaling --quick run (charted too when matplotlib is there):
    (stdout, JSON, the chart's path or None)."""
    folder = tmp_path_factory.mktemp("scaling")
    chart = folder / "scaling.png" if importlib.util.find_spec("matplotlib") else None
    code, stdout = run_bench("--scaling", "--quick", "--repeat", "1",
                             "--json", str(folder / "out.json"),
                             *(["--plot", str(chart)] if chart else []))
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


@has_matplotlib
def test_scaling_plot_writes_a_png(scaling_run):
    chart = scaling_run[2]
    assert chart.read_bytes().startswith(PNG_MAGIC) and chart.stat().st_size > 10_000
