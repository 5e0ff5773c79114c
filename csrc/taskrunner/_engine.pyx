# cython: language_level=3, boundscheck=False, wraparound=False
"""The engine: from a Python call to a run of the graph, and back.

submit() binds the parameters with the task's cached call plan, finds the
futures inside them, builds one TaskFuture and adds one held run with its
edges in a single critical section.  map() binds once; when no item holds a
future it adds its runs as one MapBlock (see _mapped.pyx), with no future
per item, else one future per item as submit() does.  A consumer thread's
loop (work) takes a run, resolves its upstream futures to their results,
calls the task, then completes the run and takes the next one in one
critical section.

The engine owns one reference to each unfinished run's future (the run's
payload in the graph), or to the block of an unfinished mapped item, and
lets go when the run ends.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_Append, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.sequence cimport PySequence_Fast_ITEMS
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport int32_t, int64_t, uint8_t

from taskrunner._calls cimport CallSpec, as_params, spec_of, untracked_if_atomic
from taskrunner._futures cimport (
    PyObject_GC_Track, PyObject_GC_UnTrack, HAS_OUTSIDE, NEEDS_RESOLVE, ONE_ARG, REMOTE_VALUE, Consumer, EngineBase, TaskFuture,
    blank_future, is_item, consumer_begin, consumer_end, deadline_of, hold, let_go, new_future, until_signal_check,
)
from taskrunner._mapped cimport (
    FutureList, MapBlock, RunList, block_of, fill_args, future_of, hold_payload, index_of,
    item_payload, new_block, new_runlist, owner_of,
)
from taskrunner._graph cimport (
    CANCELLED, CAUSE_OUTSIDE, COMPLETED, CRASHED, EDGE_BROKEN, FAILED, FREE_SLOT, Graph, NOT_READY,
    PENDING,
    RUNNING, RunVec,
    TAKE_CLOSED, TAKE_NONE, runvec_clear, runvec_free, tr_monotonic,
)
from taskrunner._params cimport (
    Upstream, Upstreams, checked_dependencies, find_kept_elsewhere, is_plain, prefetch_found,
    resolve, resolve_args, scan, scan_call, upstreams_free, upstreams_init, wait_for_upstreams,
)

import io
import logging
import types

from taskrunner._callbacks import CallbackPool
from taskrunner.annotations import allow_failure, quote, unmapped
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
    `fetch_many(values, timeout)` once for all, if it is given).  Its
    `prefetch(values)` fetches many such results at once and keeps them:
    a run of another engine that takes them (a FutureList of them, say)
    then gets them without a round trip each.

    Done callbacks run on the thread that ends the run, unless
    `callbacks_apart`: then they run on threads of their own (see
    taskrunner._callbacks), for a runner whose one receiving thread ends
    its runs and must never block in a user's callback.
    """

    def __cinit__(self, int max_running, spawn_consumer=None, recall=None, fetch=None,
                  fetch_many=None, prefetch=None, bint callbacks_apart=False):
        self.graph = Graph(max_running, spawn_consumer is not None)
        if callbacks_apart:
            self._callback_pool = CallbackPool(self._call_callbacks, self._callbacks_done,
                                               "taskrunner-callbacks")
        self._specs = {}
        self._spawn_consumer = spawn_consumer
        self._recall = recall
        self.fetch = fetch
        self.fetch_many = fetch_many
        self.prefetch = prefetch

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

    cdef int _lock_open(self) except -1:
        """Take the graph's lock to add runs; RuntimeError once it closed."""
        self.graph.lock()
        if self.graph.closed:
            self.graph.unlock()
            raise RuntimeError("the task runner has shut down; enter it again to submit")
        return 0

    cdef void _release_new_locked(self, int32_t run, bint cancel, RunVec* out):
        """Release a run just added, with the cause its edges found (kept
        in its record meanwhile); cancelled first if `cancel` or the runner
        is exiting by exception."""
        cdef Graph graph = self.graph
        cdef int32_t cause = graph.runs[run].cause
        graph.runs[run].cause = -1
        if cancel or self._cancel_new:
            graph.cancel_locked(run, out)
        graph.release_locked(run, cause, out)

    cdef void _unlock_and_settle(self, RunVec* out):
        """Leave a critical section: unlock, then settle what it ended and
        start the consumers it asked for.  Runs that ended are counted as
        being settled until their done callbacks have run (or are queued to
        run elsewhere), so the graph is not quiet meanwhile: a callback may
        still submit."""
        cdef int32_t spawn = self.graph.pop_spawn_wanted_locked()
        cdef bint settling = out.len > 0
        if settling:
            self.graph.settling_begin_locked()
        self.graph.unlock()
        self._settle(out, spawn)
        if settling:
            self.graph.settling_end()

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
        self._lock_open()
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
            self._release_new_locked((<TaskFuture>futs[i])._run, oom, &out)
        if any_outside and not oom:
            # Hooked before the runs can be settled (a run hooked outside
            # waits for that upstream; one that ended already is settled
            # below): the hooks must not run under the lock.
            spawn = graph.pop_spawn_wanted_locked()
            graph.unlock()
            for i in range(n):
                fut = <TaskFuture>futs[i]
                if fut._flags & HAS_OUTSIDE:
                    self._hook_outside(fut, shared.items, shared.len)
                    if first != NULL:
                        self._hook_outside(fut, own.items + first[i], first[i + 1] - first[i])
            self._settle(&out, spawn)
        else:
            self._unlock_and_settle(&out)
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
        cdef int32_t cause = -1
        if up._state() != COMPLETED and not allow and fut._state() == PENDING:
            fut._value = up         # the cause, kept before the run can end
            cause = CAUSE_OUTSIDE
        graph.lock()
        graph.release_locked(fut._run, cause, &out)
        self._unlock_and_settle(&out)

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
            if isinstance(value, (allow_failure, quote)) and _is_mappable((<object>value).value):
                # As Prefect does: mapped item by item, each item wrapped
                # in the same annotation.
                wrap = type(value)
                names.append(name)
                columns.append([wrap(item) for item in (<object>value).value])
            elif _is_mappable(value):
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
            if own.len == 0 and _all_of(self, &shared):
                # No item holds a future: one block, no future each.  (An
                # item with annotations only needs resolving: they all are.)
                if item_flags != NULL:
                    for i in range(n):
                        static_flags |= item_flags[i]
                return self._map_block(spec, n, columns, args, column_at, kw_slots,
                                       template._kwargs, static_flags | (ONE_ARG if one_arg else 0),
                                       one_arg and ncols == 1 and not kw_slots, &shared)
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
                                fut._args = fill_args(args, column_at, row)
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

    cdef FutureList _map_block(self, CallSpec spec, Py_ssize_t n, list columns, tuple args,
                               list column_at, list kw_slots, object static_kwargs, int flags,
                               bint one_column, Upstreams* shared):
        """map()'s runs as one MapBlock: no future made for any item."""
        cdef MapBlock block = new_block(self, spec, n)
        cdef FutureList futures = FutureList()
        cdef Py_ssize_t lo = 0, hi
        block.columns = columns
        block.template_args = args
        block.column_at = column_at
        block.kw_slots = kw_slots
        block.static_kwargs = static_kwargs
        block.flags = <uint8_t>flags
        block.one_column = one_column
        futures._block = block
        try:
            while lo < n:
                hi = min(n, lo + _MAP_CHUNK)
                self._register_items(block, lo, hi, shared)
                lo = hi
        except BaseException:
            # Only running out of memory (or a closing runner) gets here:
            # take back what was scheduled, bar runs already started.
            self._cancel_items(block)
            raise
        return futures

    cdef int _register_items(self, MapBlock block, Py_ssize_t lo, Py_ssize_t hi,
                             Upstreams* shared) except -1:
        """_register for items lo .. hi-1 of a block."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef Py_ssize_t i
        cdef int32_t run, cause
        cdef bint outside = False, oom = False
        self._lock_open()
        for i in range(lo, hi):
            run = graph.add_run_locked(item_payload(block, i), 0)
            if run < 0:
                oom = True
                break
            block.runs[i] = run
            block.registered = i + 1
            block.pending += 1
            cause = -1
            if shared.len:
                cause = self._add_edges_locked(run, shared.items, shared.len, -1, &outside)
            if cause == -3:
                oom = True
                break
            graph.runs[run].cause = cause     # kept until the release below
        if block.pending and not block.held:
            block.held = True
            Py_INCREF(block)
        for i in range(lo, block.registered):
            self._release_new_locked(block.runs[i], oom, &out)
        self._unlock_and_settle(&out)
        if oom:
            raise MemoryError("the scheduler cannot hold this many runs or edges")
        return 0

    cdef void _cancel_items(self, MapBlock block):
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef Py_ssize_t i
        graph.lock()
        for i in range(block.registered):
            if block.futures[i] == NULL:
                graph.cancel_locked(block.runs[i], &out)
        self._unlock_and_settle(&out)

    # -- running ----------------------------------------------------------

    def work(self, context):
        """Run ready runs on this thread until the engine shuts down.
        `context.run_coroutine(coro)` runs the coroutine of an async task."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef void* payload = NULL
        cdef int32_t run = TAKE_NONE, ran, spawn = 0
        cdef uint8_t state
        cdef bint settling
        cdef TaskFuture fut = None
        cdef MapBlock block = None
        cdef Py_ssize_t i
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
                if is_item(payload):
                    block = block_of(payload)
                    i = index_of(payload, block)
                    if block.futures[i] == NULL:
                        state = self._execute_item(block, i, context)
                    else:
                        state = self._execute(<TaskFuture>block.futures[i], context)
                    if block.futures[i] != NULL:
                        # Handed over since it was taken: it ends as its
                        # future, and the block counted it until now.
                        fut = <TaskFuture>block.futures[i]
                        block.pending -= 1
                    ran = block.runs[i]
                else:
                    fut = <TaskFuture>payload
                    state = self._execute(fut, context)
                    ran = fut._run
                settling = (fut is not None and fut._extra is not None
                            and bool(fut._extra.callbacks))
                run = graph.complete_and_take(ran, state, &out, &payload, &spawn, &settling)
                if settling and run >= 0:
                    # Done callbacks may block: hold no run meanwhile, or
                    # this thread would start it on top of the consumers
                    # started in its place (or wait for the run it holds).
                    graph.lock()
                    graph.unstart_locked(run, False, &out)
                    spawn += graph.pop_spawn_wanted_locked()
                    graph.unlock()
                    run = TAKE_NONE
                consumer.holding = run >= 0
                if spawn:
                    self._spawn(spawn)
                # A callback that blocks makes this thread step aside: the
                # graph starts another consumer in its place.
                consumer.in_callbacks = settling
                if out.len:
                    self._ended(&out)
                if fut is not None:
                    fut._fire_callbacks()
                    let_go(fut)
                    fut = None
                consumer.in_callbacks = False
                if settling:
                    graph.settling_end()
                if block is not None:
                    block.release_if_done()
                    block = None
        finally:
            consumer_end()
            runvec_free(&out)
            graph.consumer_exit()

    cdef uint8_t _execute(self, TaskFuture fut, object context):
        cdef uint8_t flags = fut._flags
        args = fut._args
        kwargs = fut._kwargs
        _forget_call(fut)
        try:
            fut._value = self._call(fut._spec, args, kwargs, flags, context)
        except BaseException as exc:
            fut._value = exc
            return FAILED
        return COMPLETED

    cdef uint8_t _execute_item(self, MapBlock block, Py_ssize_t i, object context):
        """_execute for a mapped item with no future."""
        cdef uint8_t state = COMPLETED
        try:
            value = self._call(block.spec, block.args_at(i), block.kwargs_at(i), block.flags,
                               context)
        except BaseException as exc:
            value = exc
            state = FAILED
        if block.futures[i] == NULL:
            block.item_ended(i, state, value)
        else:
            fut = <TaskFuture>block.futures[i]
            fut._value = value
            _forget_call(fut)
        return state

    cdef object _call(self, CallSpec spec, object args, object kwargs, uint8_t flags,
                      object context):
        """Call the task with its upstream futures resolved; await it if it
        is async.  Raises what the task raises."""
        cdef bint one = flags & ONE_ARG
        cdef dict found
        if flags & HAS_OUTSIDE:
            # Results kept elsewhere among its upstreams: fetched at once.
            found = {}
            find_kept_elsewhere(args, self, found, 0)
            find_kept_elsewhere(kwargs, self, found, 0)
            if found:
                prefetch_found(found)
        if flags & NEEDS_RESOLVE:
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
        return value

    cdef void _ended(self, RunVec* out):
        """Let go of runs the graph ended without running them."""
        cdef Py_ssize_t i, k
        cdef TaskFuture fut
        cdef MapBlock block
        cdef TaskFuture cause
        cdef void* payload
        for i in range(out.len):
            payload = out.items[i].payload
            if is_item(payload):
                block = block_of(payload)
                k = index_of(payload, block)
                if block.futures[k] == NULL:
                    if out.items[i].cause == -1:
                        block.item_ended(k, CANCELLED, None)
                    elif out.items[i].cause_payload != NULL and is_item(out.items[i].cause_payload):
                        block.item_ended(k, NOT_READY, future_of(out.items[i].cause_payload))
                    else:
                        block.item_ended(k, NOT_READY, <object>out.items[i].cause_payload
                                         if out.items[i].cause_payload != NULL else None)
                    # Ended as an item: no future to let go.  The entry holds
                    # the block until the loop below is past it.
                    out.items[i].run = -1
                    Py_INCREF(block)
                    continue
                # Handed over since it was taken: it ends as its future, and
                # the block counted it until now.
                block.pending -= 1
                out.items[i].run = -2
                Py_INCREF(block)
                payload = <void*>block.futures[k]
            fut = <TaskFuture>payload
            if out.items[i].cause_payload != NULL and is_item(out.items[i].cause_payload):
                cause = future_of(out.items[i].cause_payload)   # kept by its block
                out.items[i].cause_payload = <void*>cause
            _forget_call(fut)
            if out.items[i].cause_payload != NULL and fut._value is None:
                fut._value = <object>out.items[i].cause_payload
        for i in range(out.len):
            payload = out.items[i].payload
            if out.items[i].run == -1:
                block = block_of(payload)
                block.release_if_done()
                Py_DECREF(block)
                continue
            fut = future_of(payload)
            fut._fire_callbacks()
            let_go(fut)
            if out.items[i].run == -2:
                block = block_of(payload)
                block.release_if_done()
                Py_DECREF(block)
        fut = None
        block = None
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

    cdef void _run_callbacks(self, TaskFuture fut, list callbacks):
        if self._callback_pool is None:
            EngineBase._run_callbacks(self, fut, callbacks)
            return
        # Counted as settling until they have run: the exit waits for them.
        self.graph.lock()
        self.graph.settling_begin_locked()
        self.graph.unlock()
        try:
            self._callback_pool.put(fut, callbacks)
        except BaseException:
            self.graph.settling_end()
            _log.exception("could not queue the done callbacks of task run %r", fut.task_name)

    def _call_callbacks(self, TaskFuture fut, list callbacks):
        EngineBase._run_callbacks(self, fut, callbacks)

    def _callbacks_done(self):
        self.graph.settling_end()

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
        cdef RunList runs = self.take_runs(max_n, timeout)
        cdef list futures
        cdef MapBlock block
        cdef Py_ssize_t i
        if runs is None:
            return None
        futures = []
        for i in range(runs.n):
            if is_item(runs.items[i]):
                block = block_of(runs.items[i])
                futures.append(block.take_over(index_of(runs.items[i], block)))
            else:
                futures.append(<object>runs.items[i])
        return futures

    def take_runs(self, Py_ssize_t max_n, timeout=None):
        """take_ready(), as a RunList: no future is made for a mapped item."""
        cdef double deadline = deadline_of(timeout)
        cdef int32_t n
        cdef int64_t epoch = 0
        cdef RunList runs
        cdef Py_ssize_t i
        if max_n < 1:
            raise ValueError("max_n must be at least 1")
        runs = new_runlist(max_n)
        with nogil:
            n = self.graph.take_many(runs.items, <int32_t>max_n, deadline, &epoch)
        if n == TAKE_CLOSED:
            runs.n = 0
            return None
        if n < 0:
            runs.n = 0
            return runs
        # The runs' payloads stay valid: the engine holds them while they run.
        runs.n = n
        for i in range(n):
            hold_payload(runs.items[i])
        self.taken_epoch = epoch
        return runs

    def calls_of(self, futures, bint unpack_single=False):
        """The calls of taken runs (a RunList or a list of futures), with
        their upstream futures replaced by their results, grouped: a list
        of [call spec, [args, ...], [kwargs, ...] or None], one group for
        each stretch of runs of one task.

        With `unpack_single`, each group has a fourth item, True when every
        call in it passes exactly one positional argument and no keywords;
        its list then holds those arguments rather than 1-tuples (cheaper to
        pickle: pickle memoizes every tuple), or is a range when they are
        consecutive ints, as in a map over a range."""
        cdef RunList runs = _as_runlist(futures, "futures")
        cdef list groups = [], kwargs_list = None, group = None
        cdef CallSpec spec = None, this_spec
        cdef TaskFuture fut
        cdef MapBlock block
        cdef void* payload
        cdef Py_ssize_t i, j, k, stretch, n = runs.n
        cdef bint single = False, one
        cdef uint8_t flags
        args_list = None        # a list, or a range while it is one stretch of a range
        _prefetch_for(runs, self)
        i = 0
        while i < n:
            payload = runs.items[i]
            block = block_of(payload) if is_item(payload) else None
            k = index_of(payload, block) if block is not None else 0
            if block is not None and block.futures[k] == NULL:
                this_spec = block.spec
                if (unpack_single and block.one_column and block.static_kwargs is None
                        and not (block.flags & NEEDS_RESOLVE)):
                    # A stretch of consecutive items: a slice of the column.
                    stretch = 1
                    while (i + stretch < n and runs.items[i + stretch] == item_payload(block, k + stretch)
                           and block.futures[k + stretch] == NULL):
                        stretch += 1
                    if this_spec is not spec or not single:
                        spec = this_spec
                        args_list = []
                        kwargs_list = None
                        single = True
                        group = [spec, args_list, None, True]
                        groups.append(group)
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
                args = block.args_at(k)
                kwargs = block.kwargs_at(k)
                flags = block.flags
            else:
                fut = future_of(payload)
                this_spec = fut._spec
                args = fut._args
                kwargs = fut._kwargs
                flags = fut._flags
            i += 1
            one = flags & ONE_ARG
            if args is None and not one:
                args = ()           # ended meanwhile (cancelled): it will not run
            elif flags & NEEDS_RESOLVE:
                args = resolve(args, False, 0, self) if one else resolve_args(args, self)
                if kwargs is not None:
                    kwargs = resolve(kwargs, False, 0, self)
            if this_spec is not spec:
                spec = this_spec
                args_list = []
                kwargs_list = None
                single = unpack_single
                group = [spec, args_list, None, single] if unpack_single else [spec, args_list, None]
                groups.append(group)
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
        if unpack_single:
            for group in groups:
                if group[3] and type(group[1]) is list:
                    group[1] = _as_range(<list>group[1])
        return groups

    def finish(self, futures, list values, states):
        """End taken runs (a RunList or a list of futures): run i ended in
        states[i] (COMPLETED, FAILED or CRASHED, as in
        taskrunner._graph.STATES; or one state for all) with values[i], its
        result or exception."""
        cdef RunList runs = _as_runlist(futures, "futures")
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef Py_ssize_t i, k, n = runs.n
        cdef int32_t spawn
        cdef TaskFuture fut
        cdef MapBlock block
        cdef void* payload
        cdef uint8_t* codes
        cdef bint remote = self.fetch is not None
        cdef bint settling = False
        if PyList_GET_SIZE(values) != n:
            raise ValueError("futures and values differ in length")
        codes = <uint8_t*>malloc(n + 1)
        if codes == NULL:
            raise MemoryError()
        try:
            _end_states(states, n, codes)
            for i in range(n):
                payload = runs.items[i]
                value = <object>PyList_GET_ITEM(values, i)
                if is_item(payload):
                    block = block_of(payload)
                    k = index_of(payload, block)
                    if block.futures[k] == NULL and not remote:
                        block.item_ended(k, codes[i], value)
                        continue
                    # It ends as its future, and the block counted it until now.
                    block.pending -= 1
                fut = future_of(payload)
                fut._value = value
                _forget_call(fut)
                if remote and codes[i] == COMPLETED:
                    fut._flags |= REMOTE_VALUE
                codes[i] |= _AS_FUTURE
                if fut._extra is not None and fut._extra.callbacks:
                    settling = True
            graph.lock()
            for i in range(n):
                graph.complete_taken_locked(runs.run_at(i), codes[i] & ~_AS_FUTURE, &out)
            spawn = graph.pop_spawn_wanted_locked()
            # Settled below: until the done callbacks ran (or are queued),
            # the graph is not quiet (see _unlock_and_settle).
            settling = settling or out.len > 0
            if settling:
                graph.settling_begin_locked()
            graph.unlock()
            block = None
            self._settle(&out, spawn)
            for i in range(n):
                payload = runs.items[i]
                if codes[i] & _AS_FUTURE:
                    fut = future_of(payload)
                    fut._fire_callbacks()
                    let_go(fut)
                if is_item(payload) and (i + 1 == n or owner_of(runs.items[i + 1]) != owner_of(payload)):
                    block_of(payload).release_if_done()     # the end of a stretch of its items
        finally:
            free(codes)
            if settling:
                graph.settling_end()

    def give_back(self, futures, bint cancel):
        """Taken runs (a RunList or a list of futures) that never started:
        back to the ready queue, or (with `cancel`) cancelled."""
        cdef RunList runs = _as_runlist(futures, "futures")
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef Py_ssize_t i
        graph.lock()
        for i in range(runs.n):
            graph.unstart_locked(runs.run_at(i), cancel, &out)
        self._unlock_and_settle(&out)

    # -- cancelling and shutting down --------------------------------------

    cdef bint _cancel(self, TaskFuture fut) except -1:
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef bint cancelled
        if fut._run < 0:
            return fut._state() == CANCELLED     # detached: final
        graph.lock()
        cancelled = graph.cancel_locked(fut._run, &out)
        self._unlock_and_settle(&out)
        if not cancelled and self._recall is not None and fut._state() == RUNNING:
            cancelled = bool(self._recall(fut))
        # As in concurrent.futures: a cancelled run stays cancelled, and
        # asking again says so.
        return cancelled or fut._state() == CANCELLED

    def cancel_all(self):
        """Cancel every run that has not started."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        graph.lock()
        graph.cancel_all_locked(&out)
        self._unlock_and_settle(&out)
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
        if self._callback_pool is not None:
            self._callback_pool.stop()
        self._specs.clear()
        self._last_spec = None
        self._spawn_consumer = None
        self._recall = None

    def release(self):
        """After close(), once no run is unfinished and the consumers are
        gone: the futures and map blocks still alive keep their final states
        themselves, and the graph's arrays are freed, so that a future kept
        from an exited runner holds a few bytes, not the runner's graph.
        Does nothing if runs are unfinished (an interrupted exit)."""
        cdef Graph graph = self.graph
        cdef int32_t run
        cdef void* payload
        cdef PyObject* owner
        graph.lock()
        if graph.released or not graph.closed or graph.n_unfinished or graph.n_settling:
            graph.unlock()
            return False
        # Field writes only: nothing here allocates or lets go of an object
        # (see _graph.pxd on the GIL and the lock).
        for run in range(graph.run_cap):
            payload = graph.payloads[run]
            if graph.runs[run].state == FREE_SLOT or payload == NULL:
                continue
            owner = owner_of(payload)
            if is_item(payload):
                (<MapBlock>owner).detached = True
            else:
                (<TaskFuture>owner)._final = graph.runs[run].state
                (<TaskFuture>owner)._run = -1
        graph.free_arrays_locked()
        graph.unlock()
        return True

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


cdef inline void _forget_call(TaskFuture fut):
    """Drop a run's call once it started or ended.  Its flag goes too: with
    ONE_ARG, None is an argument, not the mark of a dropped call."""
    fut._args = None
    fut._kwargs = None
    fut._flags &= ~ONE_ARG


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


cdef enum:
    _AS_FUTURE = 128      # finish(): this run ended through its future


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


cdef RunList _as_runlist(object futures, str name):
    """A RunList of taken runs given as one, or as a list of futures."""
    cdef RunList runs
    cdef Py_ssize_t i, n
    if type(futures) is RunList:
        return <RunList>futures
    if not isinstance(futures, list):
        raise TypeError(f"{name} must be a RunList or a list of futures, not {type(futures).__name__}")
    n = PyList_GET_SIZE(futures)
    for i in range(n):
        if type(<object>PyList_GET_ITEM(futures, i)) is not TaskFuture:
            raise TypeError(f"{name} must hold task futures only")
    runs = new_runlist(n)
    runs.n = 0
    for i in range(n):
        fut = <object>PyList_GET_ITEM(futures, i)
        Py_INCREF(fut)
        runs.items[i] = <void*>fut
        runs.n += 1
    return runs


cdef bint _all_of(Engine engine, Upstreams* ups):
    """Whether every upstream in `ups` is a run of `engine`."""
    cdef Py_ssize_t i
    for i in range(ups.len):
        if (<TaskFuture>ups.items[i].future)._engine is not engine:
            return False
    return True


def is_mappable(value):
    """Whether map() maps over `value` (item by item) or passes it whole."""
    return _is_mappable(value)


cdef bint _is_mappable(object value):
    # Not text or a file; and iter() must work (a 0-d array has __iter__,
    # and iter() of it raises TypeError).
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
