# cython: language_level=3, boundscheck=False, wraparound=False
"""What a runner that executes runs elsewhere (another process, a cluster)
uses of the engine: an Outbox.

    take(n)        ready runs, out of the graph in one critical section, in
                   the ledger as out: RUNNING, not started, cancellable here
    calls(runs)    their calls, upstream futures replaced by their results
    mark_sent(runs)
                   they are sent on and may start: from now on only the
                   runner can take one back (the engine's recall hook);
                   returns those still out, the others were cancelled
                   meanwhile and must not be sent
    finish(runs, values, states)
                   they ended: results, exceptions, crashes
    give_back(runs, cancel)
                   they never started: ready again, or cancelled

So a taken run is always known to one of the two: to the engine until the
runner marks it sent, to the runner after.  A runner marks runs sent in the
same critical section of its own (its lock) in which it records where they
went, and takes the same lock when asked to recall: it then always finds
them.  taskrunner/remote.py is the protocol's Python side.
"""

cimport cython
from cpython.list cimport PyList_Append, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int32_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from taskrunner._calls cimport CallSpec
from taskrunner._engine cimport Engine
from taskrunner._futures cimport (
    HAS_OUTSIDE, NEEDS_RESOLVE, ONE_ARG, TaskFuture, deadline_of, is_item,
)
from taskrunner._graph cimport (
    COMPLETED, CRASHED, FAILED, TAKE_CLOSED, Graph, RunVec, tr_monotonic,
)
from taskrunner._mapped cimport (
    MapBlock, RunList, TakenCall, end_items, future_of, hold_payload, new_runlist, owner_of,
    plain_stretch, record_end, run_of, settle_end, spec_at,
)
from taskrunner._retry cimport retried
from taskrunner._params cimport find_kept_elsewhere, prefetch_found, resolve, resolve_args

import collections

CallGroup = collections.namedtuple("CallGroup", "spec args kwargs single")
CallGroup.__doc__ = """The calls of a stretch of taken runs of one task.

`args` holds each call's positional arguments, a tuple each, or with
`single` each call's only positional argument (cheaper to pickle: pickle
memoizes every tuple); it is a range for a stretch of a map over a range.
`kwargs` is None, or a list of each call's keywords (a dict, or None)."""


