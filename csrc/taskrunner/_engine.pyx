# cython: language_level=3, boundscheck=False, wraparound=False
"""The engine: from a Python call to a run of the graph, and its end.

submit() binds the parameters with the task's cached call plan, finds the
futures inside them, builds one TaskFuture and adds one held run with its
edges in a single critical section.  map() binds once; when no item holds a
future it adds its runs as one MapBlock (see _mapped.pyx), with no future
per item, else one future per item as submit() does.  cancel(),
cancel_all(), shutdown() and close() end runs from outside; done callbacks
run here, or on threads of their own (callbacks_apart).

Who runs the runs is not this module's concern: _consume.pyx is the loop of
a consumer thread in this process, _remote.pyx the interface of a runner
that executes them elsewhere (taking them out of the graph in batches,
with the ledger that says which it may still cancel here).

The engine owns one reference to each unfinished run's future (the run's
payload in the graph), or to the block of an unfinished mapped item, and
lets go when the run ends.
"""

cimport cython
from cpython.list cimport PyList_Append, PyList_GET_ITEM
from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.sequence cimport PySequence_Fast_ITEMS
from cpython.tuple cimport PyTuple_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free

from taskrunner._calls cimport CallSpec, as_params, spec_of
from taskrunner._futures cimport (
    HAS_OUTSIDE, ONE_ARG, EngineBase, PyObject_GC_Track, PyObject_GC_UnTrack, TaskFuture,
    blank_future, hold, new_future, until_signal_check,
)
from taskrunner._graph cimport (
    CANCELLED, CAUSE_OUTSIDE, COMPLETED, EDGE_BROKEN, FREE_SLOT, PENDING, RUNNING, Graph, RunVec,
    runvec_free,
)
from taskrunner._mapped cimport (
    FutureList, MapBlock, RunList, detach, fill_args, handed, hold_payload, item_payload, new_block,
    new_runlist, runlist_of, settle_ended,
)
from taskrunner._params cimport (
    Upstream, Upstreams, checked_dependencies, is_plain, scan, scan_call, upstreams_free,
    upstreams_init, wait_for_upstreams,
)

import io
import logging

from taskrunner._callbacks import CallbackPool
from taskrunner._timer import Timer
from taskrunner.annotations import allow_failure, quote, unmapped
from taskrunner.exceptions import (
    MappingLengthMismatch, MappingMissingIterable, UpstreamTaskError,
)

_log = logging.getLogger("taskrunner.engine")

cdef Py_ssize_t _MAX_SPECS = 4096      # = taskrunner._process.wire.MAX_FUNCTIONS
# map() makes and schedules its runs a chunk at a time: the futures it just
# made are still in cache when they are registered.
cdef Py_ssize_t _MAP_CHUNK = 8192


