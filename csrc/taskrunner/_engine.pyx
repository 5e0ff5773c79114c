# cython: language_level=3, boundscheck=False, wraparound=False
"""The engine: from a Python call to a run of the graph, and back.

submit() binds the parameters with the task's cached call plan, finds the
futures inside them, builds one TaskFuture and adds one held run with its
edges in a single critical section.  map() does the same for every item
and registers the whole batch in one more.  A consumer thread's loop
(work) takes a run, resolves its upstream futures to their results, calls
the task, then completes the run and takes the next one in one critical
section.

The engine owns one reference to each unfinished run's future (the run's
payload in the graph), and lets go when the run ends.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_Append, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.sequence cimport PySequence_Fast_ITEMS
from libc.stdlib cimport calloc, free, malloc
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport int32_t, int64_t, uint8_t

from taskrunner._calls cimport CallSpec, as_params, spec_of, untracked_if_atomic
from taskrunner._futures cimport (
    PyObject_GC_Track, PyObject_GC_UnTrack, HAS_OUTSIDE, NEEDS_RESOLVE, ONE_ARG, REMOTE_VALUE, Consumer, EngineBase, FutureList, TaskFuture,
    blank_future, consumer_begin, consumer_end, deadline_of, hold, let_go, new_future, until_signal_check,
)
from taskrunner._graph cimport (
    CAUSE_OUTSIDE, COMPLETED, CRASHED, EDGE_BROKEN, FAILED, Graph, PENDING, RUNNING, RunVec,
    TAKE_CLOSED, TAKE_NONE, runvec_clear, runvec_free, tr_monotonic,
)
from taskrunner._params cimport (
    Upstream, Upstreams, checked_dependencies, is_plain, resolve, resolve_args, scan, scan_call,
    upstreams_free, upstreams_init, wait_for_upstreams,
)

import io
import logging
import types

from taskrunner.annotations import unmapped
from taskrunner.exceptions import (
    MappingLengthMismatch, MappingMissingIterable, UpstreamTaskError,
)

_log = logging.getLogger("taskrunner")

cdef object _CoroutineType = types.CoroutineType
cdef Py_ssize_t _MAX_SPECS = 4096
# map() makes and schedules its runs a chunk at a time: the futures it just
# made are still in cache when they are registered.
cdef Py_ssize_t _MAP_CHUNK = 8192


@cython.final
@cython.no_gc_clear     # futures being collected with it still give slots back
cdef class Engine(EngineBase):
    """Scheduling for one entered runner.

    `max_running` bounds the runs executing at once; `spawn_consumer()`, if
    given, is called (with the GIL) each time the graph wants one more
    consumer thread, which must call work().  A runner that executes runs
    elsewhere takes them with take_ready() and ends them with finish() or
    give_back(); its `recall(future)` hook is asked to un-start a taken run
    that cancel() names (True if it could), and `recall(None)`, by
    cancel_all(), every taken run that has not started.  A runner whose
    results stay where the runs ran gives `fetch(value, timeout)`: the
    values it passes to finish() for completed runs are then handles,
    handed as they are to downstream runs of this engine, and result()
    calls fetch to get what one stands for (FutureList.result() calls
    `fetch_many(values, timeout)` once for all, if it is given).
    """

    def __cinit__(self, int max_running, spawn_consumer=None, recall=None, fetch=None,
                  fetch_many=None):
        self.graph = Graph(max_running, spawn_consumer is not None)
        self._specs = {}
        self._spawn_consumer = spawn_consumer
        self._recall = recall
        self.fetch = fetch
        self.fetch_many = fetch_many

    cdef CallSpec _spec_for(self, object task):
        cdef CallSpec spec = self._last_spec
        if spec is not None and spec.task is task:
            return spec
        spec = self._find_spec(task)
        self._last_spec = spec
        return spec

    cdef CallSpec _find_spec(self, object task):
        cdef CallSpec spec
        try:
            found = self._specs.get(task)
        except TypeError:       # an unhashable callable: no caching
            return spec_of(task)
        if found is not None:
            return <CallSpec>found
        spec = spec_of(task)
        if len(self._specs) >= _MAX_SPECS:
            self._specs.clear()
        self._specs[task] = spec
        return spec

    # -- submit -----------------------------------------------------------

    def submit(self, task, parameters=None, wait_for=None, dependencies=None):
        cdef CallSpec spec = self._spec_for(task)
        cdef dict params = as_params(parameters)
        cdef TaskFuture fut = new_future(self, spec, params)
        cdef PyObject* one = <PyObject*>fut
        cdef Upstreams ups
        upstreams_init(&ups)
        try:
            scan_call(fut, &ups)
            if wait_for is not None:
                keep = wait_for_upstreams(wait_for, &ups)
            if dependencies is not None:
                fut._get_extra().dependencies = checked_dependencies(dependencies)
            self._register(&one, 1, &ups, NULL, NULL)
        finally:
            upstreams_free(&ups)
        return fut

    cdef int32_t _add_edges_locked(self, int32_t run, Upstream* ups, Py_ssize_t n,
                                   int32_t cause, bint* outside) noexcept:
        """Add run's edges from `n` upstreams.  Returns the first upstream
        that already failed (`cause` if none, -3 if out of memory);
        upstreams of other runners become holds."""
        cdef Py_ssize_t i
        cdef TaskFuture up
        cdef int rc
        for i in range(n):
            up = <TaskFuture>ups[i].future
            if up._engine is not self:
                self.graph.hold_locked(run)
                outside[0] = True
                continue
            rc = self.graph.add_edge_locked(up._run, run, ups[i].allow)
            if rc == EDGE_BROKEN and cause == -1:
                cause = up._run
            elif rc < 0:
                return -3
        return cause

    cdef int _register(self, PyObject** futs, Py_ssize_t n, Upstreams* shared,
                       Upstreams* own, Py_ssize_t* first) except -1:
        """Add the runs of `futs`, held, with their edges, then release them
        all in the same critical section: a failure part-way schedules
        nothing.  `shared` are upstreams of every run; run i's own are
        own.items[first[i]:first[i + 1]], if `first` is given."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef Py_ssize_t i, added = 0
        cdef int32_t run, cause, spawn
        cdef TaskFuture fut
        cdef bint outside = False, any_outside = False, oom = False
        graph.lock()
        if graph.closed:
            graph.unlock()
            raise RuntimeError("the task runner has shut down; enter it again to submit")
        for i in range(n):
            fut = <TaskFuture>futs[i]
            run = graph.add_run_locked(<void*>fut, 0)
            if run < 0:
                oom = True
                break
            hold(fut)
            fut._run = run
            added += 1
            cause = -1
            if shared.len:
                cause = self._add_edges_locked(run, shared.items, shared.len, -1, &outside)
            if first != NULL and cause != -3:
                cause = self._add_edges_locked(run, own.items + first[i], first[i + 1] - first[i],
                                               cause, &outside)
            if cause == -3:
                oom = True
                break
            if outside:
                fut._flags |= HAS_OUTSIDE
                any_outside = True
                outside = False
            graph.runs[run].cause = cause     # kept until the release below
        for i in range(added):
            run = (<TaskFuture>futs[i])._run
            cause = graph.runs[run].cause
            graph.runs[run].cause = -1
            if oom or self._cancel_new:
                graph.cancel_locked(run, &out)
            graph.release_locked(run, cause, &out)
        spawn = graph.pop_spawn_wanted_locked()
        graph.unlock()
        if any_outside and not oom:
            for i in range(n):
                fut = <TaskFuture>futs[i]
                if fut._flags & HAS_OUTSIDE:
                    self._hook_outside(fut, shared.items, shared.len)
                    if first != NULL:
                        self._hook_outside(fut, own.items + first[i], first[i + 1] - first[i])
        self._settle(&out, spawn)
        if oom:
            raise MemoryError("the scheduler cannot hold this many runs or edges")
        return 0

    cdef int _hook_outside(self, TaskFuture fut, Upstream* ups, Py_ssize_t n) except -1:
        # Each upstream of another runner holds the run until its own done
        # callback lets go.
        cdef Py_ssize_t i
        for i in range(n):
            up = <TaskFuture>ups[i].future
            if up._engine is not self:
                up.add_done_callback(_OutsideRelease(self, fut, ups[i].allow))
        return 0

    def _release_outside(self, TaskFuture fut, TaskFuture up, bint allow):
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef int32_t cause = -1, spawn
        if up._state() != COMPLETED and not allow and fut._state() == PENDING:
            fut._value = up         # the cause, kept before the run can end
            cause = CAUSE_OUTSIDE
        graph.lock()
        graph.release_locked(fut._run, cause, &out)
        spawn = graph.pop_spawn_wanted_locked()
        graph.unlock()
        self._settle(&out, spawn)

    # -- map --------------------------------------------------------------

    def map(self, task, parameters, wait_for=None):
        cdef CallSpec spec = self._spec_for(task)
        cdef TaskFuture template, fut
        cdef list names = [], columns = [], slot_positions = []
        cdef Py_ssize_t n, i, k, nargs, ncols
        cdef Py_ssize_t* first = NULL      # run i's own upstreams: own.items[first[i]:first[i+1]]
        cdef uint8_t* item_flags = NULL    # what scanning run i's items found
        cdef Py_ssize_t lo, hi
        cdef Upstreams shared, own
        cdef tuple args
        cdef int static_flags
        cdef FutureList futures
        statics = {}
        for name, value in as_params(parameters).items():
            if isinstance(value, unmapped):
                statics[name] = (<object>value).value
                continue
            if isinstance(value, TaskFuture):
                value = _mapped_future_result(<TaskFuture>value, name, spec.name)
            if _is_mappable(value):
                names.append(name)
                columns.append(value)
            else:
                statics[name] = value
        if not names:
            raise MappingMissingIterable(
                f"map of task {spec.name!r} got no iterable parameter to map over; give at "
                f"least one list, tuple or other iterable (wrap a value in unmapped() to pass "
                f"it whole to every call)")
        columns = [c if type(c) in (list, tuple, range) else list(c) for c in columns]
        lengths = [len(c) for c in columns]
        if len(set(lengths)) > 1:
            sizes = ", ".join(f"{name!r} has {size}" for name, size in zip(names, lengths))
            raise MappingLengthMismatch(
                f"map of task {spec.name!r}: the iterable parameters differ in length ({sizes})")
        n = lengths[0]
        ncols = len(names)
        # Bind once with a marker per mapped name; each call then copies
        # the bound arguments and puts its items where the markers are.
        markers = {name: _Slot(k) for k, name in enumerate(names)}
        template = new_future(self, spec, {**statics, **markers})
        args = template._args
        nargs = PyTuple_GET_SIZE(args)
        for i in range(nargs):
            if type(args[i]) is _Slot:
                slot_positions.append((i, (<_Slot>args[i]).column))
        kw_slots = [(key, (<_Slot>v).column) for key, v in (template._kwargs or {}).items()
                    if type(v) is _Slot]
        if len(slot_positions) + len(kw_slots) != ncols:
            raise TypeError(f"map of task {spec.name!r}: cannot map over the "
                            f"*{spec.var_pos_name} parameter; pass it whole with unmapped()")
        column_at = [-1] * nargs
        for position, column in slot_positions:
            column_at[position] = column
        # The common map, one mapped positional argument and no other, keeps
        # each item as it is rather than in a 1-tuple: a third less memory.
        one_arg = nargs == 1 and column_at[0] >= 0

        upstreams_init(&shared)
        upstreams_init(&own)
        try:
            static_flags = 0
            for value in list(args) + list((template._kwargs or {}).values()):
                if type(value) is not _Slot and not is_plain(value):
                    static_flags |= scan(value, &shared, False, 0)
            if wait_for is not None:
                keep = wait_for_upstreams(wait_for, &shared)
            # Every upstream in the items first: a bad item fails the map
            # here, before any of its runs is scheduled.
            if any(type(c) is not range for c in columns):      # a range holds ints only
                for i in range(n):
                    for k in range(ncols):
                        value = columns[k][i]
                        if not is_plain(value):
                            if first == NULL:
                                first = <Py_ssize_t*>calloc(n + 1, sizeof(Py_ssize_t))
                                item_flags = <uint8_t*>calloc(n, sizeof(uint8_t))
                                if first == NULL or item_flags == NULL:
                                    raise MemoryError()
                            item_flags[i] |= <uint8_t>scan(value, &own, False, 0)
                    if first != NULL:
                        first[i + 1] = own.len
            futures = FutureList()
            # The list holds only untracked futures: the GC need not walk it
            # again and again while it grows.
            PyObject_GC_UnTrack(futures)
            iterators = [iter(c) for c in columns]
            row = [None] * ncols
            static_kwargs = template._kwargs
            lo = 0
            try:
                while lo < n:
                    hi = min(n, lo + _MAP_CHUNK)
                    if one_arg and ncols == 1 and not kw_slots:
                        # The common map, each item the call's one argument,
                        # apart: the general loop below costs 92 more
                        # instructions an item here (callgrind, 728 -> 820).
                        items = iterators[0]
                        for i in range(lo, hi):
                            fut = blank_future(self, spec)
                            fut._flags = static_flags | ONE_ARG
                            if item_flags != NULL:
                                fut._flags |= item_flags[i]
                            fut._args = next(items)
                            fut._kwargs = static_kwargs
                            PyList_Append(futures, fut)
                    else:
                        for i in range(lo, hi):
                            for k in range(ncols):
                                row[k] = next(iterators[k])
                            fut = blank_future(self, spec)
                            fut._flags = static_flags
                            if item_flags != NULL:
                                fut._flags |= item_flags[i]
                            if one_arg:
                                fut._flags |= ONE_ARG
                                fut._args = row[<Py_ssize_t>column_at[0]]
                            else:
                                fut._args = _fill_args(args, column_at, row)
                            if kw_slots:
                                kwargs = dict(static_kwargs)
                                for key, k in kw_slots:
                                    kwargs[key] = row[k]
                                fut._kwargs = kwargs
                            else:
                                fut._kwargs = static_kwargs
                            PyList_Append(futures, fut)
                    self._register(PySequence_Fast_ITEMS(futures) + lo, hi - lo, &shared, &own,
                                   first + lo if first != NULL else NULL)
                    lo = hi
            except BaseException:
                # Only running out of memory (or a closing runner) gets here:
                # take back what was scheduled, bar runs already started.
                for i in range(lo):
                    (<TaskFuture>PyList_GET_ITEM(futures, i)).cancel()
                raise
        finally:
            upstreams_free(&shared)
            upstreams_free(&own)
            free(first)
            free(item_flags)
        PyObject_GC_Track(futures)
        return futures

    # -- running ----------------------------------------------------------

    def work(self, context):
        """Run ready runs on this thread until the engine shuts down.
        `context.run_coroutine(coro)` runs the coroutine of an async task."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef void* payload = NULL
        cdef int32_t run = TAKE_NONE, spawn = 0
        cdef uint8_t state
        cdef TaskFuture fut
        cdef Consumer consumer = consumer_begin(self)
        graph.consumer_enter()
        try:
            while True:
                if run < 0:
                    with nogil:
                        run = graph.take(&payload, -1.0)
                    if run < 0:
                        break
                consumer.holding = True
                fut = <TaskFuture>payload
                state = self._execute(fut, context)
                run = graph.complete_and_take(fut._run, state, &out, &payload, &spawn)
                if run >= 0 and fut._extra is not None and fut._extra.callbacks:
                    # Its done callbacks may block: hold no run meanwhile, or
                    # this thread would start it on top of the consumers
                    # started in its place.
                    graph.lock()
                    graph.unstart_locked(run, False, &out)
                    spawn += graph.pop_spawn_wanted_locked()
                    graph.unlock()
                    run = TAKE_NONE
                consumer.holding = run >= 0
                if spawn:
                    self._spawn(spawn)
                if out.len:
                    self._ended(&out)
                fut._fire_callbacks()
                let_go(fut)
                fut = None
        finally:
            consumer_end()
            runvec_free(&out)
            graph.consumer_exit()

    cdef uint8_t _execute(self, TaskFuture fut, object context):
        cdef CallSpec spec = fut._spec
        cdef bint one = fut._flags & ONE_ARG
        args = fut._args
        kwargs = fut._kwargs
        _forget_call(fut)
        try:
            if fut._flags & NEEDS_RESOLVE:
                args = resolve(args, False, 0, self) if one else resolve_args(args, self)
                if kwargs is not None:
                    kwargs = resolve(kwargs, False, 0, self)
            if one:
                value = spec.fn(args) if kwargs is None else spec.fn(args, **kwargs)
            elif kwargs is None:
                value = spec.fn(*args)
            else:
                value = spec.fn(*args, **kwargs)
            if spec.is_async or type(value) is _CoroutineType:
                value = context.run_coroutine(value)
        except BaseException as exc:
            fut._value = exc
            return FAILED
        fut._value = value
        return COMPLETED

    cdef void _ended(self, RunVec* out):
        """Let go of runs the graph ended without running them."""
        cdef Py_ssize_t i
        cdef TaskFuture fut
        for i in range(out.len):
            fut = <TaskFuture>out.items[i].payload
            _forget_call(fut)
            if out.items[i].cause_payload != NULL and fut._value is None:
                fut._value = <object>out.items[i].cause_payload
        for i in range(out.len):
            fut = <TaskFuture>out.items[i].payload
            fut._fire_callbacks()
            let_go(fut)
        fut = None
        runvec_clear(out)

    cdef inline void _settle(self, RunVec* out, int32_t spawn):
        """After a critical section: let go of the runs it ended, free the
        vector, and start the consumers the graph asked for."""
        if out.len:
            self._ended(out)
        if out.items != NULL:
            runvec_free(out)
        if spawn:
            self._spawn(spawn)

    cdef void _spawn(self, int32_t n):
        cdef int32_t i
        if self._spawn_consumer is None:
            return
        for i in range(n):
            try:
                self._spawn_consumer()
            except BaseException:
                # Count the consumer that never came, so the graph asks again.
                self.graph.consumer_enter()
                self.graph.consumer_exit()
                _log.exception("could not start a worker for the task runner")

    # -- consumers elsewhere ------------------------------------------------

    def take_ready(self, Py_ssize_t max_n, timeout=None):
        """Take up to `max_n` ready runs for a consumer that runs them
        elsewhere: they are RUNNING from now on, until finish() or
        give_back().  Blocks without the GIL until there is one.  Returns
        their futures; [] at the timeout; None once the engine has closed.

        `taken_epoch` is then graph.cancel_epoch as it was when they were
        taken: if cancel_all() has run since, they were not started when it
        did (for the runner's recall to know of them)."""
        cdef double deadline = deadline_of(timeout)
        cdef void** payloads
        cdef int32_t n
        cdef int64_t epoch = 0
        if max_n < 1:
            raise ValueError("max_n must be at least 1")
        payloads = <void**>malloc(max_n * sizeof(void*))
        if payloads == NULL:
            raise MemoryError()
        try:
            with nogil:
                n = self.graph.take_many(payloads, <int32_t>max_n, deadline, &epoch)
            if n == TAKE_CLOSED:
                return None
            if n < 0:
                return []
            self.taken_epoch = epoch
            return [<object>payloads[i] for i in range(n)]
        finally:
            free(payloads)

    def calls_of(self, list futures, bint unpack_single=False):
        """The calls of taken runs, with their upstream futures replaced by
        their results, grouped: a list of [call spec, [args, ...], [kwargs,
        ...] or None], one group for each stretch of runs of one task.

        With `unpack_single`, each group has a fourth item, True when every
        call in it passes exactly one positional argument and no keywords;
        its list then holds those arguments rather than 1-tuples (cheaper to
        pickle: pickle memoizes every tuple), or is a range when they are
        consecutive ints, as in a map over a range."""
        cdef list groups = [], args_list = None, kwargs_list = None, group = None
        cdef CallSpec spec = None
        cdef TaskFuture fut
        cdef Py_ssize_t i, j, n = len(futures)
        cdef bint single = False, one
        for i in range(n):
            fut = <TaskFuture>PyList_GET_ITEM(futures, i)
            args = fut._args
            kwargs = fut._kwargs
            one = fut._flags & ONE_ARG
            if args is None and not one:
                args = ()           # ended meanwhile (cancelled): it will not run
            elif fut._flags & NEEDS_RESOLVE:
                args = resolve(args, False, 0, self) if one else resolve_args(args, self)
                if kwargs is not None:
                    kwargs = resolve(kwargs, False, 0, self)
            if fut._spec is not spec:
                spec = fut._spec
                args_list = []
                kwargs_list = None
                single = unpack_single
                group = [spec, args_list, None, single] if unpack_single else [spec, args_list, None]
                groups.append(group)
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
        if unpack_single:
            for group in groups:
                if group[3]:
                    group[1] = _as_range(<list>group[1])
        return groups

    def finish(self, list futures, list values, list states):
        """End taken runs: futures[i] ended in states[i] (COMPLETED, FAILED
        or CRASHED, as in taskrunner._graph.STATES) with values[i], its
        result or exception."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef Py_ssize_t i, n = PyList_GET_SIZE(futures)
        cdef int32_t spawn
        cdef TaskFuture fut
        cdef uint8_t* codes
        cdef uint8_t state
        cdef bint remote = self.fetch is not None
        if PyList_GET_SIZE(values) != n or PyList_GET_SIZE(states) != n:
            raise ValueError("futures, values and states differ in length")
        codes = <uint8_t*>malloc(n + 1)
        if codes == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                state = <object>PyList_GET_ITEM(states, i)
                if state != COMPLETED and state != FAILED and state != CRASHED:
                    raise ValueError(f"cannot finish a run as state {state}")
                codes[i] = state
            for i in range(n):
                fut = <TaskFuture>PyList_GET_ITEM(futures, i)
                fut._value = <object>PyList_GET_ITEM(values, i)
                _forget_call(fut)
                if remote and codes[i] == COMPLETED:
                    fut._flags |= REMOTE_VALUE
            graph.lock()
            for i in range(n):
                graph.complete_taken_locked((<TaskFuture>PyList_GET_ITEM(futures, i))._run,
                                            codes[i], &out)
            spawn = graph.pop_spawn_wanted_locked()
            graph.unlock()
        finally:
            free(codes)
        self._settle(&out, spawn)
        for i in range(n):
            fut = <TaskFuture>PyList_GET_ITEM(futures, i)
            fut._fire_callbacks()
            let_go(fut)

    def give_back(self, list futures, bint cancel):
        """Taken runs that never started: back to the ready queue, or (with
        `cancel`) cancelled."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef TaskFuture fut
        cdef int32_t spawn
        graph.lock()
        for item in futures:
            fut = <TaskFuture>item
            graph.unstart_locked(fut._run, cancel, &out)
        spawn = graph.pop_spawn_wanted_locked()
        graph.unlock()
        self._settle(&out, spawn)

    # -- cancelling and shutting down --------------------------------------

    cdef bint _cancel(self, TaskFuture fut) except -1:
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef bint cancelled
        graph.lock()
        cancelled = graph.cancel_locked(fut._run, &out)
        graph.unlock()
        self._settle(&out, 0)
        if not cancelled and self._recall is not None and fut._state() == RUNNING:
            cancelled = bool(self._recall(fut))
        return cancelled

    def cancel_all(self):
        """Cancel every run that has not started."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        graph.lock()
        graph.cancel_all_locked(&out)
        graph.unlock()
        self._settle(&out, 0)
        if self._recall is not None:
            self._recall(None)

    def shutdown(self, bint cancel):
        """Wait until no run is unfinished, then stop the consumers.  With
        `cancel`, first cancel every run not started, and any added later.
        Ctrl-C while waiting cancels too, then keeps waiting for the runs
        already running, and re-raises."""
        if cancel:
            self._cancel_new = True
            self.cancel_all()
        try:
            self._wait_quiet()
        except BaseException:
            self._cancel_new = True
            self.cancel_all()
            self._wait_quiet()
            raise

    def _wait_quiet(self):
        cdef Graph graph = self.graph
        cdef double until
        while not graph.close_if_quiet():
            until = until_signal_check(-1.0)
            with nogil:
                graph.wait_quiet(until)
            PyErr_CheckSignals()

    def close(self):
        """Stop the consumers now, whatever is unfinished, and let go of the
        callables and the runner: ended futures keep the engine alive, and
        must not keep those alive through it."""
        self.graph.close()
        self._specs.clear()
        self._last_spec = None
        self._spawn_consumer = None
        self._recall = None

    @property
    def unfinished(self):
        return self.graph.n_unfinished

    @property
    def ready_count(self):
        """Runs ready and not yet taken."""
        return self.graph.n_ready


@cython.final
cdef class _Slot:
    """Marks where a mapped parameter's items go in the bound arguments."""
    cdef readonly Py_ssize_t column

    def __cinit__(self, Py_ssize_t column):
        self.column = column


@cython.final
cdef class _OutsideRelease:
    """A done callback on another runner's future that lets a run go on."""
    cdef Engine engine
    cdef TaskFuture fut
    cdef bint allow

    def __cinit__(self, Engine engine, TaskFuture fut, allow):
        self.engine = engine
        self.fut = fut
        self.allow = bool(allow)

    def __call__(self, TaskFuture up):
        self.engine._release_outside(self.fut, up, self.allow)


cdef tuple _fill_args(tuple template, list column_at, list row):
    """The template's arguments with each mapped position taken from `row`."""
    cdef Py_ssize_t i, column, n = PyTuple_GET_SIZE(template)
    cdef tuple args = PyTuple_New(n)
    cdef object value
    for i in range(n):
        column = column_at[i]
        if column < 0:
            value = <object>PyTuple_GET_ITEM(template, i)
        else:
            value = <object>PyList_GET_ITEM(row, column)
        Py_INCREF(value)
        PyTuple_SET_ITEM(args, i, value)
    return untracked_if_atomic(args)


cdef inline void _forget_call(TaskFuture fut):
    """Drop a run's call once it started or ended.  Its flag goes too: with
    ONE_ARG, None is an argument, not the mark of a dropped call."""
    fut._args = None
    fut._kwargs = None
    fut._flags &= ~ONE_ARG


cdef object _as_range(list values):
    """`values` as a range if they are ints in arithmetic progression (of
    modest size, so no arithmetic here can overflow), else `values`."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(values)
    cdef long long step, previous, value
    cdef long long bound = 1LL << 40
    if n < 2:
        return values
    for i in range(n):
        item = <object>PyList_GET_ITEM(values, i)
        if type(item) is not int:
            return values
        try:
            value = item
        except OverflowError:
            return values
        if not (-bound < value < bound):
            return values
        if i == 1:
            step = value - previous
            if step == 0:
                return values
        elif i > 1 and value - previous != step:
            return values
        previous = value
    return range(<object>PyList_GET_ITEM(values, 0), previous + step, step)


cdef bint _is_mappable(object value):
    if isinstance(value, (str, bytes, io.IOBase)):
        return False
    try:
        iter(value)
    except TypeError:
        return False
    return True


cdef object _mapped_future_result(TaskFuture fut, str name, str task_name):
    try:
        return fut.result()
    except BaseException as exc:
        raise UpstreamTaskError(
            f"map of task {task_name!r}: parameter {name!r} is the future of task run "
            f"{fut.task_name!r} ({fut.task_run_id}), which did not complete", fut) from exc
