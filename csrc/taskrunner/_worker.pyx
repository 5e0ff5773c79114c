# cython: language_level=3, boundscheck=False, wraparound=False
"""The loop a ProcessPoolTaskRunner worker process runs, and the control
block it shares with the parent.

The parent sends batches of runs, each run numbered (its sequence number,
increasing per worker), every number in a batch once, in order.  The worker
answers every number, in order: with a result, an error, or "skipped" (a
run in a group of function SKIP, which the parent could not send, or one
in the stop window).  It sends results back in batches, at least every
FLUSH_SECONDS while a batch is long, so results stream; each message holds
consecutive runs.  From the moment it waits for a batch until it has
unpickled it, its control block says it is loading.  Before starting a run
it writes the run's number as started and checks the block's stop window:
a run inside the window is not started but reported as skipped.  After the
run it writes the number as finished.  So the parent knows, if the worker
dies, which run killed it (started, not finished) and which runs to run
again; and it can take back runs it sent that have not started, to run
them elsewhere while this worker is busy with a long run (not while it is
loading: a batch slow to arrive or to unpickle would be as slow on another
worker, and taking it back would only move the wait).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.ref cimport Py_INCREF
from libc.math cimport NAN

from taskrunner._calls cimport TaskLoop, awaited
from taskrunner._params cimport is_plain

cdef extern from *:
    """
    #if defined(__GLIBC__)
    #include <malloc.h>
    static void tr_keep_freed(int bytes) {
        mallopt(M_TRIM_THRESHOLD, bytes);
        mallopt(M_MMAP_THRESHOLD, bytes / 2);
    }
    #else
    static void tr_keep_freed(int bytes) { (void)bytes; }
    #endif
    """
    void tr_keep_freed(int nbytes) nogil

cdef extern from "sync.h" nogil:
    void tr_store64(volatile long long*, long long)
    void tr_release64(volatile long long*, long long)
    long long tr_load64(volatile long long*)
    double tr_monotonic()

import ctypes
import os
from array import array
import pickle
import threading
import time
import traceback

from taskrunner._logging import Forwarder, install_forwarder
from taskrunner._pickling import dumps
from taskrunner._process.wire import BATCH_SECONDS, SKIP, Answers, BadBatch, Done, InitFailed, Logged, Ready

# What a worker keeps of the memory it frees (see the module docstring);
# blocks of half that or more are mapped apart, and freed at once.
cdef int KEEP_FREED_BYTES = 64 << 20

cdef Py_ssize_t _BLOCK_WORDS = 8    # a 64-byte cache line per worker: no false sharing
BLOCK_WORDS = _BLOCK_WORDS
# As long as a batch aims to take: one message a batch, results at most
# that late.
cdef double FLUSH_SECONDS = BATCH_SECONDS

cdef enum:
    STARTED = 0                 # the run it started last
    FINISHED = 1                # the run it finished (or skipped) last
    STOP_FROM = 2               # it must not start runs STOP_FROM <= n < STOP_TO
    STOP_TO = 3
    LOADING = 4                 # 1 while it waits for, reads or unpickles a batch
    STARTED_AT = 5              # when it started the run STARTED (tr_monotonic, in ns)


cdef class ControlBlock:
    """One worker's words in memory shared with the parent (a RawArray of
    int64, BLOCK_WORDS per worker)."""
    cdef volatile long long* words
    cdef object shared          # keeps the shared memory mapped

    def __cinit__(self, shared, Py_ssize_t index):
        if index < 0 or (index + 1) * _BLOCK_WORDS > len(shared):
            raise IndexError(f"no control block {index} in shared memory of {len(shared)} words")
        self.shared = shared
        self.words = <volatile long long*><size_t>ctypes.addressof(shared) + index * _BLOCK_WORDS

    def reset(self):
        tr_store64(&self.words[STARTED], -1)
        tr_store64(&self.words[FINISHED], -1)
        tr_store64(&self.words[STOP_FROM], 0)
        tr_store64(&self.words[STOP_TO], 0)
        tr_store64(&self.words[LOADING], 1)

    @property
    def started(self):
        return tr_load64(&self.words[STARTED])

    @property
    def started_at(self):
        """When the run `started` started, in time.monotonic() seconds
        (CLOCK_MONOTONIC: the same clock in every process of the machine)."""
        return tr_load64(&self.words[STARTED_AT]) * 1e-9

    @property
    def finished(self):
        return tr_load64(&self.words[FINISHED])

    @property
    def loading(self):
        return tr_load64(&self.words[LOADING]) != 0

    @property
    def stop_window(self):
        return tr_load64(&self.words[STOP_FROM]), tr_load64(&self.words[STOP_TO])

    def stop(self, long long first, long long end):
        """Tell the worker not to start runs first <= n < end.  Returns the
        run it started last, read after: a run after that one, inside the
        window, is sure never to start."""
        tr_store64(&self.words[STOP_TO], end)
        tr_store64(&self.words[STOP_FROM], first)
        return tr_load64(&self.words[STARTED])

    cdef bint may_start(self, long long seq, bint timed) noexcept:
        """Announce run `seq` and say whether it may start.  `timed`: its
        task has a timeout, and the parent watches when it started."""
        cdef long long first, end
        # The time first: a parent reading `started` then `started_at` gets
        # this run's start or a later one's, never an earlier (so it never
        # finds a run older than it is).  An untimed run leaves the time of
        # the last timed one: the parent looks at it only for a timed run,
        # and reading the clock would cost more than many a task.
        if timed:
            tr_release64(&self.words[STARTED_AT], <long long>(tr_monotonic() * 1e9))
        tr_store64(&self.words[STARTED], seq)
        first = tr_load64(&self.words[STOP_FROM])
        end = tr_load64(&self.words[STOP_TO])
        return not (first <= seq < end)

    cdef void finish(self, long long seq) noexcept:
        tr_release64(&self.words[FINISHED], seq)

    cdef void set_loading(self, bint loading) noexcept:
        tr_store64(&self.words[LOADING], 1 if loading else 0)


def _describe(exc):
    """An exception and its traceback text, as the parent will get them."""
    return exc, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


cdef class _Results:
    """Results of consecutive runs, waiting to be sent.

    The main loop adds results; they leave at the end of each batch, every
    FLUSH_SECONDS during a long stretch of quick runs, and, from a flusher
    thread, when a run takes long while earlier results wait.  Each change
    the main loop makes, and the flusher's taking of what is held, runs with
    no allocation and no Python call in between, so under the GIL neither
    sees the other half done.
    """
    cdef object conn
    cdef object send_lock
    cdef long long first        # the number of the first run held
    cdef list values            # one per run; None where it failed or was skipped
    cdef dict errors            # run -> (exception, traceback text)
    cdef list skipped
    cdef double busy            # seconds spent in tasks, up to `mark`
    cdef double mark            # when busy was last brought up to date
    cdef list spans             # (first run, task name) of each group held
    cdef double last_send
    cdef bint stopped
    cdef bint due               # set by the flusher: the main loop sends after this run
    cdef bint traced            # the parent keeps a run trace: times go with the results
    cdef list times             # traced: (start, end) of each run held, flat; NaN if skipped

    def __cinit__(self, conn, bint traced=False):
        self.conn = conn
        self.send_lock = threading.Lock()
        self.traced = traced
        self.times = []
        self.values = []
        self.errors = {}
        self.skipped = []
        self.spans = []
        self.last_send = tr_monotonic()

    cdef void start_group(self, long long first, str name):
        if self.values and first != self.first + len(self.values):
            self.flush()        # a message holds consecutive runs only
        if not self.values:
            self.first = first
        self.spans.append((first, name))
        self.mark = tr_monotonic()

    cdef void end_group(self):
        cdef double now = tr_monotonic()
        self.busy += now - self.mark
        self.mark = now

    cdef void add(self, object value):
        self.values.append(value)

    cdef void add_times(self, double start, double end):
        # Called right before the run's add: floats and a list append
        # allocate nothing the cyclic GC tracks, so no other thread (the
        # flusher) can run in between and take one without the other.
        self.times.append(start)
        self.times.append(end)

    cdef void add_error(self, object run, tuple described):
        self.values.append(None)
        self.errors[run] = described

    cdef void add_skipped(self, object run):
        if self.traced:
            self.add_times(NAN, NAN)
        self.values.append(None)
        self.skipped.append(run)

    cdef tuple _take(self):
        """What is held, as a message, leaving nothing held."""
        cdef list values = [], skipped = [], spans = [], times = []
        cdef dict errors = {}
        cdef list old_values, old_skipped, old_spans, old_times
        cdef dict old_errors
        cdef long long first
        cdef double busy, now
        if self.spans:
            spans.append(self.spans[len(self.spans) - 1])
        # No allocation from here to the end of the swap.
        first = self.first
        now = tr_monotonic()
        busy = self.busy + (now - self.mark)
        self.mark = now
        old_values, old_errors, old_skipped, old_spans, old_times = (
            self.values, self.errors, self.skipped, self.spans, self.times)
        self.values, self.errors, self.skipped, self.spans, self.times = (
            values, errors, skipped, spans, times)
        self.first = first + len(old_values)
        self.busy = 0.0
        return first, old_values, old_errors, old_skipped, busy, old_spans, old_times

    cdef flush(self):
        """Send what is held, if anything."""
        self.due = False
        if not self.values:
            return
        first, values, errors, skipped, busy, spans, times = self._take()
        # The results go as bytes inside the message: if the parent cannot
        # load them after all, it still knows which runs they were for.
        body = _dumped_results(first, values, errors, skipped, spans)
        data = pickle.dumps(Done(first, len(values), busy, body,
                                 array("d", times).tobytes() if self.traced else None),
                            pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            self.conn.send_bytes(data)
            self.last_send = tr_monotonic()

    def flush_late(self):
        """The flusher thread: every FLUSH_SECONDS, ask the main loop to send
        what it holds after its current run (reading the clock once per run
        would cost it more than many a task); if a run outlasts that, send
        what waits behind it from here."""
        while not self.stopped:
            time.sleep(FLUSH_SECONDS)
            if not self.values or tr_monotonic() - self.last_send < FLUSH_SECONDS:
                continue
            if self.due:
                self.flush()
            else:
                self.due = True


# Results travel packed when they are all ints of 64 bits or all floats:
# pickle spends about 30 ns on each such value at each end, a copy about 1.
cdef enum:
    _MIN_PACKED = 64        # fewer values: the list is as cheap


cdef object _packed(list values):
    """("q" or "d", bytes) standing for `values`, or `values` itself."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(values)
    cdef object first, item
    cdef bytes data
    cdef long long* ints
    cdef double* floats
    cdef int overflow = 0
    if n < _MIN_PACKED:
        return values
    first = <object>PyList_GET_ITEM(values, 0)
    if type(first) is int:
        data = PyBytes_FromStringAndSize(NULL, n * 8)
        ints = <long long*>PyBytes_AS_STRING(data)
        for i in range(n):
            item = <object>PyList_GET_ITEM(values, i)
            if type(item) is not int:
                return values
            ints[i] = PyLong_AsLongLongAndOverflow(item, &overflow)
            if overflow:
                return values
        return ("q", data)
    if type(first) is float:
        data = PyBytes_FromStringAndSize(NULL, n * 8)
        floats = <double*>PyBytes_AS_STRING(data)
        for i in range(n):
            item = <object>PyList_GET_ITEM(values, i)
            if type(item) is not float:
                return values
            floats[i] = PyFloat_AS_DOUBLE(item)
        return ("d", data)
    return values