@cython.final
cdef class Outbox:
    """The engine's interface for a runner that executes runs elsewhere
    (see the module docstring)."""
    cdef Engine engine
    cdef Graph graph

    def __cinit__(self, Engine engine):
        self.engine = engine
        self.graph = engine.graph

    def take(self, Py_ssize_t max_n, timeout=None):
        """Up to `max_n` ready runs (a RunList), out of the graph: blocks
        without the GIL until there is one.  An empty RunList at the
        timeout; None once the engine has closed."""
        cdef double deadline = deadline_of(timeout)
        cdef int32_t n
        cdef int ready
        cdef RunList runs
        cdef Py_ssize_t i
        if max_n < 1:
            raise ValueError("max_n must be at least 1")
        runs = new_runlist(max_n)
        runs.n = 0
        while True:
            with nogil:
                ready = self.graph.wait_work(deadline)
            if ready < 0:
                return None
            if ready == 0:
                return runs
            # Taken and held with the GIL held throughout: a run taken out
            # may be cancelled here (the ledger), and once cancelled its
            # owner (a future, a map's block) may be let go; no other
            # thread can do either before the hold below.
            n = self.graph.take_out(runs.items, <int32_t>max_n, tr_monotonic())
            if n == TAKE_CLOSED:
                return None
            if n > 0:
                break
            # Cancelled between the wait and the take: wait again.
        runs.n = n
        for i in range(n):
            hold_payload(runs.items[i])
        if self.engine.trace is not None:
            _trace_limit_waits(self.engine, runs)
        return runs

    def mark_sent(self, RunList runs):
        """The runs are sent on (see the module docstring).  Returns those
        still out, now sent (`runs` itself if all are)."""
        cdef Py_ssize_t i, kept = 0
        cdef char* sent = <char*>malloc(runs.n + 1)
        if sent == NULL:
            raise MemoryError()
        try:
            self.graph.lock()
            for i in range(runs.n):
                sent[i] = self.graph.mark_sent_locked(run_of(runs.items[i]))
                kept += sent[i]
            self.graph.unlock()
            if kept == runs.n:
                return runs
            return _subset(runs, <uint8_t*>sent, kept)
        finally:
            free(sent)

    def calls(self, RunList runs, bint singles=False):
        """The calls of taken runs, their upstream futures replaced by their
        results, as a list of CallGroup, one per stretch of runs of one
        task.  With `singles`, a group whose every call passes exactly one
        positional argument and no keywords holds those arguments (see
        CallGroup)."""
        cdef list groups = []
        cdef list group = None            # [spec, args, kwargs, single] while it grows
        cdef CallSpec spec = None
        cdef TakenCall call = TakenCall.__new__(TakenCall)
        cdef MapBlock block
        cdef Py_ssize_t i, j, k, stretch, n = runs.n
        cdef bint single = False, one
        args_list = None        # a list, or a range while it is one stretch of a range
        kwargs_list = None
        _prefetch_for(runs, self.engine)
        i = 0
        while i < n:
            if singles:
                block = plain_stretch(runs.items + i, n - i, &k, &stretch)
                if block is not None:
                    # Consecutive items whose calls are their column's values.
                    if block.spec is not spec or not single:
                        spec, single = block.spec, True
                        group = _new_group(groups, spec, single)
                        args_list, kwargs_list = group[1], None
                    items = block.columns[0][k:k + stretch]
                    if type(args_list) is list and not args_list and type(items) is range:
                        args_list = items
                    else:
                        if type(args_list) is not list:
                            args_list = list(args_list)
                        args_list.extend(items)
                    group[1] = args_list
                    i += stretch
                    continue
            call.read(runs.items[i], False)
            i += 1
            args = call.args
            kwargs = call.kwargs
            one = call.flags & ONE_ARG
            if call.flags & NEEDS_RESOLVE:
                args = resolve(args, False, 0, self.engine) if one else resolve_args(args, self.engine)
                if kwargs is not None:
                    kwargs = resolve(kwargs, False, 0, self.engine)
            if call.spec is not spec:
                spec, single = call.spec, singles
                group = _new_group(groups, spec, single)
                args_list, kwargs_list = group[1], None
            if type(args_list) is not list:
                args_list = group[1] = list(args_list)
            if single and (kwargs is not None or not (one or PyTuple_GET_SIZE(args) == 1)):
                # Not single after all: the arguments so far go back into 1-tuples.
                single = False
                group[3] = False
                for j in range(PyList_GET_SIZE(args_list)):
                    args_list[j] = (args_list[j],)
            if single:
                PyList_Append(args_list, args if one else <object>PyTuple_GET_ITEM(args, 0))
                continue
            PyList_Append(args_list, (args,) if one else args)
            if kwargs is not None and kwargs_list is None:
                kwargs_list = [None] * (PyList_GET_SIZE(args_list) - 1)
                group[2] = kwargs_list
            if kwargs_list is not None:
                PyList_Append(kwargs_list, kwargs)
        return [CallGroup(*g) for g in groups]

    def finish(self, RunList runs, list values, states):
        """End taken runs: run i ended in states[i] (COMPLETED, FAILED or
        CRASHED, as in taskrunner._graph.STATES; or one state for all) with
        values[i], its result or exception."""
        cdef Engine engine = self.engine
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef Py_ssize_t i, stretch, n = runs.n
        cdef int32_t spawn
        cdef TaskFuture fut
        cdef void* payload
        cdef uint8_t* codes
        cdef uint8_t* on_future         # run i ends through its future
        cdef int32_t* run_ids
        cdef bint kept_elsewhere = engine.fetch is not None
        cdef bint settling = False, last
        if PyList_GET_SIZE(values) != n:
            raise ValueError("futures and values differ in length")
        codes = <uint8_t*>malloc(2 * n + 1)
        run_ids = <int32_t*>malloc((n + 1) * sizeof(int32_t))
        if codes == NULL or run_ids == NULL:
            free(codes)
            free(run_ids)
            raise MemoryError()
        on_future = codes + n
        memset(on_future, 0, n)
        try:
            _end_states(states, n, codes)
            # (A batch that all completed, in one state, skips the look.)
            if ((type(states) is not int or states != COMPLETED)
                    and _retry_failed(engine, runs, values, codes)):
                # Some failed attempts run again: finish the others.
                kept = _without_retried(runs, values, codes)
                free(codes)
                free(run_ids)
                codes = run_ids = NULL
                return self.finish(kept[0], kept[1], kept[2])
            i = 0
            while i < n:
                if not kept_elsewhere:
                    # Most runs of a large map end here, a stretch at a time.
                    stretch = end_items(runs.items + i, n - i, codes + i, values, i, run_ids + i)
                    if stretch:
                        i += stretch
                        continue
                run_ids[i] = run_of(runs.items[i])
                fut = record_end(runs.items[i], codes[i],
                                 <object>PyList_GET_ITEM(values, i), kept_elsewhere)
                if fut is not None:
                    on_future[i] = True
                    if fut._extra is not None and fut._extra.callbacks:
                        settling = True
                i += 1
            fut = None
            graph.lock()
            graph.complete_taken_many_locked(run_ids, codes, n, &out)
            spawn = graph.pop_spawn_wanted_locked()
            # Settled below: until the done callbacks ran (or are queued),
            # the graph is not quiet (see Engine.unlock_and_settle).
            settling = settling or out.len > 0
            if settling:
                graph.settling_begin_locked()
            graph.unlock()
            engine.settle(&out, spawn)
            for i in range(n):
                payload = runs.items[i]
                last = i + 1 == n or owner_of(runs.items[i + 1]) != owner_of(payload)
                if on_future[i] or last:
                    settle_end(payload, future_of(payload) if on_future[i] else None, last)
        finally:
            free(codes)
            free(run_ids)
            if settling:
                graph.settling_end()

    def give_back(self, RunList runs, bint cancel):
        """Taken runs that never started: back to the ready queue, or
        (with `cancel`) cancelled."""
        self.engine.unstart(runs, cancel)

    @property
    def ready_count(self):
        """Runs ready and not yet taken."""
        return self.graph.n_ready


