# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The run trace: `trace="run.json"` on a runner records every attempt of
every run, and when the runner exits writes a Chrome trace-event file
(Perfetto, chrome://tracing).

While the runner runs, only raw records are made, in C arrays that grow by
doubling: a slice is (run key, track, start, end, task, state), an edge is
(upstream key, downstream key).  Consumers record a slice around each call
(the thread runner's consumer loop; the parent of a process worker from the
times the worker sends back; the Dask backend from the times its workers
keep), the engine records the edges when it adds runs.  Everything else is
worked out at exit, in write(): attempts (a run's slices in time order are
its attempts 1, 2, ...), the wait between a failed attempt and the next
("retry wait"), the flow arrows along edges, the tracks' names.

Run keys.  A run's id in the file is its future's task_run_id.  Making a
uuid4 for every run would cost more than the run, so the trace gives a run
whose id nobody has read yet one of its own: the trace's random version-4
prefix with a counter k in the last 48 bits.  The future keeps k as its
`_uuid` (an int: no more than a small int to make), and task_run_id asks
the engine's trace for the UUID when it is read.  A map's items, which have
no future, get a range of counters when the map is made, and a future made
for item i later takes the i-th (see MapBlock.hand_over).  Key k < FOREIGN
is the run whose id is prefix + k; a run whose UUID was made before the
trace saw it is keyed FOREIGN + its index in `foreign_text`.

Times are tr_monotonic() seconds (CLOCK_MONOTONIC: one clock for every
process of the machine), written as microseconds since the trace began.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Contains
from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport PyObject
from libc.math cimport isnan, llround
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.stdio cimport FILE, fclose, fdopen, ferror, fwrite
from libc.string cimport memcpy
from libc.stdlib cimport free, malloc, realloc

from taskrunner._futures cimport EngineBase, TaskFuture, is_item
from taskrunner._graph cimport COMPLETED, CRASHED, FAILED, tr_monotonic
from taskrunner._mapped cimport MapBlock, RunList, block_of, handed, index_of
from taskrunner._params cimport Upstream, Upstreams

import heapq
import json
import os
import threading
import uuid
from typing import NamedTuple

from taskrunner._graph import STATES

cdef int64_t FOREIGN = (<int64_t>1) << 48
cdef int64_t _LOW = FOREIGN - 1

# The names the file gives the states an attempt ends in (as State.name).
_STATE_NAMES = {code: name.capitalize() for name, code in STATES.items()}
STATE_OF = {"completed": COMPLETED, "failed": FAILED, "crashed": CRASHED}


class Track(NamedTuple):
    """A row of the trace: one worker thread, process or Dask worker thread."""
    group: str      # the process row it is in ("pid" in the file)
    label: str      # its own name ("tid")


class Wait(NamedTuple):
    """A span a run spent waiting: for its next attempt, or for a limit."""
    key: int
    name: int       # index into the task names
    start: float
    end: float
    label: str


cdef void* _realloc(void* p, size_t size) except NULL:
    """realloc(), or MemoryError (p is left as it was: still freed later)."""
    cdef void* grown = realloc(p, size)
    if grown == NULL:
        raise MemoryError()
    return grown


@cython.final
cdef class Trace:
    """The records of one entered runner (see the module docstring)."""

    def __cinit__(self):
        self.t0 = tr_monotonic()
        self.cap = 1024
        self.starts = <double*>malloc(self.cap * sizeof(double))
        self.ends = <double*>malloc(self.cap * sizeof(double))
        self.keys = <int64_t*>malloc(self.cap * sizeof(int64_t))
        self.tracks = <int32_t*>malloc(self.cap * sizeof(int32_t))
        self.names = <int32_t*>malloc(self.cap * sizeof(int32_t))
        self.states = <uint8_t*>malloc(self.cap)
        self.cap_edges = 256
        self.edges = <int64_t*>malloc(2 * self.cap_edges * sizeof(int64_t))
        if (self.starts == NULL or self.ends == NULL or self.keys == NULL or self.tracks == NULL
                or self.names == NULL or self.states == NULL or self.edges == NULL):
            raise MemoryError()
        base = uuid.uuid4().int & ~_LOW
        self.prefix = base
        self.prefix_text = str(uuid.UUID(int=base))[:24].encode()
        self.foreign = {}
        self.foreign_text = []
        self.name_of_spec = {}
        self.task_names = []
        self.last_name = -1
        self.track_of = {}
        self.track_list = []
        self.waits = []

    def __dealloc__(self):
        self._release()

    # -- keys and names ----------------------------------------------------------

    cdef int64_t key_of_future(self, TaskFuture fut) except? -1:
        cdef object made = fut._uuid
        cdef int64_t key
        if made is None:
            key = self.next_id
            self.next_id += 1
            fut._uuid = key
            return key
        if type(made) is int:
            return made         # only this engine's trace keys its runs
        offset = made.int - self.prefix
        if 0 <= offset < self.next_id:
            return <int64_t>offset      # read as a UUID since
        found = self.foreign.get(made)
        if found is None:
            found = self.foreign[made] = FOREIGN + len(self.foreign_text)
            self.foreign_text.append(str(made).encode())
        return <int64_t>found

    cdef int64_t key_of(self, void* payload) except? -1:
        cdef MapBlock block
        cdef Py_ssize_t i
        if not is_item(payload):
            return self.key_of_future(<TaskFuture>payload)
        block = block_of(payload)
        i = index_of(payload, block)
        if handed(block, i) != NULL:
            return self.key_of_future(<TaskFuture>handed(block, i))
        if not block.traced:
            self._number_block(block)
        return block.trace_key + i

    cdef int _number_block(self, MapBlock block) except -1:
        """Ids for a block's items, in one range: a future made for an item
        later takes its id (MapBlock.hand_over)."""
        block.trace_key = self.next_id
        block.traced = True
        self.next_id += block.n
        return 0

    cdef int32_t _name_of(self, object spec) except -1:
        cdef int32_t index
        if spec is self.last_spec:
            return self.last_name
        found = self.name_of_spec.get(spec)
        if found is None:
            index = len(self.task_names)
            self.task_names.append(spec.name)
            # Held: a spec evicted from the engine's cache must not be
            # freed and its address reused by another task's.
            self.name_of_spec[spec] = index
        else:
            index = found
        self.last_spec = spec
        self.last_name = index
        return index

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = 2 * self.cap
        self.starts = <double*>_realloc(self.starts, cap * sizeof(double))
        self.ends = <double*>_realloc(self.ends, cap * sizeof(double))
        self.keys = <int64_t*>_realloc(self.keys, cap * sizeof(int64_t))
        self.tracks = <int32_t*>_realloc(self.tracks, cap * sizeof(int32_t))
        self.names = <int32_t*>_realloc(self.names, cap * sizeof(int32_t))
        self.states = <uint8_t*>_realloc(self.states, cap)
        self.cap = cap
        return 0

    cdef int _slice(self, int64_t key, int32_t name, int32_t track, double start, double end,
                    uint8_t state) except -1:
        cdef Py_ssize_t i = self.n
        if self.closed:
            return 0
        if i == self.cap:
            self._grow()
        self.starts[i] = start
        self.ends[i] = end
        self.keys[i] = key
        self.tracks[i] = track
        self.names[i] = name
        self.states[i] = state
        self.n = i + 1
        return 0

    # -- recording -----------------------------------------------------------------

    cdef void add(self, void* payload, int32_t track, double start, double end,
                  uint8_t state) noexcept:
        """One attempt of the run `payload` (a taken run's) on `track`.
        Never raises: a consumer holding a run must not lose it to the
        trace; a record it has no memory for is dropped, and counted."""
        cdef object spec
        try:
            spec = block_of(payload).spec if is_item(payload) else (<TaskFuture>payload)._spec
            self._slice(self.key_of(payload), self._name_of(spec), track, start, end, state)
        except BaseException:
            self.dropped += 1

    cdef int add_edge(self, int64_t up, int64_t down) except -1:
        if self.closed:
            return 0
        if self.n_edges == self.cap_edges:
            self.edges = <int64_t*>_realloc(self.edges, 4 * self.cap_edges * sizeof(int64_t))
            self.cap_edges *= 2
        self.edges[2 * self.n_edges] = up
        self.edges[2 * self.n_edges + 1] = down
        self.n_edges += 1
        return 0

    cdef int add_edges_from(self, EngineBase engine, int64_t down, Upstream* ups,
                            Py_ssize_t n) except -1:
        """Edges to `down` from the upstreams of this engine among `ups`
        (an upstream of another runner is in that runner's trace)."""
        cdef Py_ssize_t i
        cdef TaskFuture up
        for i in range(n):
            up = <TaskFuture>ups[i].future
            if up._engine is engine:
                self.add_edge(self.key_of_future(up), down)
        return 0

    cdef int add_run_edges(self, EngineBase engine, PyObject** futs, Py_ssize_t n,
                           Upstreams* shared, Upstreams* own, Py_ssize_t* first) except -1:
        """The edges of runs just added (Engine._register's arguments)."""
        cdef Py_ssize_t i
        cdef int64_t down
        if shared.len == 0 and first == NULL:
            return 0
        for i in range(n):
            down = self.key_of_future(<TaskFuture>futs[i])
            self.add_edges_from(engine, down, shared.items, shared.len)
            if first != NULL:
                self.add_edges_from(engine, down, own.items + first[i], first[i + 1] - first[i])
        return 0

    cdef int add_item_edges(self, EngineBase engine, MapBlock block, Py_ssize_t lo,
                            Py_ssize_t hi, Upstreams* shared) except -1:
        """The edges of a block's items lo .. hi-1, about to be added; the
        first time, the ids of all its items."""
        cdef Py_ssize_t i
        cdef int64_t down
        if not block.traced:
            self._number_block(block)
        if shared.len == 0:
            return 0
        for i in range(lo, hi):
            down = block.trace_key + i
            self.add_edges_from(engine, down, shared.items, shared.len)
        return 0

    cdef int limit_wait_of(self, void* payload, double start, double end, object tag) except -1:
        cdef int64_t key = self.key_of(payload)
        cdef object spec = (block_of(payload).spec if is_item(payload)
                            else (<TaskFuture>payload)._spec)
        if not self.closed:
            self.waits.append(Wait(key, self._name_of(spec), start, end,
                                   f"waiting for limit {tag}"))
        return 0

    # -- the runners' Python side ---------------------------------------------------

    def track(self, key, str group, str label):
        """The index of the track `key` stands for (a thread, a worker
        process, a Dask worker's thread), made the first time: `label`
        names it, in the process row `group`."""
        found = self.track_of.get(key)
        if found is not None:
            return found
        index = len(self.track_list)
        self.track_list.append(Track(group, label))
        self.track_of[key] = index
        return index

    def thread_track(self):
        """The track of the calling thread, a consumer of this process."""
        thread = threading.current_thread()
        return self.track((threading.get_ident(), thread.name), f"threads (pid {os.getpid()})",
                          thread.name)

    def add_answers(self, RunList runs, int32_t track, bytes times, long long first,
                    dict errors):
        """The attempts of runs a worker process answered: `times` holds a
        (start, end) pair of doubles for each run (NaN: skipped, never
        started); the run numbered first + i failed if it is in `errors`."""
        cdef const double* t = <const double*>PyBytes_AS_STRING(times)
        cdef Py_ssize_t i, n = min(runs.n, PyBytes_GET_SIZE(times) // (2 * sizeof(double)))
        cdef uint8_t state
        for i in range(n):
            if isnan(t[2 * i]):
                continue
            state = COMPLETED
            if errors and PyDict_Contains(errors, first + i):
                state = FAILED
            self.add(runs.items[i], track, t[2 * i], t[2 * i + 1], state)

    def keys_of(self, RunList runs):
        """The runs' keys, for attempts recorded later (add_keyed)."""
        return [self.key_of(runs.items[i]) for i in range(runs.n)]

    def key(self, TaskFuture run):
        """The key of the run of a future of this trace's engine."""
        return self.key_of_future(run)

    def add_keyed(self, int64_t key, spec, int32_t track, double start, double end, state):
        """One attempt of the run `key` (key, keys_of) of the task `spec`
        on `track` (track); `state` one of STATE_OF's names or a state
        code."""
        if not (0 <= key < self.next_id or FOREIGN <= key < FOREIGN + len(self.foreign_text)):
            raise ValueError(f"key {key} is not a run of this trace")
        if not 0 <= track < len(self.track_list):
            raise ValueError(f"track {track} is not a track of this trace")
        code = STATE_OF[state] if isinstance(state, str) else state
        self._slice(key, self._name_of(spec), track, start, end, code)

    def limit_wait(self, TaskFuture run, double start, double end, tag):
        """`run` waited from `start` to `end` (tr_monotonic() seconds) for
        the limit `tag`: a slice "waiting for limit <tag>" in the waits
        rows."""
        self.limit_wait_of(<void*>run, start, end, tag)

    def run_uuid(self, int64_t key):
        """The task_run_id of the run `key` (one of its future's, see
        TaskFuture.task_run_id)."""
        return uuid.UUID(int=self.prefix + key)

    @property
    def slices(self):
        """How many attempts are recorded."""
        return self.n

    # -- the file ------------------------------------------------------------------

    def write(self, path):
        """Write the Chrome trace-event file to `path`, replacing it as a
        whole (a new file renamed over it), once: the records go with it,
        and records made after it are dropped."""
        cdef Py_ssize_t n = self.n, i, slot, last
        cdef Py_ssize_t slots = self.next_id + len(self.foreign_text)
        cdef Py_ssize_t* first = NULL       # run slot -> its first attempt (a slice), or -1
        cdef Py_ssize_t* after = NULL       # slice -> the run's next attempt, or -1
        cdef int32_t* attempts = NULL
        cdef int32_t* tids = NULL
        cdef int32_t* pids = NULL
        cdef FILE* out = NULL
        cdef _Sink sink
        sink.buf = NULL
        self.closed = True
        path = os.path.abspath(os.fspath(path))
        temporary = os.path.join(os.path.dirname(path),
                                 f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            first = <Py_ssize_t*>malloc((slots + 1) * sizeof(Py_ssize_t))
            after = <Py_ssize_t*>malloc((n + 1) * sizeof(Py_ssize_t))
            attempts = <int32_t*>malloc((n + 1) * sizeof(int32_t))
            if first == NULL or after == NULL or attempts == NULL:
                raise MemoryError()
            # Each run's attempts chained in the order recorded (backwards,
            # each in front), then numbered; a run's attempts recorded out
            # of time order (from Dask workers, at exit) are put in order.
            for slot in range(slots):
                first[slot] = -1
            for i in range(n - 1, -1, -1):
                slot = self._slot(self.keys[i])
                after[i] = first[slot]
                first[slot] = i
            retries = []        # (an attempt, the next): slice indexes
            for i in range(n):
                slot = self._slot(self.keys[i])
                if first[slot] != i:
                    continue
                attempts[i] = 1
                if after[i] < 0:
                    continue        # the common case: one attempt
                chain = [i]
                last = i
                while after[last] >= 0:
                    last = after[last]
                    chain.append(last)
                chain.sort(key=lambda k: self.starts[<Py_ssize_t>k])
                first[slot] = chain[0]
                for k in range(len(chain)):
                    attempts[<Py_ssize_t>chain[k]] = k + 1
                    after[<Py_ssize_t>chain[k]] = chain[k + 1] if k + 1 < len(chain) else -1
                retries += zip(chain, chain[1:])
            waits = list(self.waits)
            for before, again in retries:
                if self.states[<Py_ssize_t>before] == COMPLETED:
                    continue        # run again, not retried (Dask recomputing a lost result)
                waits.append(Wait(self.keys[<Py_ssize_t>again], self.names[<Py_ssize_t>again],
                                  self.ends[<Py_ssize_t>before], self.starts[<Py_ssize_t>again],
                                  "retry wait"))
            tracks = list(self.track_list)
            groups = {}
            lanes = _lanes(waits)
            wait_tracks = len(tracks)
            tracks += [Track("waits", f"waits {k + 1}") for k in range(max(lanes, default=-1) + 1)]
            tids = <int32_t*>malloc((len(tracks) + 1) * sizeof(int32_t))
            pids = <int32_t*>malloc((len(tracks) + 1) * sizeof(int32_t))
            if tids == NULL or pids == NULL:
                raise MemoryError()
            for i, track in enumerate(tracks):
                pids[i] = groups.setdefault(track.group, len(groups) + 1)
                tids[i] = i + 1
            out = fdopen(fd, "wb")
            if out == NULL:
                raise OSError(f"cannot write the trace file {temporary!r}")
            fd = -1
            _sink_open(&sink, out)
            text = ['{"displayTimeUnit":"ms","otherData":{"producer":"taskrunner"},'
                    '"traceEvents":[\n']
            meta = []
            for group, pid in groups.items():
                meta.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": group}})
                meta.append({"ph": "M", "pid": pid, "name": "process_sort_index",
                             "args": {"sort_index": pid}})
            for i, track in enumerate(tracks):
                meta.append({"ph": "M", "pid": pids[i], "tid": tids[i], "name": "thread_name",
                             "args": {"name": track.label}})
                meta.append({"ph": "M", "pid": pids[i], "tid": tids[i],
                             "name": "thread_sort_index", "args": {"sort_index": tids[i]}})
            for wait, lane in zip(waits, lanes):
                begin = self._ns(wait.start)
                meta.append({"ph": "X", "cat": "wait", "name": wait.label,
                             "pid": pids[wait_tracks + lane], "tid": tids[wait_tracks + lane],
                             "ts": begin / 1000.0,
                             "dur": max(0, self._ns(wait.end) - begin) / 1000.0,
                             "args": {"task": self.task_names[wait.name],
                                      "run_id": self._run_id(wait.key)}})
            text.append(",\n".join(json.dumps(m) for m in meta))
            _put(&sink, "".join(text).encode())
            names = [json.dumps(name).encode() for name in self.task_names]
            states = [json.dumps(_STATE_NAMES.get(code, str(code))).encode() for code in range(256)]
            _put_slices(self, &sink, attempts, pids, tids, names, states)
            _put_flows(self, &sink, first, after, pids, tids, retries)
            _put(&sink, b"\n]}\n")
            _flush(&sink)
            failed = sink.failed or ferror(out)
            if fclose(out) != 0 or failed:
                out = NULL
                raise OSError(f"could not write the trace file {temporary!r}")
            out = NULL
            os.replace(temporary, path)
        except BaseException:
            if out != NULL:
                fclose(out)
            elif fd >= 0:
                os.close(fd)
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        finally:
            free(sink.buf)
            free(first)
            free(after)
            free(attempts)
            free(tids)
            free(pids)
            # The futures that outlive the runner keep its engine, and so
            # this trace, for their ids: only the prefix is needed now.
            self._release()
            self.waits = []
            self.name_of_spec = {}
            self.last_spec = None

    cdef void _release(self) noexcept:
        free(self.starts)
        free(self.ends)
        free(self.keys)
        free(self.tracks)
        free(self.names)
        free(self.states)
        free(self.edges)
        self.starts = self.ends = NULL
        self.keys = self.edges = NULL
        self.tracks = self.names = NULL
        self.states = NULL
        self.n = self.cap = self.n_edges = self.cap_edges = 0

    cdef Py_ssize_t _slot(self, int64_t key) noexcept:
        """A run's place in write()'s tables: its key, the foreign ones
        after the others."""
        return <Py_ssize_t>(key if key < FOREIGN else self.next_id + (key - FOREIGN))

    cdef long long _ns(self, double t):
        return llround((t - self.t0) * 1e9)

    cdef str _run_id(self, int64_t key):
        if key >= FOREIGN:
            return self.foreign_text[key - FOREIGN].decode()
        return f"{self.prefix_text.decode()}{key:012x}"


# -- writing the file fast: 200,000 slices must take a fraction of a second ------
# Each event is formatted straight into the sink's buffer through a cursor,
# room for it made first (reserve): no bounds test per piece.

ctypedef struct _Sink:
    FILE* out
    char* buf
    size_t len
    size_t cap
    bint failed


cdef int _sink_open(_Sink* sink, FILE* out) except -1:
    sink.out = out
    sink.len = 0
    sink.cap = 1 << 16
    sink.failed = False
    sink.buf = <char*>malloc(sink.cap)
    if sink.buf == NULL:
        raise MemoryError()
    return 0


cdef void _flush(_Sink* sink) noexcept:
    if sink.len and fwrite(sink.buf, 1, sink.len, sink.out) != sink.len:
        sink.failed = True
    sink.len = 0


cdef char* _reserve(_Sink* sink, size_t n) noexcept:
    """A cursor with room for `n` bytes (NULL: no memory)."""
    cdef char* grown
    if sink.len + n > sink.cap:
        _flush(sink)
        if n > sink.cap:
            grown = <char*>realloc(sink.buf, n)
            if grown == NULL:
                sink.failed = True
                return NULL
            sink.buf, sink.cap = grown, n
    return sink.buf + sink.len


cdef inline void _done(_Sink* sink, char* cursor) noexcept:
    sink.len = cursor - sink.buf


cdef void _put(_Sink* sink, bytes data) noexcept:
    cdef char* p = _reserve(sink, PyBytes_GET_SIZE(data))
    if p != NULL:
        memcpy(p, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        _done(sink, p + PyBytes_GET_SIZE(data))


cdef inline char* _lit(char* p, const char* text) noexcept:
    while text[0]:
        p[0] = text[0]
        p += 1
        text += 1
    return p


cdef inline char* _bytes(char* p, bytes data) noexcept:
    memcpy(p, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    return p + PyBytes_GET_SIZE(data)


cdef inline char* _int(char* p, long long value) noexcept:
    cdef char digits[24]
    cdef int k = 24
    cdef unsigned long long v
    if value < 0:
        p[0] = c'-'
        p += 1
        v = <unsigned long long>(-value)
    else:
        v = <unsigned long long>value
    while True:
        k -= 1
        digits[k] = c'0' + <char>(v % 10)
        v //= 10
        if v == 0:
            break
    memcpy(p, digits + k, 24 - k)
    return p + 24 - k


cdef inline char* _us(char* p, long long ns) noexcept:
    """Nanoseconds as microseconds with three decimals."""
    cdef long long rest
    if ns < 0:
        p[0] = c'-'
        p += 1
        ns = -ns
    p = _int(p, ns // 1000)
    rest = ns % 1000
    p[0] = c'.'
    p[1] = c'0' + <char>(rest // 100)
    p[2] = c'0' + <char>(rest // 10 % 10)
    p[3] = c'0' + <char>(rest % 10)
    return p + 4


cdef inline char* _run_id_at(char* p, Trace trace, int64_t key) noexcept:
    cdef int k
    if key >= FOREIGN:
        return _bytes(p, <bytes>PyList_GET_ITEM(trace.foreign_text, key - FOREIGN))
    p = _bytes(p, trace.prefix_text)
    for k in range(11, -1, -1):
        p[k] = b"0123456789abcdef"[key & 15]
        key >>= 4
    return p + 12


# Room for an event's numbers and fixed text, beside its names.
cdef enum:
    _EVENT_ROOM = 512


cdef int _put_slices(Trace trace, _Sink* sink, int32_t* attempts, int32_t* pids,
                     int32_t* tids, list names, list states) except -1:
    cdef Py_ssize_t i, longest = 0
    cdef long long start, end
    cdef bytes name
    cdef char* p
    for name in names:
        longest = max(longest, PyBytes_GET_SIZE(name))
    for text in trace.foreign_text:
        longest = max(longest, PyBytes_GET_SIZE(text))
    for i in range(trace.n):
        start = trace._ns(trace.starts[i])
        end = trace._ns(trace.ends[i])
        if end < start:
            end = start
        name = <bytes>PyList_GET_ITEM(names, trace.names[i])
        p = _reserve(sink, _EVENT_ROOM + 3 * longest)
        if p == NULL:
            return 0
        p = _lit(p, ',\n{"ph":"X","name":')
        p = _bytes(p, name)
        p = _lit(p, ',"pid":')
        p = _int(p, pids[trace.tracks[i]])
        p = _lit(p, ',"tid":')
        p = _int(p, tids[trace.tracks[i]])
        p = _lit(p, ',"ts":')
        p = _us(p, start)
        p = _lit(p, ',"dur":')
        p = _us(p, end - start)
        p = _lit(p, ',"args":{"task":')
        p = _bytes(p, name)
        p = _lit(p, ',"run_id":"')
        p = _run_id_at(p, trace, trace.keys[i])
        p = _lit(p, '","state":')
        p = _bytes(p, <bytes>PyList_GET_ITEM(states, trace.states[i]))
        p = _lit(p, ',"attempt":')
        p = _int(p, attempts[i])
        p = _lit(p, "}}")
        _done(sink, p)
    return 0


cdef int _put_flows(Trace trace, _Sink* sink, Py_ssize_t* first, Py_ssize_t* after,
                    int32_t* pids, int32_t* tids, list retries) except -1:
    """A flow arrow per edge whose both runs have an attempt, from the
    upstream's last attempt to the downstream's first; one from each
    attempt to the next."""
    cdef Py_ssize_t e, src, dst, flow = 0
    for e in range(trace.n_edges):
        src = first[trace._slot(trace.edges[2 * e])]
        dst = first[trace._slot(trace.edges[2 * e + 1])]
        if src < 0 or dst < 0:
            continue
        while after[src] >= 0:
            src = after[src]
        flow += 1
        _put_flow(trace, sink, "dependency", flow, src, dst, pids, tids)
    for src, dst in retries:
        flow += 1
        _put_flow(trace, sink, "retry", flow, src, dst, pids, tids)
    return 0


cdef void _flow_end(_Sink* sink, const char* head, const char* cat, Py_ssize_t flow,
                    int32_t pid, int32_t tid, long long at) noexcept:
    cdef char* p = _reserve(sink, _EVENT_ROOM)
    if p == NULL:
        return
    p = _lit(p, head)
    p = _lit(p, cat)
    p = _lit(p, '","name":"')
    p = _lit(p, cat)
    p = _lit(p, '","id":')
    p = _int(p, flow)
    p = _lit(p, ',"pid":')
    p = _int(p, pid)
    p = _lit(p, ',"tid":')
    p = _int(p, tid)
    p = _lit(p, ',"ts":')
    p = _us(p, at)
    p = _lit(p, "}")
    _done(sink, p)


cdef void _put_flow(Trace trace, _Sink* sink, const char* cat, Py_ssize_t flow,
                    Py_ssize_t src, Py_ssize_t dst, int32_t* pids, int32_t* tids) noexcept:
    # Each end inside its slice (a nanosecond in, if it lasts more than
    # two): a flow event binds to the slice that encloses it.
    cdef long long start = trace._ns(trace.starts[src])
    cdef long long end = trace._ns(trace.ends[src])
    cdef int32_t track = trace.tracks[src]
    _flow_end(sink, ',\n{"ph":"s","cat":"', cat, flow, pids[track], tids[track],
              end - 1 if end - start > 2 else start)
    start = trace._ns(trace.starts[dst])
    end = trace._ns(trace.ends[dst])
    track = trace.tracks[dst]
    _flow_end(sink, ',\n{"ph":"f","bp":"e","cat":"', cat, flow, pids[track], tids[track],
              start + 1 if end - start > 2 else start)


def _lanes(waits):
    """A lane for each wait, so that no two in one lane overlap (the file's
    slices on one track must nest): in order of start, the lane that came
    free first if one is free, else a new one."""
    lanes = [0] * len(waits)
    free_at = []            # (end of its last wait, lane)
    opened = 0
    for i in sorted(range(len(waits)), key=lambda k: waits[k].start):
        if free_at and free_at[0][0] <= waits[i].start:
            _, lane = heapq.heappop(free_at)
        else:
            lane, opened = opened, opened + 1
        lanes[i] = lane
        heapq.heappush(free_at, (waits[i].end, lane))
    return lanes
