"""Progress bars (issue 10, point 5): FutureList.wait() and result() with
`progress=`, and imap(progress=...), on every runner (taskrunner/progress.py).

A bar is drawn on sys.stderr, here a `Terminal` (stderr_as) that records what is
written and says whether it is a tty.  Each test runs twice, with tqdm and
with the plain line (tqdm made unimportable), except where the drawing does
not matter.  A bar's last line ends with a newline, and its counts are the
last ones drawn: `last_line()`.
"""

import contextlib
import gc
import re
import sys
import threading

import pytest

from taskrunner import FutureList, ThreadPoolTaskRunner, task, unmapped
from taskrunner import progress as progress_module

import runner_tasks as rt
from harness import run_script, running

pytestmark = pytest.mark.timeout(120)

N = 60
OF = 7
FAILED = len(range(0, N, OF))       # the multiples of 7 below 60 fail: 9


class Terminal:
    """A stand-in for stderr: records what is written (from any thread);
    isatty() says `tty`."""

    encoding = "utf-8"

    def __init__(self, tty=False):
        self.tty = tty
        self.chunks = []
        self.changed = threading.Condition()

    def write(self, text):
        with self.changed:
            self.chunks.append(text)
            self.changed.notify_all()
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return self.tty

    @property
    def text(self):
        with self.changed:
            return "".join(self.chunks)

    def wait_for(self, pattern, timeout=30):
        """Wait until what was written matches `pattern` (a regex)."""
        with self.changed:
            return self.changed.wait_for(lambda: re.search(pattern, "".join(self.chunks)),
                                         timeout)

    def lines(self):
        """Every drawing of the bar, in order (a line rewritten in place
        counts once per drawing)."""
        return [part for part in re.split(r"[\r\n]", self.text) if part.strip()]

    def last_line(self):
        text = self.text
        assert text.endswith("\n"), f"the bar has no last line: {text!r}"
        return self.lines()[-1]


@pytest.fixture
def drawing(request, monkeypatch):
    """How bars are drawn: with tqdm (unless the test is parametrized with
    EITHER_WAY), or (tqdm not importable) as the plain line."""
    how = getattr(request, "param", "tqdm")
    if how == "plain":
        monkeypatch.setitem(sys.modules, "tqdm", None)
        monkeypatch.setitem(sys.modules, "tqdm.std", None)
    else:
        import tqdm  # noqa: F401 (the test extra installs it: both ways are tested)
    return how


# Drawn by tqdm, and as the plain line: on the thread runner (how a bar is
# drawn is the same whatever counted it).
EITHER_WAY = pytest.mark.parametrize("drawing", ["tqdm", "plain"], indirect=True)


@contextlib.contextmanager
def stderr_as(term):
    """sys.stderr replaced by `term` (in the test's body: pytest puts its
    own capture back between a fixture's setup and the test)."""
    before = sys.stderr
    sys.stderr = term
    try:
        yield term
    finally:
        sys.stderr = before


def assert_drawn_with(term, drawing):
    """The bar was drawn by tqdm, or as the plain line."""
    if drawing == "tqdm":
        assert "run/s" in term.text or "result/s" in term.text, term.text
    else:
        assert re.search(r"(runs|results), \d+ failed, [\d.]+/s", term.text), term.text


def assert_final(line, done, total, failed):
    """A last line that shows `done` of `total` (None: unknown) and
    `failed` failures."""
    shown = f"{done}/{total}" if total is not None else f"{done} result"
    assert shown in line, line
    assert f"{failed} failed" in line, line


def progress_threads():
    return [t for t in threading.enumerate() if t.name == "taskrunner-progress"]


def expected_results():
    return [ValueError if i % OF == 0 else i for i in range(N)]


def kinds(values):
    return [type(v) if isinstance(v, BaseException) else v for v in values]


# ================================================================ result and wait


def check_result_bar(runner, drawing):
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(runner) as r:
            fl = r.map(rt.fail_if_multiple, {"x": range(N), "of": unmapped(OF)})
            got = fl.result(raise_on_failure=False, progress="always")
            assert kinds(got) == expected_results()
            assert kinds(fl.result(raise_on_failure=False)) == expected_results()
        assert_drawn_with(log_file, drawing)
        assert_final(log_file.last_line(), N, N, FAILED)
        assert "fail_if_multiple" in log_file.last_line()       # the task's name
        assert log_file.text.count("\n") == 1                  # one bar, one last line
        assert not progress_threads()


