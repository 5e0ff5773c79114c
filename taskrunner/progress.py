"""Progress bars for a wait on many runs: FutureList.wait() and result()
with `progress=`, and imap(progress=...).

    the waiting thread                     the bar's own thread
    ──────────────────                     ────────────────────
    bar = bar_for_futures(...)  ─ starts ─> every TICK_SECONDS:
    waits exactly as without a bar            counts = count(False)   (counters kept anyway)
        (woken by the runs' ends)             view.show(counts)
    bar.close()  ──────────────── stops ──> joined; view.finish(count(True)): the last line

The runs pay nothing for a bar: no callback a run, no lock taken for it.
The bar's thread reads counters the engine keeps anyway (a map's block
counts the items it saw end; a stream the results it gave out), so a
redraw costs the same whether a thousand runs ended since the last one or
a million.  The waiting thread does not wake for the bar either, so the
wait ends as promptly, and a Ctrl-C reaches it as without one; it closes
the bar on its way out, however it leaves (results, a failure, a timeout,
a Ctrl-C), and the bar's last line shows where the runs were then.

Drawn with tqdm when it is installed (`pip install 'taskrunner[progress]'`),
else as one line rewritten in place (`\\r`): done/total, failed, rate, time
left.  `progress=True` draws only on a terminal (a bar in a log file is
noise); `progress="always"` draws whatever stderr is.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from typing import Any, Callable, NamedTuple, Optional, Union

__all__ = ["Counts", "ProgressBar", "bar_for_futures", "bar_for_results", "checked_progress"]

TICK_SECONDS = 0.1          # at most ten redraws a second
# Futures looked at a redraw once a map's list has its futures (see
# _FutureTally): a bounded cost a tick, whatever the list's length.
SCAN_BUDGET = 50_000

Progress = Union[bool, str]


class Counts(NamedTuple):
    """What a bar shows: how many have ended, and how many of those did not
    complete (failed, crashed, cancelled, or never ran)."""
    done: int
    failed: int


def checked_progress(progress: object) -> Progress:
    """`progress` if it is True, False or "always"; else TypeError or
    ValueError naming it."""
    if progress is True or progress is False:
        return progress
    if isinstance(progress, str):
        if progress == "always":
            return progress
        raise ValueError(f'progress must be True, False or "always", got {progress!r}')
    raise TypeError(f'progress must be True, False or "always", not {type(progress).__name__}')


def should_draw(progress: object, file) -> bool:
    """Whether a bar is drawn on `file` for a checked `progress`."""
    progress = checked_progress(progress)
    if progress is False or file is None:
        return False
    if progress == "always":
        return True
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):     # no isatty, or a closed file
        return False


# -- the bar ------------------------------------------------------------------

class ProgressBar:
    """A bar that a thread of its own redraws from `count` until close().

    `count(final)` returns the Counts at that moment, or None once its
    source is gone; `final` asks for exact counts (the last line), where a
    redraw may take cheaper, lagging ones.  It is called from the bar's
    thread, and from close() once that thread has stopped: never from two
    threads at once.

    A bar nobody holds any more is closed (its last line drawn, its thread
    stopped) when it is collected: a Ctrl-C may land while a bar is being
    opened, before its opener has it to close."""

    def __init__(self, count: Callable[[bool], Optional[Counts]], total: Optional[int], *,
                 desc: Optional[str] = None, unit: str = "runs", file=None):
        # First what close() needs, whatever comes after raises.
        self._closed = False
        self._view: Any = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()        # a redraw, or the last line
        self._stopping = threading.Event()
        self._count = count
        self._shown = Counts(0, 0)
        try:
            # Runs that ended before the bar opened count as done, but not
            # in its rate: a wait that starts late would show a burst.
            self._shown = count(False) or self._shown
            self._view = _make_view(file if file is not None else sys.stderr, total, desc, unit,
                                    self._shown)
            # The thread holds the bar weakly (see above).
            self._thread = threading.Thread(target=_redraw,
                                            args=(weakref.ref(self), self._stopping),
                                            name="taskrunner-progress", daemon=True)
            self._thread.start()
        except BaseException:   # a Ctrl-C, say: the bar ends at once, the error goes on
            self.close()
            raise

    def _tick(self) -> bool:
        """One redraw; False once there is nothing more to draw."""
        try:
            counts = self._count(False)
            with self._lock:
                if counts is None or self._closed:
                    return False
                self._show(counts)
            return True
        except Exception:   # a broken stderr, say: the wait goes on without a bar
            return False

    def _show(self, counts: Counts, final: bool = False):
        # Never backwards: a count a redraw read may lag one read earlier.
        counts = Counts(max(counts.done, self._shown.done), max(counts.failed, self._shown.failed))
        self._shown = counts
        if final:
            self._view.finish(counts)
        else:
            self._view.show(counts)

    def close(self, final: Optional[tuple] = None) -> None:
        """Stop redrawing and draw the last line: `final`, or the counts
        read now.  Only the first call draws."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread.ident is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            if self._closed or self._view is None:
                self._closed = True
                return
            self._closed = True
            if final is None:
                try:
                    final = self._count(True)
                except Exception:   # the last line then shows the counts drawn last
                    final = None
            self._show(Counts(*final) if final is not None else self._shown, final=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if "_lock" in self.__dict__:      # else __init__ was stopped before anything was drawn
            self.close()


def _redraw(ref, stopping: threading.Event):
    """A bar's thread: redraw every TICK_SECONDS until the bar closes or
    is collected."""
    while not stopping.wait(TICK_SECONDS):
        bar = ref()
        if bar is None or not bar._tick():
            return
        del bar         # the only reference, maybe: the bar is then closed here


# -- what is counted ----------------------------------------------------------

class _FutureTally:
    """The Counts of a FutureList's runs.  While the list has no futures
    (a map's list not yet used as a list) its block counts the items as
    they end: reading that costs nothing.  Once it has them, each read
    looks at up to SCAN_BUDGET futures not yet seen final (the final read
    at all of them): futures end in about input order, so the counts keep
    up, and a redraw costs the same on a list of a million."""

    def __init__(self, futures):
        self.futures = futures
        self.seen: Optional[bytearray] = None     # which futures were seen final
        self.start = 0
        self.counts = Counts(0, 0)

    def __call__(self, final: bool) -> Counts:
        counted = self.futures._block_ended()
        if counted is not None:
            return Counts(*counted)
        if self.seen is None or len(self.seen) != len(self.futures):
            # It has just made its futures (or was resized): count them all
            # from the start, the futures keeping the states of the items.
            self.seen = bytearray(len(self.futures))
            self.start = 0
            self.counts = Counts(0, 0)
        budget = len(self.seen) if final else SCAN_BUDGET
        self.start, ended, failed = self.futures._scan_ended(self.seen, self.start, budget)
        self.counts = Counts(self.counts.done + ended, self.counts.failed + failed)
        return self.counts


def bar_for_futures(futures, progress: object) -> Optional[ProgressBar]:
    """The bar of a wait on a FutureList, drawing; None if `progress` says
    not to draw."""
    file = sys.stderr
    if not should_draw(progress, file):
        return None
    return ProgressBar(_FutureTally(futures), len(futures), desc=futures._task_name(),
                       unit="runs", file=file)


def bar_for_results(results, total: Optional[int], desc: Optional[str],
                    progress: object) -> Optional[ProgressBar]:
    """The bar of an imap iterator (`results`, whose _taken() counts the
    results it gave out), drawing; None if `progress` says not to draw.
    It holds the iterator weakly: an iterator dropped unfinished is still
    collected (and closes the bar as it stops)."""
    file = sys.stderr
    if not should_draw(progress, file):
        return None
    ref = weakref.ref(results)

    def count(final: bool) -> Optional[Counts]:
        alive = ref()
        return None if alive is None else Counts(*alive._taken())

    return ProgressBar(count, total, desc=desc, unit="results", file=file)


# -- how it is drawn ----------------------------------------------------------

def _tqdm_class():
    """tqdm's bar class, or None if tqdm is not installed."""
    try:
        from tqdm.std import tqdm
    except ImportError:
        return None
    return tqdm


def _make_view(file, total, desc, unit, initial):
    tqdm = _tqdm_class()
    if tqdm is None:
        return _LineView(file, total, desc, unit, initial)
    return _TqdmView(tqdm, file, total, desc, unit, initial)


class _TqdmView:
    """A tqdm bar, driven by the counts rather than by tqdm's own timing."""

    def __init__(self, tqdm, file, total, desc, unit, initial):
        # Redrawn at every show(): the bar's thread already limits how often.
        # It draws the initial counts at once.
        self.bar = tqdm(total=total, desc=desc, unit=" " + unit.rstrip("s"), file=file,
                        mininterval=0, miniters=1, dynamic_ncols=True, leave=True,
                        initial=initial.done, postfix=f"{initial.failed} failed")

    def show(self, counts: Counts):
        self.bar.set_postfix_str(f"{counts.failed} failed", refresh=False)
        if counts.done > self.bar.n:
            self.bar.update(counts.done - self.bar.n)
        else:
            self.bar.refresh()      # the elapsed time and the rate move on

    def finish(self, counts: Counts):
        self.bar.set_postfix_str(f"{counts.failed} failed", refresh=False)
        self.bar.n = counts.done
        self.bar.close()            # draws the last line, and leaves it


class _LineView:
    """One line rewritten in place:
    `name:  42% 420/1000 runs, 3 failed, 812.5/s, ETA 0:00:01`; the last
    line gives the time taken in place of the time left."""

    def __init__(self, file, total, desc, unit, initial):
        self.file = file
        self.total = total
        self.desc = desc
        self.unit = unit
        self.started = time.monotonic()
        self.initial = initial.done     # the rate counts those that ended since
        self.width = 0                  # of the line drawn last, to blank its tail
        self.show(initial)

    def line(self, counts: Counts, final: bool) -> str:
        elapsed = time.monotonic() - self.started
        rate = (counts.done - self.initial) / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total is not None:
            percent = 100.0 * counts.done / self.total if self.total else 100.0
            head += f"{percent:3.0f}% {counts.done}/{self.total} {self.unit}"
        else:
            head += f"{counts.done} {self.unit}"
        parts = [head, f"{counts.failed} failed", f"{rate:.1f}/s"]
        if final:
            parts.append(f"in {_clock(elapsed)}")
        elif self.total is not None and rate > 0:
            parts.append(f"ETA {_clock(max(0, self.total - counts.done) / rate)}")
        return ", ".join(parts)

    def show(self, counts: Counts):
        self._write(self.line(counts, False), "")

    def finish(self, counts: Counts):
        self._write(self.line(counts, True), "\n")

    def _write(self, line: str, end: str):
        blank = " " * max(0, self.width - len(line))
        self.width = len(line)
        self.file.write(f"\r{line}{blank}{end}")
        self.file.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