@cython.final
@cython.no_gc_clear     # futures being collected with it still give slots back
cdef class Engine(EngineBase):
    """Scheduling for one entered runner.

    `max_running` bounds the runs executing at once; `spawn_consumer()`, if
    given, is called (with the GIL) each time the graph wants one more
    consumer thread, which must run _consume.work(engine, loop).  A runner
    that executes runs elsewhere speaks to the engine through an Outbox
    (_remote.pyx) and gives `recall(runs)`: asked with a RunList of runs it
    was sent (one, for cancel()) or None (every one, for cancel_all()), it
    returns the RunList of those it took back and that surely never
    started, which the engine cancels.  Such a runner, if the results stay
    where the runs ran, gives `fetch(value, timeout)`: the values it
    finishes completed runs with are then handles, handed as they are to
    downstream runs of this engine, and result() calls fetch to get what one
    stands for (FutureList.result() calls `fetch_many(values, timeout)`
    once for all, if given; `prefetch(values)` fetches many at once and
    keeps them, for a run of another engine that takes them).

    Done callbacks run on the thread that ends the run, unless
    `callbacks_apart`: then on threads of their own (taskrunner._callbacks),
    for a runner whose one receiving thread ends its runs and must never
    block in a user's callback.
    """

    def __cinit__(self, int max_running, spawn_consumer=None, recall=None, fetch=None,
                  fetch_many=None, prefetch=None, bint callbacks_apart=False, limits=None):
        self.graph = Graph(max_running, spawn_consumer is not None)
        self._limit_index = {}
        if limits:
            self._limit_index = {tag: i for i, tag in enumerate(limits)}
            self.graph.set_limits(list(limits.values()))
        if callbacks_apart:
            self._callback_pool = CallbackPool(self._call_callbacks, self._callbacks_done,
                                               "taskrunner-callbacks")
        self._specs = {}
        self.left_behind = set()
        self.consumers = set()
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
            return self._limited(spec_of(task))
        if found is not None:
            return <CallSpec>found
        spec = self._limited(spec_of(task))
        if len(self._specs) >= _MAX_SPECS:
            self._specs.clear()
        self._specs[task] = spec
        return spec

    cdef CallSpec _limited(self, CallSpec spec):
        """`spec`, with the limit set of its tags that the runner limits."""
        cdef uint64_t mask = 0
        if self._limit_index and spec.tags:
            for tag in spec.tags:
                if tag in self._limit_index:
                    mask |= (<uint64_t>1) << <int>self._limit_index[tag]
            spec.lim = self.graph.limit_set_of(mask)
        return spec

    def limited_tags(self, CallSpec spec):
        """The tags of `spec`'s task that the runner limits, joined by ","."""
        return ",".join(sorted(tag for tag in spec.tags if tag in self._limit_index))

    def spec_of(self, task):
        """The call plan of `task`, cached for this engine: a runner keeps
        what it needs per task on it (CallSpec.wire)."""
        return self._spec_for(task)

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
                # Holds the upstreams' references while their edges are made.
                _held = wait_for_upstreams(wait_for, &ups)
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

    cdef void _release_new_locked(self, int32_t run, bint cancel, RunVec* out) noexcept:
        """Release a run just added, with the cause its edges found (kept
        in its record meanwhile); cancelled first if `cancel` or the runner
        is exiting by exception."""
        self.graph.release_added_locked(&run, 1, cancel or self._cancel_new, out)

    cdef void unlock_and_settle(self, RunVec* out):
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
        self.settle(out, spawn)
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
        if self.trace is not None:
            # Before the runs exist: once one starts, its arguments, which
            # hold the upstreams, may go.
            self.trace.add_run_edges(self, futs, n, shared, own, first)
        self._lock_open()
        for i in range(n):
            fut = <TaskFuture>futs[i]
            run = graph.add_run_locked(<void*>fut, 0, <uint8_t>fut._spec.lim)
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
            self.settle(&out, spawn)
        else:
            self.unlock_and_settle(&out)
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
        if fut._run < 0 or graph.released:
            return      # it left the graph (its runner exited): nothing waits
        if up._state() != COMPLETED and not allow and fut._state() == PENDING:
            fut._value = up         # the cause, kept before the run can end
            cause = CAUSE_OUTSIDE
        graph.lock()
        graph.release_locked(fut._run, cause, &out)
        self.unlock_and_settle(&out)

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
        mapped, statics = split_mapped(parameters, "map", spec.name)
        for name, value, wrap in mapped:
            names.append(name)
            # As Prefect does: an annotation around an iterable wraps each item.
            columns.append(value if wrap is None else [wrap(item) for item in value])
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
                _held = wait_for_upstreams(wait_for, &shared)
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
        cdef uint8_t lim = <uint8_t>block.spec.lim
        # Items that wait for nothing go READY as they are added; the others
        # are added held, get their edges, and are released together.
        cdef bint ready_now = not shared.len and not lim and not self._cancel_new
        if self.trace is not None:
            self.trace.add_item_edges(self, block, lo, hi, shared)
        self._lock_open()
        for i in range(lo, hi):
            if ready_now:
                run = graph.add_ready_run_locked(item_payload(block, i))
            else:
                run = graph.add_run_locked(item_payload(block, i), 0, lim)
            if run < 0:
                oom = True
                break
            block.item_added(i, run)
            if ready_now:
                continue
            cause = -1
            if shared.len:
                cause = self._add_edges_locked(run, shared.items, shared.len, -1, &outside)
            if cause == -3:
                oom = True
                break
            graph.runs[run].cause = cause     # kept until the release below
        block.hold_while_pending()
        if ready_now:
            if oom:
                for i in range(lo, block.registered):
                    graph.cancel_locked(block.runs[i], &out)
            graph.ready_added_locked()
        else:
            graph.release_added_locked(block.runs + lo, block.registered - lo,
                                       oom or self._cancel_new, &out)
        self.unlock_and_settle(&out)
        if oom:
            raise MemoryError("the scheduler cannot hold this many runs or edges")
        return 0

    cdef void _cancel_items(self, MapBlock block):
        cdef RunVec out = RunVec(NULL, 0, 0)
        self.graph.lock()
        block.cancel_unstarted_locked(&out)
        self.unlock_and_settle(&out)

    cdef void settle(self, RunVec* out, int32_t spawn):
        """After a critical section: let go of the runs it ended, free the
        vector, and start the consumers the graph asked for."""
        if out.len:
            settle_ended(out)
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
        cdef int32_t _i
        if self._spawn_consumer is None:
            return
        for _i in range(n):
            try:
                self._spawn_consumer()
            except BaseException:
                # Count the consumer that never came; the graph's ask for
                # one in its place waits for the next to take the asks.
                self.graph.consumer_enter()
                self.graph.ask_again(self.graph.consumer_exit())
                _log.exception("could not start a worker for the task runner")

    # -- cancelling and shutting down --------------------------------------

    cdef bint _cancel(self, TaskFuture fut) except -1:
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef bint cancelled
        if fut._run < 0 or graph.released:
            return fut._state() == CANCELLED     # detached: final
        graph.lock()
        cancelled = graph.cancel_locked(fut._run, &out)
        self.unlock_and_settle(&out)
        if not cancelled and self._recall is not None and fut._state() == RUNNING:
            # Sent on to a consumer elsewhere (the ledger says it is not
            # here to cancel): only that consumer can take it back.
            self.unstart(self._recall(runlist_of(fut)), True)
        # As in concurrent.futures: a cancelled run stays cancelled, and
        # asking again says so.
        return fut._state() == CANCELLED

    def cancel_unstarted(self, FutureList futures, bint recall=True):
        """Cancel every run of `futures` (a map's, or any list of this
        engine's futures) that has not started, as cancel() of each would:
        in one critical section here, and in one recall of those sent on to
        a consumer elsewhere (not with `recall` false: those go on)."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef MapBlock block = futures._block
        cdef TaskFuture fut
        cdef list futures_made
        cdef list sent_items = []
        cdef RunList sent
        cdef Py_ssize_t i
        if block is not None:
            if block.detached or block.engine is not self:
                return
            futures_made = [<object>handed(block, i) for i in range(block.registered)
                            if handed(block, i) != NULL]
        else:
            futures_made = [f for f in list.__iter__(futures) if type(f) is TaskFuture
                            and (<TaskFuture>f)._engine is self and (<TaskFuture>f)._run >= 0]
        if graph.released:
            return
        graph.lock()
        if block is not None:
            block.cancel_unstarted_locked(&out)
        for f in futures_made:
            graph.cancel_locked((<TaskFuture>f)._run, &out)
        self.unlock_and_settle(&out)
        if self._recall is None or not recall:
            return
        # What is still RUNNING was sent on (or is running): the backend
        # takes back those that surely never started.
        if block is not None:
            for i in range(block.registered):
                if (handed(block, i) == NULL and not block.ended[i]
                        and graph.state_of(block.runs[i]) == RUNNING):
                    sent_items.append(i)
        futures_made = [f for f in futures_made if (<TaskFuture>f)._state() == RUNNING]
        if not sent_items and not futures_made:
            return
        sent = new_runlist(len(sent_items) + len(futures_made))
        for i in range(len(sent_items)):
            sent.items[i] = item_payload(block, <Py_ssize_t>sent_items[i])
            hold_payload(sent.items[i])
        for i in range(len(futures_made)):
            fut = <TaskFuture>futures_made[i]
            Py_INCREF(fut)
            sent.items[len(sent_items) + i] = <void*>fut
        self.unstart(self._recall(sent), True)

    cdef int unstart(self, RunList runs, bint cancel) except -1:
        """Taken runs that never started: back to the ready queue, or (with
        `cancel`) cancelled."""
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef Py_ssize_t i
        if runs is None or runs.n == 0:
            return 0
        self.graph.lock()
        for i in range(runs.n):
            self.graph.unstart_locked(runs.run_at(i), cancel, &out)
        self.unlock_and_settle(&out)
        return 0

    def cancel_all(self):
        """Cancel every run that has not started."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        graph.lock()
        graph.cancel_all_locked(&out)
        self.unlock_and_settle(&out)
        if self._recall is not None:
            self.unstart(self._recall(None), True)

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

    cdef object call_later(self, double delay, object fn, tuple args):
        """fn(*args) on the engine's timer thread after `delay` seconds;
        returns the entry (entry.cancel())."""
        if self._timer is None:
            self._timer = Timer("taskrunner-timer")
        return self._timer.call_later(delay, fn, *args)

    def _end_retry_wait(self, owner, int32_t run):
        """A run's retry delay has passed: it is ready again (if it was
        cancelled meanwhile, its slot is let go).  `owner` kept its payload
        alive until now."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        graph.lock()
        if graph.released:
            graph.unlock()
            return
        graph.release_locked(run, -1, &out)
        self.unlock_and_settle(&out)

    def close(self):
        """Stop the consumers now, whatever is unfinished, and let go of the
        callables and the runner: ended futures keep the engine alive, and
        must not keep those alive through it."""
        self.graph.close()
        if self._timer is not None:
            self._timer.stop()
        if self._callback_pool is not None:
            self._callback_pool.stop()
        self._specs.clear()
        self._last_spec = None
        self._spawn_consumer = None
        self._recall = None

    def free_graph(self):
        """After close(), once no run is unfinished and the consumers are
        gone: the futures and map blocks still alive keep their final states
        themselves, and the graph's arrays are freed, so that a future kept
        from an exited runner holds a few bytes, not the runner's graph.
        Does nothing if runs are unfinished (an interrupted exit)."""
        cdef Graph graph = self.graph
        cdef int32_t run
        cdef void* payload
        graph.lock()
        if graph.released or not graph.closed or graph.n_unfinished or graph.n_settling:
            graph.unlock()
            return False
        # Field writes only: nothing here allocates or lets go of an object
        # (see _graph.pxd on the GIL and the lock).
        for run in range(graph.run_cap):
            payload = graph.payloads[run]
            if graph.runs[run].state != FREE_SLOT and payload != NULL:
                detach(payload, graph.runs[run].state)
        graph.free_arrays_locked()
        graph.unlock()
        return True

    @property
    def timer_entries(self):
        """Calls waiting on the engine's timer (retry delays, deadlines)."""
        return len(self._timer) if self._timer is not None else 0

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