def unpacked(values):
    """The list of results a worker's message stands for (see _packed)."""
    cdef Py_ssize_t i, n
    cdef const long long* ints
    cdef const double* floats
    cdef list out
    cdef object item
    if type(values) is not tuple:
        return values
    kind, data = values
    n = len(data) // 8
    out = PyList_New(n)
    if kind == "q":
        ints = <const long long*>PyBytes_AS_STRING(data)
        for i in range(n):
            item = ints[i]
            Py_INCREF(item)
            PyList_SET_ITEM(out, i, item)
    else:
        floats = <const double*>PyBytes_AS_STRING(data)
        for i in range(n):
            item = floats[i]
            Py_INCREF(item)
            PyList_SET_ITEM(out, i, item)
    return out


cdef str _name_of(list spans, long long run):
    for first, name in reversed(spans):
        if run >= first:
            return name
    return "?"


cdef bytes _dumped_results(long long first, list values, dict errors, list skipped,
                           list spans):
    """(values, errors, skipped) pickled so that the parent can load them.
    A value of a class pickle finds only by value (one of __main__, say)
    goes with cloudpickle.  Results of other than plain types make the round
    trip here first: any value or exception that cannot is replaced by an
    error saying so, and that run fails alone."""
    cdef bytes data
    try:
        packed = _packed(values)
        data = dumps(Answers(packed, errors, skipped))
        # (Packed values are plain by construction.)
        if errors or (packed is values and not _all_plain(values)):
            pickle.loads(data)
        return data
    except Exception:
        pass
    _make_round_trippable(first, values, errors, spans)
    return dumps(Answers(values, errors, skipped))


