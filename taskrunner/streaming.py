"""imap(): a map that reads its input, and gives its results, as they are consumed.

    for result in runner.imap(task, {"x": records}):   # the consumer
        │ next()
        ▼
    Stream ── room in the window? ── read a chunk of rows off the iterables
        │                                     │
        │                        runner.map(task, chunk) ──> the runner's engine
        │                                     │                (threads, worker
        │                          a Chunk (its FutureList)     processes, Dask)
        │                          at the window's tail               │
        ▼                                                             ▼
    ordered:   the head chunk's items that are final, in order   <── runs end
    unordered: the items that are final, whichever chunk (each future's done
               callback puts it on `finished`)
        │
        └─> yielded; their room in the window is free for the next chunk

Each chunk is an ordinary map() of the runner, so every runner streams the
same way, with what its map() does: the process runner's batches and re-runs
after a worker dies, the Dask runner's packs, the engine's cancellation.

The state of one Stream:

    columns     (name, iterator, wrap) for each mapped parameter; `wrap` is
                the annotation every item is wrapped in (allow_failure or
                quote around an iterable), else None
    statics     the other parameters, each wrapped in unmapped()
    window      the chunks submitted and not yet wholly yielded, in input
                order (a deque of Chunk)
    unyielded   items read and not yet yielded: never more than `buffer`
    buffer      the window's size in items: the caller's, or (None) grown
                by `sizer` while a larger window gives results faster
    finished    unordered only: the numbers (in input order) of the items
                that ended and are not yet given (each chunk puts them
                there as they end: FutureList._notify_ends)
    exhausted   the input has ended (or has a length mismatch, `mismatch`,
                or raised `input_error`: raised once the results before are given)
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional

from taskrunner._engine import split_mapped
from taskrunner._futures import blocking
from taskrunner._mapped import FutureList
from taskrunner._stream import Results
from taskrunner.annotations import unmapped
from taskrunner.exceptions import MappingLengthMismatch
from taskrunner.progress import bar_for_results, checked_progress

if TYPE_CHECKING:
    from taskrunner.base import TaskRunner

__all__ = ["Stream", "checked_buffer", "open_stream"]

_log = logging.getLogger("taskrunner.engine")

# buffer=None: the window starts at MIN_PER_WORKER items a worker (at least
# MIN_AUTO_BUFFER) and doubles each time the consumer has to wait for a
# result, while it holds less than HORIZON_SECONDS of results at the rate
# they come, up to MAX_AUTO_BUFFER items (about 40 MB of small items).
MIN_PER_WORKER = 8
MIN_AUTO_BUFFER = 16
HORIZON_SECONDS = 1.0
EPOCH_SECONDS = 0.02        # the rate is measured over this long at least
UNTIMED_LIMIT = 1024        # the window's growth before the first rate is known
MAX_AUTO_BUFFER = 1 << 17
CHUNKS_PER_WINDOW = 8       # a new chunk is read when an eighth of the window is free
MAX_CHUNK = 16384


def checked_buffer(buffer):
    """`buffer` (None, or a positive int), else ValueError naming it."""
    if buffer is None:
        return None
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise ValueError(f"buffer must be a positive int or None, got {buffer!r}")
    return buffer


def open_stream(runner, task, parameters, ordered, buffer, wait_for, raise_on_failure,
                progress=False):
    """imap(): the checked call's iterator of results (see Results, in
    csrc/taskrunner/_stream.pyx, for its lifecycle), with its progress bar
    if `progress` says to draw one."""
    progress = checked_progress(progress)
    stream = Stream(runner, task, parameters, ordered, buffer, wait_for, raise_on_failure)
    results = Results(stream, bool(raise_on_failure), stream.task_name)
    if progress is not False:
        bar = bar_for_results(results, stream.input_length(), stream.task_name, progress)
        if bar is not None:
            results._show_progress(bar)
    return results


class Sizer:
    """The window of buffer=None: as large as keeps every worker busy.

    How large that is depends on the task's duration and on the runner's
    latency (a thread pool's microseconds, a cluster's milliseconds a round
    trip), neither known in advance; but a window too small shows itself:
    the consumer waits for results while workers could have been running
    more.  So the window doubles each time the consumer waits, unless it
    already holds HORIZON_SECONDS of results at the rate they come (the
    tasks are slow: the workers are the limit, and more read-ahead would
    cost memory for nothing).  The rate is measured over epochs of at least
    EPOCH_SECONDS; before the first one ends the window grows to at most
    UNTIMED_LIMIT."""

    def __init__(self, size):
        self.size = size
        self.epoch_start = None     # (results given, time) when this epoch began
        self.rate = None            # results a second, over the last epoch

    def size_after(self, given, now, waited):
        if self.epoch_start is None:
            # The first results open the first epoch: starting workers is
            # no part of any task's duration.
            self.epoch_start = (given, now)
            return self.size
        start_given, start_time = self.epoch_start
        if now - start_time >= EPOCH_SECONDS:
            self.rate = (given - start_given) / (now - start_time)
            self.epoch_start = (given, now)
        if waited and self.size < MAX_AUTO_BUFFER:
            limit = UNTIMED_LIMIT if self.rate is None else self.rate * HORIZON_SECONDS
            if 2 * self.size <= limit:
                self.size *= 2
        return self.size


@dataclass
class Chunk:
    """One map() of the stream: items `start` .. `start + size - 1` of the
    input, of which `taken` have been given (ordered: the first `taken`;
    unordered: those marked in `given`)."""
    futures: FutureList
    start: int
    size: int
    taken: int = 0
    given: Optional[bytearray] = None


class Stream:
    """The state behind the iterator imap() returns (Results, in
    csrc/taskrunner/_stream.pyx): reading, submitting, and the batches of
    results it gives out."""

    def __init__(self, runner: TaskRunner, task, parameters, ordered, buffer, wait_for,
                 raise_on_failure):
        self.runner = runner
        self.task = task
        self.task_name = getattr(task, "name", None) or getattr(task, "__name__", repr(task))
        # Read once, since every chunk waits for the same futures (map()
        # names a wait_for that is not an iterable of futures).
        self.wait_for = list(wait_for) if isinstance(wait_for, Iterable) else wait_for
        self.raise_on_failure = bool(raise_on_failure)
        self.ordered = bool(ordered)
        self.fixed_buffer = checked_buffer(buffer)
        self.columns, self.statics = self._split(parameters)
        # Everything about the call but the items (the task, names, bound
        # parameters, picklability of the others) is checked here, by a map
        # of no item, so that a bad call fails at the call.
        runner.map(task, {**self.statics, **{name: [] for name, _, _ in self.columns}},
                   wait_for=self.wait_for)
        self.buffer = self.fixed_buffer or max(MIN_AUTO_BUFFER,
                                               MIN_PER_WORKER * max(1, runner._parallelism()))
        self.window: collections.deque = collections.deque()
        self.unyielded = 0
        self.read = 0
        self.yielded = 0
        self.sizer = Sizer(self.buffer) if self.fixed_buffer is None else None
        self.finished: Optional[queue.SimpleQueue] = None if ordered else queue.SimpleQueue()
        self.exhausted = False
        self.mismatch: Optional[MappingLengthMismatch] = None
        self.input_error: Optional[Exception] = None

    def _split(self, parameters):
        """The mapped columns, (name, iterator, wrap), and the static
        parameters, each wrapped in unmapped(), by map()'s rules."""
        mapped, statics = split_mapped(parameters, "imap", self.task_name)
        self.inputs = [value for _, value, _ in mapped]
        columns = [(name, iter(value), wrap) for name, value, wrap in mapped]
        return columns, {name: unmapped(value) for name, value in statics.items()}

    def input_length(self):
        """How many items the input has, if every iterable has a len()
        (the shortest, as they are zipped); else None."""
        lengths = []
        for value in self.inputs:
            try:
                lengths.append(len(value))
            except TypeError:
                return None
        return min(lengths)

    # -- reading and submitting ---------------------------------------------

    def _chunk_size(self):
        return max(1, min(MAX_CHUNK, self.buffer // CHUNKS_PER_WINDOW))

    def _refill(self):
        """Read and submit chunks while the window has room for one."""
        while not self.exhausted:
            size = self._chunk_size()
            if self.unyielded + size > self.buffer:
                if self.unyielded:
                    return
                size = self.buffer
            rows = self._read(size)
            if not rows:
                return
            futures = self.runner.map(self.task, {**self.statics, **rows},
                                      wait_for=self.wait_for)
            count = len(futures)
            self.read += count
            self.unyielded += count
            chunk = Chunk(futures, self.read - count, count)
            self.window.append(chunk)
            if not self.ordered:
                chunk.given = bytearray(count)
                futures._notify_ends(self.finished, chunk.start)

    def _read(self, size):
        """The next `size` rows at most, as {name: list of items}; marks the
        input exhausted when a column ends (and a mismatch if not all do),
        or raises: then the rows read before the error go on, and the error
        is raised once their results are given."""
        lists = []
        for _, it, _ in self.columns:
            items = []
            try:
                items.extend(itertools.islice(it, size))    # keeps what came before an error
            except Exception as error:
                self.input_error = self.input_error or error
            lists.append(items)
        lengths = [len(items) for items in lists]
        shortest = min(lengths)
        if shortest < size or self.input_error is not None:
            self.exhausted = True
            # Equal lengths, fewer than asked: every column ended there.
            if max(lengths) != shortest and self.input_error is None:
                self.mismatch = self._mismatch(lengths, size)
            lists = [items[:shortest] for items in lists]
        if not shortest:
            return None
        rows = {}
        for (name, _, wrap), items in zip(self.columns, lists):
            rows[name] = [wrap(item) for item in items] if wrap is not None else items
        return rows

    def _mismatch(self, lengths, size):
        counts = []
        for (name, _, _), length in zip(self.columns, lengths):
            if length < size:
                counts.append(f"{name!r} has {self.read + length}")
            else:
                counts.append(f"{name!r} has more than {self.read + length}")
        return MappingLengthMismatch(
            f"imap of task {self.task_name!r}: the iterable parameters differ in length "
            f"({', '.join(counts)})")

    def _grow(self, waited):
        if self.sizer is not None:
            self.buffer = self.sizer.size_after(self.yielded, time.monotonic(), waited)

    # -- giving results -----------------------------------------------------

    def next_batch(self):
        """Refill the window, wait, and return the next results as (values,
        failed): `failed` the positions of the items that did not complete,
        whose values are their exceptions.  None once every item is given;
        MappingLengthMismatch then if the iterables differ in length."""
        self._refill()
        if self.ordered:
            if not self.window:
                return self._done()
            chunk = self.window[0]
            values, failed, waited = chunk.futures._final_prefix(chunk.taken, chunk.size)
            chunk.taken += len(values)
            if chunk.taken == chunk.size:
                self.window.popleft()
        else:
            if not self.window:
                return self._done()
            values, failed, waited = self._take_finished()
        # The window is refilled only between batches: its room is counted
        # once for the whole batch.
        self.unyielded -= len(values)
        self.yielded += len(values)
        self._grow(waited)
        return values, failed

    def _take_finished(self):
        """Unordered: wait for an item to end, and take every item ended;
        and whether it had to wait (or fetch)."""
        waited = self.finished.empty()
        with blocking():
            numbers = [self.finished.get()]
        while True:
            try:
                numbers.append(self.finished.get_nowait())
            except queue.Empty:
                break
        numbers.sort()
        values, failed = [], []
        window = self.window
        at, taking = 0, []
        for number in numbers:
            while at < len(window) and number >= window[at].start + window[at].size:
                waited |= self._take_from(window[at], taking, values, failed)
                at, taking = at + 1, []
            if at == len(window):
                break
            chunk = window[at]
            position = number - chunk.start
            # A number may come twice, the second time after its chunk went.
            if position >= 0 and not chunk.given[position]:
                chunk.given[position] = 1
                taking.append(position)
        if at < len(window):
            waited |= self._take_from(window[at], taking, values, failed)
        # A chunk goes once all its items are given: a slow item keeps its
        # own chunk's arrays (a few bytes an item), not the values given.
        if any(chunk.taken == chunk.size for chunk in window):
            self.window = collections.deque(c for c in window if c.taken < c.size)
        return values, failed, waited

    @staticmethod
    def _take_from(chunk, positions, values, failed):
        """Take the items at `positions` of `chunk` onto values and failed;
        whether they had to be fetched."""
        if not positions:
            return False
        these, their_failed, fetched = chunk.futures._take_final(positions)
        failed.extend(len(values) + at for at in their_failed)
        values.extend(these)
        chunk.taken += len(positions)
        return fetched

    def _done(self):
        if self.input_error is not None:
            raise self.input_error
        if self.mismatch is not None:
            raise self.mismatch
        return None

    def cancel_rest(self, wait=True):
        """Stop: cancel the runs of the window not started, read no more.
        Without `wait` (for a Ctrl-C, which must reach the user at once)
        the runs sent on elsewhere are taken back on a thread of its own:
        that may take a round trip to a cluster."""
        self.exhausted = True
        lists = [chunk.futures for chunk in self.window]
        self.window.clear()
        engine = getattr(self.runner, "_engine", None)
        if engine is None:
            for futures in lists:
                for future in futures:
                    future.cancel()
            return
        for futures in lists:
            engine.cancel_unstarted(futures, recall=wait)
        if not wait and lists:
            threading.Thread(target=_take_back, args=(engine, lists), daemon=True,
                             name="taskrunner-imap-recall").start()


def _take_back(engine, lists):
    """Cancel the runs of `lists` (FutureLists) sent on and not started."""
    try:
        for futures in lists:
            engine.cancel_unstarted(futures)
    except Exception:
        _log.exception("could not take back the runs of an imap() that was interrupted")