def test_result_draws_a_bar_that_reaches_the_total_and_counts_failures(runner_factory, drawing):
    check_result_bar(runner_factory(), drawing)


@EITHER_WAY
def test_result_draws_either_way(drawing):
    check_result_bar(ThreadPoolTaskRunner(max_workers=2), drawing)


def test_wait_draws_a_bar_that_reaches_the_total(runner_factory, drawing):
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(runner_factory()) as r:
            fl = r.map(rt.fail_if_multiple, {"x": range(N), "of": unmapped(OF)})
            assert fl.wait(progress="always") is None
            assert kinds(fl.result(raise_on_failure=False)) == expected_results()
        assert_drawn_with(log_file, drawing)
        assert_final(log_file.last_line(), N, N, FAILED)
        assert not progress_threads()


def test_the_bar_is_redrawn_while_the_runs_go_on(runner_factory, drawing, make_gate):
    """Live: with the last item held at a gate, the bar shows others done
    before the wait ends (some of them: the Dask runner reports a pack of
    runs at once, and the last pack holds the gated item)."""
    with stderr_as(Terminal(tty=False)) as log_file:
        results = []
        with running(runner_factory(max_workers=2)) as r, make_gate() as gate:
            fl = r.map(rt.gated_item, {"x": range(20), "block_on": 19, "gate": gate.path})
            waiter = threading.Thread(target=lambda: results.append(fl.result(progress="always")))
            waiter.start()
            assert log_file.wait_for(r"\b([1-9]|1[0-9])/20\b"), log_file.text
            assert not results and waiter.is_alive()
            gate.open()
            waiter.join(30)
            assert results == [list(range(20))]
        assert_final(log_file.last_line(), 20, 20, 0)
        assert log_file.text.count("\n") == 1       # one bar, one last line
        assert not progress_threads()


def test_a_retried_attempt_is_neither_done_nor_failed(runner_factory, drawing, tmp_path):
    """Items that fail once and are retried: the bar counts each once, as
    it ends, and none as failed."""
    flaky = task(rt.item_fails_until, retries=2)
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(runner_factory(max_workers=2)) as r:
            fl = r.map(flaky, {"x": range(20), "directory": str(tmp_path), "succeed_on": 2})
            assert fl.result(timeout=60, progress="always") == [x * 10 for x in range(20)]
        assert_final(log_file.last_line(), 20, 20, 0)


def test_a_materialized_list_counts_its_futures(runner_factory, drawing):
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(runner_factory()) as r:
            fl = r.map(rt.fail_if_multiple, {"x": range(N), "of": unmapped(OF)})
            fl[0]                                   # now a list of futures
            assert fl._block_ended() is None
            got = fl.result(raise_on_failure=False, progress="always")
            assert kinds(got) == expected_results()
            submitted = FutureList([r.submit(rt.inc, {"x": i}) for i in range(10)])
            submitted.wait(progress="always")
        lines = [line for line in log_file.text.split("\n") if line.strip()]
        assert len(lines) == 2, log_file.text
        assert_final(re.split("\r", lines[0])[-1], N, N, FAILED)
        assert_final(re.split("\r", lines[1])[-1], 10, 10, 0)


def test_a_large_materialized_list_is_scanned_a_bounded_number_at_a_time(monkeypatch):
    """While a list has futures, a redraw looks at SCAN_BUDGET of those not
    yet seen final (the counts lag: never more than there are), the last
    line at all of them."""
    monkeypatch.setattr(progress_module, "SCAN_BUDGET", 7)
    with running(ThreadPoolTaskRunner(max_workers=2)) as r:
        fl = r.map(rt.fail_if_multiple, {"x": range(N), "of": unmapped(OF)})
        fl.wait()
        fl[0]
        tally = progress_module._FutureTally(fl)
        assert tally(False) == (7, 1)           # items 0..6; 0 failed
        assert tally(False) == (14, 2)
        assert tally(True) == (N, FAILED)
        assert tally(False) == (N, FAILED)      # nothing is counted twice
        fl.append(r.submit(rt.inc, {"x": 1}))   # a list that grew is counted again
        fl[-1].wait()
        assert tally(True) == (N + 1, FAILED)


def check_timeout_bar(runner, drawing, gate, call):
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(runner) as r, gate:
            fl = r.map(rt.gated, {"value": range(20), "gate": gate.path})
            if call == "result":
                with pytest.raises(TimeoutError):
                    fl.result(timeout=0.3, progress="always")
            else:
                fl.wait(timeout=0.3, progress="always")
            assert_final(log_file.last_line(), 0, 20, 0)
            if drawing == "plain":
                assert re.search(r"in \d+:\d\d:\d\d", log_file.last_line())
            assert not progress_threads()