cdef int _trace_limit_waits(Engine engine, RunList runs) except -1:
    """Record in the trace how long taken runs waited for their limits."""
    cdef Graph graph = engine.graph
    cdef Py_ssize_t i
    cdef double now = tr_monotonic(), parked
    cdef CallSpec spec
    for i in range(runs.n):
        spec = spec_at(runs.items[i])
        if not spec.lim:
            continue
        graph.lock()
        parked = graph.pop_parked_at_locked(run_of(runs.items[i]))
        graph.unlock()
        if parked > 0.0:
            engine.trace.limit_wait_of(runs.items[i], parked, now, engine.limited_tags(spec))
    return 0


cdef bint _retry_failed(Engine engine, RunList runs, list values, uint8_t* codes) except -1:
    """Retry the failed and crashed runs whose task says so (_retry), each
    marked with code 0 here.  Whether any was."""
    cdef Py_ssize_t i
    cdef void* payload
    cdef bint any_retried = False
    for i in range(runs.n):
        if codes[i] == COMPLETED:
            continue
        payload = runs.items[i]
        if retried(engine, spec_at(payload), payload, run_of(payload),
                   <object>PyList_GET_ITEM(values, i)):
            codes[i] = 0
            any_retried = True
    return any_retried


cdef RunList _subset(RunList runs, uint8_t* keep, Py_ssize_t kept):
    """The runs i with keep[i] set (`kept` of them), each held anew."""
    cdef Py_ssize_t i
    cdef RunList out = new_runlist(kept)
    out.n = 0
    for i in range(runs.n):
        if keep[i]:
            out.items[out.n] = runs.items[i]
            hold_payload(runs.items[i])
            out.n += 1
    return out


cdef tuple _without_retried(RunList runs, list values, uint8_t* codes):
    """(runs, values, states) of the runs not marked retried (code 0)."""
    cdef Py_ssize_t i, n = 0
    cdef list kept_values = [], kept_states = []
    for i in range(runs.n):
        if codes[i]:
            n += 1
            kept_values.append(<object>PyList_GET_ITEM(values, i))
            kept_states.append(codes[i])
    return _subset(runs, codes, n), kept_values, kept_states


cdef list _new_group(list groups, CallSpec spec, bint single):
    """Start the next group of Outbox.calls: [spec, args, kwargs, single]."""
    cdef list group = [spec, [], None, single]
    groups.append(group)
    return group


cdef int _prefetch_for(RunList runs, Engine engine) except -1:
    """Fetch, one call per engine that keeps them, the results kept
    elsewhere that the taken runs take as upstreams of another runner."""
    cdef dict found = None
    cdef TaskFuture fut
    cdef Py_ssize_t i
    for i in range(runs.n):
        if is_item(runs.items[i]):
            continue        # a block's items have upstreams of this engine only
        fut = <TaskFuture>runs.items[i]
        if fut._flags & HAS_OUTSIDE:
            if found is None:
                found = {}
            find_kept_elsewhere(fut._args, engine, found, 0)
            find_kept_elsewhere(fut._kwargs, engine, found, 0)
    if found:
        prefetch_found(found)
    return 0


cdef int _end_states(object states, Py_ssize_t n, uint8_t* codes) except -1:
    """codes[i] = the final state of run i: states is one for all, or a list."""
    cdef Py_ssize_t i
    if isinstance(states, int):
        memset(codes, _end_state(states), n)
        return 0
    if type(states) is not list:
        raise TypeError(f"states must be a state or a list of states, not {type(states).__name__}")
    if PyList_GET_SIZE(states) != n:
        raise ValueError("futures and states differ in length")
    for i in range(n):
        codes[i] = _end_state(<object>PyList_GET_ITEM(states, i))
    return 0


cdef uint8_t _end_state(object state) except 255:
    if state != COMPLETED and state != FAILED and state != CRASHED:
        raise ValueError(f"cannot finish a run as state {state}")
    return state