cdef bint _all_plain(list values):
    for value in values:
        if not is_plain(value):
            return False
    return True


cdef void _make_round_trippable(long long first, list values, dict errors, list spans):
    """Replace each value and exception that does not survive pickling and
    unpickling by an error saying so."""
    cdef Py_ssize_t i
    for i in range(len(values)):
        run = first + i
        try:
            pickle.loads(dumps(values[i]))
        except Exception as err:
            # TypeError, as for an unpicklable parameter, and as on Dask.
            errors[run] = (TypeError(
                f"the result of task {_name_of(spans, run)!r}, a {type(values[i]).__name__}, "
                f"cannot be pickled (and unpickled) to go back: {err!r}"), "")
            values[i] = None
    for run, (exc, text) in list(errors.items()):
        try:
            pickle.loads(dumps(exc))
        except Exception as err:
            errors[run] = (TypeError(
                f"task {_name_of(spans, run)!r} raised {type(exc).__name__}: {exc}, which "
                f"cannot be pickled (and unpickled) to go back: {err!r}"), text)


def serve(task_conn, result_conn, shared, Py_ssize_t index, bytes setup, bint traced=False,
          log_config=None):
    """The main loop of worker `index`: run the initializer, then the
    batches that come through `task_conn`, until None or EOF.  `traced`:
    each answer carries when its run started and ended (the parent keeps a
    run trace).  What is logged here goes to the parent (see
    _logging.install_forwarder), with the levels of `log_config`."""
    cdef ControlBlock block = ControlBlock(shared, index)
    cdef _Results results = _Results(result_conn, traced)
    cdef TaskLoop loop = TaskLoop()
    cdef dict functions = {}
    tr_keep_freed(KEEP_FREED_BYTES)
    flusher = threading.Thread(target=results.flush_late, name="taskrunner-flusher", daemon=True)
    install_forwarder(Forwarder(_RecordSender(results), _RunNow(block, results)), log_config)
    try:
        initializer, initargs = pickle.loads(setup)
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:
        result_conn.send_bytes(pickle.dumps(InitFailed(_describe(exc)[1])))
        return
    result_conn.send_bytes(pickle.dumps(Ready(os.getpid())))
    flusher.start()
    while True:
        block.set_loading(True)
        try:
            data = task_conn.recv_bytes()
        except (EOFError, OSError):
            break
        batch = pickle.loads(data)
        if batch is None:
            break
        if batch.forget:
            functions.clear()
        for function in batch.functions:
            try:
                functions[function.id] = (pickle.loads(function.blob), function.is_async,
                                          function.name, None)
            except BaseException as exc:
                # Every run of it fails with the reason, not the worker.
                functions[function.id] = (None, False, function.name, exc)
        try:
            groups = pickle.loads(batch.groups)
        except BaseException as exc:
            with results.send_lock:
                result_conn.send_bytes(pickle.dumps(BadBatch(_describe(exc)[1])))
            continue
        block.set_loading(False)
        for function_id, first, args_list, kwargs_list, single, timed in groups:
            if function_id == SKIP:
                _skip_group(first, len(args_list), block, results)
                continue
            _run_group(functions[function_id], first, args_list, kwargs_list, single, timed,
                       block, results, loop)
        results.flush()
    results.stopped = True
    loop.close()