def test_the_bar_ends_on_a_timeout(runner_factory, drawing, make_gate):
    check_timeout_bar(runner_factory(max_workers=2), drawing, make_gate(), "result")


@EITHER_WAY
@pytest.mark.parametrize("call", ["result", "wait"])
def test_the_bar_ends_on_a_timeout_either_way(drawing, make_gate, call):
    check_timeout_bar(ThreadPoolTaskRunner(max_workers=2), drawing, make_gate(), call)


def test_the_bar_ends_on_a_failure(runner_factory, drawing):
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(runner_factory(max_workers=2)) as r:
            failing = r.map(rt.fail_if_multiple, {"x": range(N), "of": unmapped(OF)})
            failing.wait()
            with pytest.raises(ValueError, match="item 0"):
                failing.result(progress="always")
            assert_final(log_file.last_line(), N, N, FAILED)
        assert not progress_threads()


@pytest.mark.parametrize("when", ["opening", "waiting"])
def test_the_bar_ends_on_ctrl_c(tmp_path, when):
    """A real SIGINT while result() waits with a bar (the bar draws 19/20 a
    second time: its thread redraws it) or while the bar opens (it draws
    19/20 the first time): KeyboardInterrupt reaches the caller at once,
    after the bar's last line."""
    source = """
        import os, re, signal, sys, threading
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.modules["tqdm"] = sys.modules["tqdm.std"] = None     # the plain line
        import runner_tasks as rt
        from taskrunner import ThreadPoolTaskRunner

        class Watched:
            def __init__(self, out, times):
                self.out, self.seen, self.times = out, threading.Event(), times
            def write(self, text):
                self.out.write(text)
                if re.search(r"\\b19/20\\b", text):
                    self.times -= 1
                    if self.times == 0:
                        self.seen.set()
            def flush(self):
                self.out.flush()
            def isatty(self):
                return False

        sys.stderr = watched = Watched(sys.stderr, int(sys.argv[2]))
        gate = sys.argv[1]
        def interrupt():
            watched.seen.wait(60)
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=interrupt, daemon=True).start()
        with ThreadPoolTaskRunner(max_workers=2) as r:
            fl = r.map(rt.gated_item, {"x": range(20), "block_on": 19, "gate": gate})
            assert rt.wait_until(lambda: fl._block_ended() == (19, 0), timeout=60)
            try:
                fl.result(progress="always")
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                open(gate, "a").close()
                raise
    """
    times = {"opening": 1, "waiting": 2}[when]
    proc = run_script(source, args=(str(tmp_path / "gate"), str(times)), timeout=120)
    assert "interrupted" in proc.stdout, proc.stderr
    assert proc.returncode != 0
    # (Read as text, the pipe's \r are line ends.)
    drawn = [line for line in proc.stderr.splitlines() if " runs, " in line]
    assert_final(drawn[-1], 19, 20, 0)
    assert re.search(r"in \d+:\d\d:\d\d", drawn[-1]), drawn     # the last line, not a redraw
    assert "KeyboardInterrupt" in proc.stderr.partition(drawn[-1])[2]


def test_a_bar_nobody_holds_is_closed(drawing):
    """A bar dropped unclosed (its opener interrupted before it had it)
    draws its last line and stops its thread."""
    term = Terminal()
    bar = progress_module.ProgressBar(lambda final: progress_module.Counts(3, 1), 10,
                                      file=term)
    assert progress_threads()
    del bar
    gc.collect()
    assert rt.wait_until(lambda: not progress_threads(), timeout=10)
    assert_final(term.last_line(), 3, 10, 1)


# ====================================================================== when drawn


def test_progress_true_draws_nothing_when_stderr_is_no_terminal(runner_factory):
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(runner_factory()) as r:
            fl = r.map(rt.fail_if_multiple, {"x": range(N), "of": unmapped(OF)})
            assert kinds(fl.result(raise_on_failure=False, progress=True)) == expected_results()
            fl.wait(progress=True)
            assert len(list(r.imap(rt.inc, {"x": range(N)}, progress=True))) == N
        assert log_file.text == ""
        assert not progress_threads()