def split_mapped(parameters, str what, str task_name):
    """map()'s rules for its parameters, shared with imap(): (mapped,
    statics).  `mapped` lists (name, iterable, wrap) for each parameter
    mapped item by item, `wrap` the annotation (allow_failure, quote) each
    item goes in, or None; `statics` holds the values passed whole to every
    call (unmapped ones unwrapped).  A future is waited for and its result
    used.  MappingMissingIterable if nothing is mapped; `what` ("map",
    "imap") names the call in the errors."""
    cdef list mapped = []
    cdef dict statics = {}
    for name, value in as_params(parameters).items():
        if isinstance(value, unmapped):
            statics[name] = (<object>value).value
            continue
        if isinstance(value, TaskFuture):
            value = _mapped_future_result(<TaskFuture>value, name, what, task_name)
        if isinstance(value, (allow_failure, quote)) and _is_mappable((<object>value).value):
            mapped.append((name, (<object>value).value, type(value)))
        elif _is_mappable(value):
            mapped.append((name, value, None))
        else:
            statics[name] = value
    if not mapped:
        raise MappingMissingIterable(
            f"{what} of task {task_name!r} got no iterable parameter to map over; give at "
            f"least one list, tuple or other iterable (wrap a value in unmapped() to pass "
            f"it whole to every call)")
    return mapped, statics


cdef object _mapped_future_result(TaskFuture fut, str name, str what, str task_name):
    try:
        return fut.result()
    except BaseException as exc:
        raise UpstreamTaskError(
            f"{what} of task {task_name!r}: parameter {name!r} is the future of task run "
            f"{fut.task_name!r} ({fut.task_run_id}), which did not complete", fut) from exc