@cython.final
cdef class _RecordSender:
    """Sends a record up the result pipe at once: before the answer to the
    run that logged it, which the parent needs to name the run."""
    cdef _Results results

    def __cinit__(self, _Results results):
        self.results = results

    def __call__(self, long long run, task_name, bytes record):
        data = pickle.dumps(Logged(run, task_name, record), pickle.HIGHEST_PROTOCOL)
        with self.results.send_lock:
            self.results.conn.send_bytes(data)


@cython.final
cdef class _RunNow:
    """(number, task name) of the run this worker is running, or (-1,
    None): read off the control block, so that a run costs nothing more
    for the records it might log."""
    cdef ControlBlock block
    cdef _Results results

    def __cinit__(self, ControlBlock block, _Results results):
        self.block = block
        self.results = results

    def __call__(self):
        cdef long long started = tr_load64(&self.block.words[STARTED])
        if started > tr_load64(&self.block.words[FINISHED]):
            return started, _name_of(self.results.spans, started)
        return -1, None


cdef _skip_group(long long first, Py_ssize_t n, ControlBlock block, _Results results):
    cdef Py_ssize_t i
    results.start_group(first, "?")
    for i in range(n):
        results.add_skipped(first + i)
        block.finish(first + i)
    results.end_group()


cdef _run_group(tuple function, long long first, object args_list, list kwargs_list,
                bint single, bint timed, ControlBlock block, _Results results,
                TaskLoop loop):
    """Run one stretch of runs of one function.  With `single`, args_list
    (a list or a range) holds each run's only argument rather than its
    argument tuple.  `timed`: the function's task has a timeout."""
    fn, is_async, name, load_error = function
    cdef Py_ssize_t i, n = len(args_list)
    cdef long long run
    cdef double started = 0.0, ended
    cdef bint traced = results.traced
    # Iterated, not indexed: an item of a range made by its iterator costs
    # a fraction of one made by range[i].
    arguments = iter(args_list)
    results.start_group(first, name)
    for i in range(n):
        run = first + i
        args = next(arguments)
        if not block.may_start(run, timed):
            results.add_skipped(run)
            block.finish(run)
            continue
        if traced:
            started = tr_monotonic()
        try:
            if load_error is not None:
                raise load_error
            if single:
                value = fn(args)
            elif kwargs_list is None or kwargs_list[i] is None:
                value = fn(*args)
            else:
                value = fn(*args, **kwargs_list[i])
            value = awaited(value, is_async, loop)
        except BaseException as exc:
            ended = tr_monotonic() if traced else 0.0
            described = _describe(exc)
            if traced:
                results.add_times(started, ended)
            results.add_error(run, described)
        else:
            if traced:
                results.add_times(started, tr_monotonic())
            results.add(value)
        block.finish(run)
        if results.due:
            results.flush()
    results.end_group()