@EITHER_WAY
def test_progress_true_draws_on_a_terminal(drawing):
    with stderr_as(Terminal(tty=True)) as terminal:
        with running(ThreadPoolTaskRunner(max_workers=2)) as r:
            fl = r.map(rt.fail_if_multiple, {"x": range(N), "of": unmapped(OF)})
            assert kinds(fl.result(raise_on_failure=False, progress=True)) == expected_results()
        assert_drawn_with(terminal, drawing)
        assert_final(terminal.last_line(), N, N, FAILED)


def test_no_stderr_draws_nothing():
    with stderr_as(None), running(ThreadPoolTaskRunner(max_workers=2)) as r:
        fl = r.map(rt.inc, {"x": range(N)})
        assert fl.result(progress="always") == list(range(1, N + 1))
        assert r.imap(rt.inc, {"x": range(N)}, progress="always")._taken() == (0, 0)
        assert not progress_threads()


@pytest.mark.parametrize("bad, error", [
    ("yes", ValueError), ("", ValueError), ("ALWAYS", ValueError), (None, TypeError),
    (1, TypeError), (0, TypeError), (0.5, TypeError), (["always"], TypeError),
])
def test_a_bad_progress_raises_naming_it(bad, error):
    with stderr_as(Terminal(tty=False)) as log_file:
        source = iter(range(5))
        with running(ThreadPoolTaskRunner(max_workers=2)) as r:
            fl = r.map(rt.inc, {"x": range(5)})
            with pytest.raises(error, match="progress"):
                fl.result(progress=bad)
            with pytest.raises(error, match="progress"):
                fl.wait(progress=bad)
            with pytest.raises(error, match="progress"):
                r.imap(rt.inc, {"x": source}, progress=bad)       # at the call
            assert next(source) == 0                              # nothing was read
            assert fl.result() == [1, 2, 3, 4, 5]
        assert log_file.text == ""


# ============================================================================ imap


def check_imap_bar(runner, drawing, ordered):
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(runner) as r:
            got = list(r.imap(rt.fail_if_multiple, {"x": range(N), "of": unmapped(OF)},
                              ordered=ordered, raise_on_failure=False, progress="always"))
        if ordered:
            assert kinds(got) == expected_results()
        else:
            assert sorted(map(str, kinds(got))) == sorted(map(str, expected_results()))
        assert_drawn_with(log_file, drawing)
        assert_final(log_file.last_line(), N, N, FAILED)
        assert not progress_threads()


def test_imap_draws_the_results_given_and_the_failures(runner_factory, drawing):
    check_imap_bar(runner_factory(), drawing, ordered=False)


@EITHER_WAY
@pytest.mark.parametrize("ordered", [True, False])
def test_imap_draws_either_way(drawing, ordered):
    check_imap_bar(ThreadPoolTaskRunner(max_workers=2), drawing, ordered)


def test_imap_of_an_input_without_len_has_no_total(runner_factory, drawing):
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(runner_factory()) as r:
            got = list(r.imap(rt.fail_if_multiple, {"x": (i for i in range(N)), "of": OF},
                              raise_on_failure=False, progress="always"))
        assert kinds(got) == expected_results()
        line = log_file.last_line()
        assert_final(line, N, None, FAILED)
        assert f"/{N}" not in log_file.text


@EITHER_WAY
def test_imap_counts_the_results_as_the_consumer_takes_them(drawing):
    """Results fetched in a batch and not yet taken are not counted: the
    bar of an iterator left after 5 results shows 5; a failure raised
    counts as taken."""
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(ThreadPoolTaskRunner(max_workers=2)) as r:
            results = r.imap(rt.inc, {"x": list(range(N))}, progress="always")
            assert [next(results) for _ in range(5)] == [1, 2, 3, 4, 5]
            assert results._taken() == (5, 0)
            results.close()
            assert_final(log_file.last_line(), 5, N, 0)
            assert not progress_threads()
            raising = r.imap(rt.fail_if_multiple, {"x": range(1, N), "of": unmapped(OF)},
                             progress="always")
            with pytest.raises(ValueError, match="item 7"):
                list(raising)
            assert_final(log_file.last_line(), 7, N - 1, 1)


@EITHER_WAY
def test_imap_dropped_unfinished_ends_its_bar(drawing):
    with stderr_as(Terminal(tty=False)) as log_file:
        with running(ThreadPoolTaskRunner(max_workers=2)) as r:
            results = r.imap(rt.inc, {"x": range(N)}, progress="always")
            assert next(results) == 1
            del results
            gc.collect()
            assert not progress_threads()
            assert_final(log_file.last_line(), 1, N, 0)
