# cython: language_level=3, boundscheck=False, wraparound=False
"""Mapped runs without a future each.

A map over a million items used to make a million TaskFutures up front, and
a consumer in another process read each one's arguments and wrote each
one's result through it: most of a large map's cost here.  A MapBlock keeps
the items' runs, states and results in C arrays instead, and reads each
call off the mapped columns when it is sent; a FutureList over a block
makes the futures only when it is first used as a list.  `result()` on it
reads the arrays directly.
"""

cimport cython
from cpython.list cimport PyList_GET_ITEM, PyList_SET_ITEM
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport int32_t, uint8_t
from libc.stdlib cimport calloc, free, malloc

from taskrunner._calls cimport CallSpec, untracked_if_atomic
from taskrunner._futures cimport (
    CALLBACKS_FIRED, NEEDS_RESOLVE, ONE_ARG, REMOTE_VALUE, EngineBase, TaskFuture, blank_future,
    deadline_of, forget_call, hold, let_go, remaining, wait_run,
)
from taskrunner._graph cimport (
    CANCELLED, COMPLETED, FAILED, NOT_READY, Graph, RunVec, runvec_clear, tr_monotonic,
)

import logging
import uuid

from taskrunner import _logging as _logs


@cython.final
@cython.no_gc_clear     # __dealloc__ needs the engine to give the slots back
@cython.trashcan(True)  # it may hold the head of a long NotReady chain
cdef class MapBlock:
    """The runs of one map(): item i's run, final state and value, and its
    call, made from the mapped columns when it is needed."""

    def __dealloc__(self):
        cdef Py_ssize_t i
        cdef Graph graph = self.engine.graph if self.engine is not None else None
        if graph is not None and self.registered and not (self.detached or graph.released):
            # Every item has ended.  A handed-over item's slot is its
            # future's to give back, and must no longer point here.
            graph.lock()
            for i in range(self.registered):
                if handed(self, i) == NULL:
                    graph.drop_locked(self.runs[i])
                else:
                    graph.swap_payload_locked(self.runs[i], item_payload(self, i),
                                              <void*>handed(self, i), True)
            graph.unlock()
        if self.values != NULL:
            for i in range(self.n):
                Py_XDECREF(self.values[i])
        if self.futures != NULL:
            for i in range(self.n):
                Py_XDECREF(self.futures[i])
        free(self.runs)
        free(self.ended)
        free(self.values)
        free(self.futures)
        free(self.tags)
        free(self.retried)

    cdef object args_at(self, Py_ssize_t i):
        """Item i's positional arguments: a tuple, or with ONE_ARG the one."""
        cdef list row
        if self.one_column:
            return self.columns[0][i]
        row = [column[i] for column in self.columns]
        if self.flags & ONE_ARG:
            return row[<Py_ssize_t>self.column_at[0]]
        return fill_args(self.template_args, self.column_at, row)

    cdef object kwargs_at(self, Py_ssize_t i):
        if not self.kw_slots:
            return self.static_kwargs
        kwargs = dict(self.static_kwargs)
        for key, k in self.kw_slots:
            kwargs[key] = self.columns[<Py_ssize_t>k][i]
        return kwargs

    cdef TaskFuture future_at(self, Py_ssize_t i):
        """Item i's future, made on first use (see hand_over)."""
        if handed(self, i) == NULL:
            self.hand_over(i, i + 1, False)
        return <TaskFuture>handed(self, i)

    cdef TaskFuture take_over(self, Py_ssize_t i):
        """future_at(), by the consumer that took item i: it holds the only
        copy of the running item's payload, so the future becomes the run's
        payload now, and the consumer may end it through the future alone."""
        self.hand_over(i, i + 1, True)
        return <TaskFuture>handed(self, i)

    cdef int hand_over(self, Py_ssize_t lo, Py_ssize_t hi, bint taker) except -1:
        """Make the futures of items lo .. hi-1 that have none.  An
        unfinished item is handed over: its future holds its call, becomes
        its run's payload, and ends as any submitted run does.

        A consumer may hold a running item's payload, taken without the GIL
        (unless the caller is that consumer, `taker`): the run keeps it, and
        the block counts the item until it ends as its future."""
        cdef Graph graph = self.engine.graph
        cdef TaskFuture fut
        cdef Py_ssize_t i, unfinished = 0, swapped = 0
        if self.futures == NULL:
            self.futures = <PyObject**>calloc(self.n + 1, sizeof(PyObject*))
            if self.futures == NULL:
                raise MemoryError()
        # The futures first: nothing may allocate under the graph's lock.
        for i in range(lo, hi):
            if handed(self, i) != NULL:
                unfinished += not self.ended[i]
                continue
            # Whatever allocates comes before the test of ended[i]: an
            # allocation may run the cyclic GC, and so other threads, and a
            # consumer ending item i meanwhile must see either no future
            # (and end it as an item) or this one, complete.
            fut = blank_future(self.engine, self.spec)
            args = kwargs = None
            if i < self.registered and not self.ended[i]:
                args = self.args_at(i)
                kwargs = self.kwargs_at(i)
            if self.traced:
                fut._uuid = self.trace_key + i      # the item's key in the run trace
            elif self.id_base is not None:
                # A record named the item by its id already: the future
                # shows the same.  Tested last, so that no other thread can
                # make the base between the test and the publication.
                fut._uuid = item_run_id(self, i)
            # From here to the publication below: no allocation, and no
            # reference dropped to zero.
            if self.detached or graph.released:
                fut._run = -1
                fut._final = self.ended[i]
            else:
                fut._run = self.runs[i] if i < self.registered else -1
            if self.retried != NULL:
                fut._retried = self.retried[i]
            if self.ended[i]:
                if self.values[i] != NULL:
                    fut._value = <object>self.values[i]
                    Py_DECREF(<object>self.values[i])
                    self.values[i] = NULL
                fut._flags = CALLBACKS_FIRED
            elif i < self.registered:
                fut._args = args
                fut._kwargs = kwargs
                fut._flags = self.flags
                hold(fut)
                unfinished += 1
            Py_INCREF(fut)
            self.futures[i] = <PyObject*>fut
        if unfinished and not graph.released:
            graph.lock()
            for i in range(lo, min(hi, self.registered)):
                if not self.ended[i] and graph.swap_payload_locked(
                        self.runs[i], item_payload(self, i), <void*>handed(self, i), taker):
                    swapped += 1
            graph.unlock()
            self.pending -= swapped
            self.let_go_if_done()
        if self.on_end is not None:
            # Such a future may end as a future, unseen here: its callback
            # tells the consumer (who may hear of an item twice).
            for i in range(lo, min(hi, self.registered)):
                if not self.ended[i]:
                    (<TaskFuture>handed(self, i)).add_done_callback(
                        _EndNote(self.on_end, self.on_end_base + i))
        return 0

    cdef void item_ended(self, Py_ssize_t i, uint8_t state, object value) noexcept:
        """Item i (not handed over) ended in `state` with `value`; before
        its run is final in the graph, so a reader that sees the run final
        finds them here."""
        if value is not None:
            Py_INCREF(value)
            Py_XDECREF(self.values[i])
            self.values[i] = <PyObject*>value
        self.ended[i] = state
        self.pending -= 1
        count_end(self, state)
        if self.on_end is not None:
            self.notify_end(i)

    cdef void notify_end(self, Py_ssize_t i) noexcept:
        """Item i ends (as an item or as its future): tell the streaming
        consumer, if there is one.  Called with the GIL, off the graph's
        lock, before the graph marks the run final: the consumer reads the
        item's state here, or waits on its future."""
        if self.on_end is None:
            return
        try:
            self.on_end.put(self.on_end_base + i)
        except BaseException:
            pass    # only out of memory: the consumer then waits on the item

    cdef void item_added(self, Py_ssize_t i, int32_t run) noexcept:
        """Item i is now run `run` of the graph (items are added in order)."""
        self.runs[i] = run
        self.registered = i + 1
        self.pending += 1

    cdef void hold_while_pending(self) noexcept:
        """The engine's reference, kept while an item is its to end."""
        if self.pending and not self.held:
            self.held = True
            Py_INCREF(self)

    cdef void cancel_unstarted_locked(self, RunVec* out):
        """Cancel the items not started and not handed over (the graph's
        lock held)."""
        cdef Py_ssize_t i
        for i in range(self.registered):
            if handed(self, i) == NULL:
                self.engine.graph.cancel_locked(self.runs[i], out)

    cdef void let_go_if_done(self) noexcept:
        """The engine lets go of the block once no item is its to end.  The
        caller holds a reference of its own."""
        if self.held and self.pending == 0:
            self.held = False
            Py_DECREF(self)

    def __len__(self):
        return self.n


cdef inline void count_end(MapBlock block, uint8_t state) noexcept:
    """Item `block`'s item ended in `state`, as the block saw it."""
    block.n_ended += 1
    block.n_failed += state != COMPLETED


@cython.final
cdef class _EndNote:
    """A done callback that puts a number on a streaming consumer's queue."""
    cdef object queue
    cdef Py_ssize_t number

    def __cinit__(self, queue, Py_ssize_t number):
        self.queue = queue
        self.number = number

    def __call__(self, future):
        self.queue.put(self.number)


cdef MapBlock new_block(EngineBase engine, CallSpec spec, Py_ssize_t n):
    cdef MapBlock block = MapBlock.__new__(MapBlock)
    cdef Py_ssize_t i
    block.engine = engine
    block.spec = spec
    block.n = n
    block.runs = <int32_t*>malloc(n * sizeof(int32_t) + 1)
    block.ended = <uint8_t*>calloc(n + 1, sizeof(uint8_t))
    block.values = <PyObject**>calloc(n + 1, sizeof(PyObject*))
    block.tags = <void**>malloc(n * sizeof(void*) + 1)
    if (block.runs == NULL or block.ended == NULL or block.values == NULL
            or block.tags == NULL):
        raise MemoryError()
    for i in range(n):
        block.tags[i] = <void*>block
    return block


cdef tuple fill_args(tuple template, list column_at, list row):
    """The template's arguments with each mapped position taken from `row`."""
    cdef Py_ssize_t i, column, n = PyTuple_GET_SIZE(template)
    cdef tuple args = PyTuple_New(n)
    cdef object value
    for i in range(n):
        column = column_at[i]
        if column < 0:
            value = <object>PyTuple_GET_ITEM(template, i)
        else:
            value = row[column]
        Py_INCREF(value)
        PyTuple_SET_ITEM(args, i, value)
    return untracked_if_atomic(args)


# -- taken runs ------------------------------------------------------------------

@cython.final
cdef class TakenCall:
    """The call of a taken run (see _mapped.pxd): one per consumer, read
    again for each run, so that reading a call makes no object of its own."""

    cdef int read(self, void* payload, bint starting) except -1:
        """Read the call of the run `payload` stands for.  `starting`: it
        starts now, and a future drops its call (its arguments may be
        large); a consumer that may send it again later reads it without."""
        cdef MapBlock block
        cdef TaskFuture fut
        cdef Py_ssize_t i
        if is_item(payload):
            block = block_of(payload)
            i = index_of(payload, block)
            if handed(block, i) == NULL:
                self.spec = block.spec
                self.args = block.args_at(i)
                self.kwargs = block.kwargs_at(i)
                self.flags = block.flags
                return 0
            fut = <TaskFuture>handed(block, i)
        else:
            fut = <TaskFuture>payload
        self.spec = fut._spec
        self.flags = fut._flags
        self.args = fut._args
        self.kwargs = fut._kwargs
        if self.args is None and not (self.flags & ONE_ARG):
            self.args = ()          # ended meanwhile (cancelled): it will not run
        if starting and not self.spec.retries:
            # (A run that may be retried keeps its call for the next attempt.)
            forget_call(fut)
        return 0


cdef TaskFuture record_end(void* payload, uint8_t state, object value, bint kept_elsewhere):
    """A taken run ended in `state` with `value` (its result or exception):
    keep them where readers look, before the graph marks the run final.  A
    mapped item ends in its block, unless it has a future by now, or the
    value is a handle to a result kept elsewhere (`kept_elsewhere`, which
    only a future can stand for).  Returns the future to settle after the
    graph's update (settle_end), or None."""
    cdef MapBlock block
    cdef TaskFuture fut
    cdef Py_ssize_t i
    if state != COMPLETED:
        _log_end(payload, state, value)
    if is_item(payload):
        block = block_of(payload)
        i = index_of(payload, block)
        if handed(block, i) == NULL and not kept_elsewhere:
            block.item_ended(i, state, value)
            return None
        fut = block.future_at(i)
        # It ends as its future, and the block counted it until now.
        block.pending -= 1
        count_end(block, state)
        block.notify_end(i)
    else:
        fut = <TaskFuture>payload
    fut._value = value
    forget_call(fut)
    if kept_elsewhere and state == COMPLETED:
        fut._flags |= REMOTE_VALUE
    return fut


cdef inline TaskFuture _future_if_made(void* payload):
    """The future of the run a payload stands for if it has one (a mapped
    item may not yet), else None."""
    cdef MapBlock block
    cdef void* fut
    if not is_item(payload):
        return <TaskFuture>payload
    block = block_of(payload)
    fut = handed(block, index_of(payload, block))
    return <TaskFuture>fut if fut != NULL else None


cdef CallSpec spec_at(void* payload):
    """The call plan of the run a payload stands for."""
    if is_item(payload):
        return block_of(payload).spec
    return (<TaskFuture>payload)._spec


cdef int32_t retries_of(void* payload) noexcept:
    """How many times the run a taken payload stands for was retried."""
    cdef TaskFuture fut = _future_if_made(payload)
    cdef MapBlock block
    if fut is not None:
        return fut._retried
    block = block_of(payload)
    return block.retried[index_of(payload, block)] if block.retried != NULL else 0


cdef int count_retry(void* payload) except -1:
    """Count one more retry of the run a taken payload stands for, before
    it is pending again: a future made for it from then on says so."""
    cdef TaskFuture fut = _future_if_made(payload)
    cdef MapBlock block
    cdef Py_ssize_t i
    if fut is not None:
        fut._retried += 1
        return 0
    block = block_of(payload)
    i = index_of(payload, block)
    if block.retried == NULL:
        block.retried = <int32_t*>calloc(block.n, sizeof(int32_t))
        if block.retried == NULL:
            raise MemoryError()
    block.retried[i] += 1
    return 0


cdef Py_ssize_t end_items(void** payloads, Py_ssize_t n, uint8_t* states, list values,
                          Py_ssize_t offset, int32_t* runs) noexcept:
    """record_end() for the longest leading stretch of `payloads` that are
    consecutive items of one block with no future: item j ended in
    states[j] with values[offset + j]; its run goes into runs[j].  Returns
    the stretch's length: 0 if payloads[0] is no such item."""
    cdef MapBlock block
    cdef Py_ssize_t j = 0, k, limit
    cdef PyObject* value
    if not is_item(payloads[0]):
        return 0
    block = block_of(payloads[0])
    k = index_of(payloads[0], block)
    if block.futures == NULL and block.on_end is None:
        # No item has a future and no stream waits on them: item_ended()
        # for each completed one, the counts kept once for the stretch.
        # Nothing here runs Python code, which could hand an item over:
        # anything else (a failure, which is logged) goes the long way.
        limit = min(n, block.registered - k)
        while (j < limit and states[j] == COMPLETED and block.values[k + j] == NULL
               and payloads[j] == item_payload(block, k + j)):
            value = PyList_GET_ITEM(values, offset + j)
            if value != <PyObject*>None:
                Py_INCREF(<object>value)
                block.values[k + j] = value
            block.ended[k + j] = COMPLETED
            runs[j] = block.runs[k + j]
            j += 1
        block.pending -= j
        block.n_ended += j
    while (j < n and k + j < block.registered and payloads[j] == item_payload(block, k + j)
           and handed(block, k + j) == NULL):
        if states[j] != COMPLETED:
            _log_end(payloads[j], states[j], <object>PyList_GET_ITEM(values, offset + j))
        block.item_ended(k + j, states[j], <object>PyList_GET_ITEM(values, offset + j))
        runs[j] = block.runs[k + j]
        j += 1
    return j


cdef void settle_end(void* payload, TaskFuture fut, bint last_of_stretch):
    """After the graph marked a taken run final: run its future's done
    callbacks and let the future go; and, if this is the last of a stretch
    of one block's items, let go of the block if none is left to end."""
    if fut is not None:
        fut._fire_callbacks()
        let_go(fut)
    if last_of_stretch and is_item(payload):
        block_of(payload).let_go_if_done()


cdef void settle_ended(RunVec* out):
    """Record and settle the runs the graph ended without running them:
    cancelled (cause -1), or NOT_READY because of their cause."""
    cdef Py_ssize_t i, k
    cdef TaskFuture fut
    cdef MapBlock block
    cdef TaskFuture cause
    cdef void* payload
    if out.len and _logs.runs_log.isEnabledFor(_DEBUG):
        _log_never_ran(out)
    for i in range(out.len):
        payload = out.items[i].payload
        if is_item(payload):
            block = block_of(payload)
            k = index_of(payload, block)
            if handed(block, k) == NULL:
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
            count_end(block, CANCELLED if out.items[i].cause == -1 else NOT_READY)
            block.notify_end(k)
            out.items[i].run = -2
            Py_INCREF(block)
            payload = <void*>handed(block, k)
        fut = <TaskFuture>payload
        if out.items[i].cause_payload != NULL and is_item(out.items[i].cause_payload):
            cause = future_of(out.items[i].cause_payload)   # kept by its block
            out.items[i].cause_payload = <void*>cause
        forget_call(fut)
        if out.items[i].cause_payload != NULL and fut._value is None:
            fut._value = <object>out.items[i].cause_payload
    for i in range(out.len):
        payload = out.items[i].payload
        if out.items[i].run == -1:
            block = block_of(payload)
            block.let_go_if_done()
            Py_DECREF(block)
            continue
        fut = future_of(payload)
        fut._fire_callbacks()
        let_go(fut)
        if out.items[i].run == -2:
            block = block_of(payload)
            block.let_go_if_done()
            Py_DECREF(block)
    runvec_clear(out)


cdef void detach(void* payload, uint8_t state) noexcept:
    """The run a payload stands for leaves its graph, final in `state` (see
    Engine.free_graph): its future keeps the state, or its block knows all
    its items ended.  Field writes only: called under the graph's lock."""
    cdef MapBlock block
    cdef PyObject* fut
    if is_item(payload):
        block = block_of(payload)
        block.detached = True
        # A future made while a consumer held the item's payload ended as
        # the future, but the slot still points at the item.
        fut = handed(block, index_of(payload, block))
        if fut == NULL:
            return
    else:
        fut = <PyObject*>payload
    (<TaskFuture>fut)._final = state
    (<TaskFuture>fut)._run = -1


# -- what log records say of a run -------------------------------------------------

cdef object _DEBUG = logging.DEBUG


cdef object item_run_id(MapBlock block, Py_ssize_t i):
    """The run id of item i, the uuid.UUID its future shows once made
    (hand_over), with no future made for it: the block's random version-4
    uuid with the index xor-ed into its last 48 bits (random ones, so the
    version and variant stay, and the ids of one block differ); in a traced
    block, the id the run trace makes of the item's key."""
    if block.traced:
        return block.engine.trace.run_uuid(block.trace_key + i)
    if block.id_base is None:
        base = uuid.uuid4().int
        if block.id_base is None:       # the uuid call may let another thread make one
            block.id_base = base
    return uuid.UUID(int=block.id_base ^ i)


cdef inline int _attempt_of(void* payload) noexcept:
    """The attempt a taken run is on, counting from 1."""
    return retries_of(payload) + 1


cdef tuple run_facts(void* payload):
    """(task name, run id, attempt) of the run `payload` stands for, as
    log records about it carry them, with no future made for an item."""
    cdef TaskFuture fut = _future_if_made(payload)
    cdef MapBlock block
    if fut is not None:
        return fut._spec.name, fut.task_run_id, _attempt_of(payload)
    block = block_of(payload)
    return block.spec.name, item_run_id(block, index_of(payload, block)), _attempt_of(payload)


cdef void _log_end(void* payload, uint8_t state, object value) noexcept:
    """A taken run ended FAILED or CRASHED: say so (taskrunner._logging),
    counted against its runner's budget first: past it, with DEBUG off,
    nothing more is made.  A handler that raises loses the record, never
    the run."""
    cdef MapBlock block
    cdef TaskFuture fut
    try:
        if is_item(payload):
            block = block_of(payload)
            engine, name = block.engine, block.spec.name
        else:
            fut = <TaskFuture>payload
            engine, name = fut._engine, fut._spec.name
        verdict = _logs.charge(engine, name)
        if verdict is None:
            return
        name, run_id, attempt = run_facts(payload)
        if state == FAILED:
            _logs.run_failed(name, run_id, attempt, value, engine, verdict)
        else:
            _logs.run_crashed(name, run_id, attempt, value, engine, verdict)
    except Exception:
        pass


cdef void _log_never_ran(RunVec* out) noexcept:
    """DEBUG records of the runs the graph ended without running them."""
    cdef Py_ssize_t i
    cdef void* cause
    try:
        for i in range(out.len):
            name, run_id, _ = run_facts(out.items[i].payload)
            cause = out.items[i].cause_payload
            if out.items[i].cause == -1:
                why = "cancelled"
            elif cause != NULL and (is_item(cause) or type(<object>cause) is TaskFuture):
                up_name, up_id, _ = run_facts(cause)
                why = f"NotReady: upstream task run {up_name!r} ({up_id}) did not complete"
            else:
                why = "NotReady: an upstream did not complete"
            _logs.run_never_ran(name, run_id, why)
    except Exception:
        pass


cdef MapBlock plain_stretch(void** payloads, Py_ssize_t n, Py_ssize_t* first,
                            Py_ssize_t* length):
    """If payloads[0] is a mapped item whose call is its column-0 value
    alone (one column, no keywords, nothing to resolve) and has no future,
    the block; first[0] is its index and length[0] how many of the next
    payloads are its consecutive items likewise (a slice of the column is
    then their arguments).  Else None."""
    cdef MapBlock block
    cdef Py_ssize_t k, count = 1
    if not is_item(payloads[0]):
        return None
    block = block_of(payloads[0])
    k = index_of(payloads[0], block)
    if (handed(block, k) != NULL or not block.one_column or block.static_kwargs is not None
            or block.flags & NEEDS_RESOLVE):
        return None
    while (count < n and payloads[count] == item_payload(block, k + count)
           and handed(block, k + count) == NULL):
        count += 1
    first[0] = k
    length[0] = count
    return block


# -- the list map() returns -----------------------------------------------------

@cython.final
cdef class FutureList(list):
    """A list of futures, as map() returns them, in input order.

    A mapped list makes its futures when it is first used as a list;
    `result()`, `wait()` and `len()` need none of them."""

    cdef int _materialize(self) except -1:
        cdef MapBlock block = self._block
        cdef Py_ssize_t i
        if block is None:
            return 0
        block.hand_over(0, block.n, False)
        for i in range(block.n):
            list.append(self, <object>handed(block, i))
        self._block = None
        return 0

    def wait(self, timeout=None, progress=False):
        """Block until every future is final or `timeout` seconds pass.
        `progress`: draw a progress bar on stderr meanwhile (True: if it is
        a terminal; "always": even if not)."""
        cdef double deadline = deadline_of(timeout)
        if progress is False:
            self._wait_all(deadline)
            return
        bar = _open_bar(self, progress)
        try:
            self._wait_all(deadline)
        finally:
            if bar is not None:
                bar.close()

    cdef int _wait_all(self, double deadline) except -1:
        cdef MapBlock block = self._block
        cdef Py_ssize_t i
        if block is None:
            for fut in self:
                fut.wait(remaining(deadline))
                if deadline >= 0 and tr_monotonic() >= deadline:
                    return 0
            return 0
        for i in range(block.n):
            if handed(block, i) != NULL:
                (<TaskFuture>handed(block, i)).wait(remaining(deadline))
            elif not block.ended[i] and not wait_run(block.engine.graph, block.runs[i], deadline):
                return 0
        return 0

    def result(self, timeout=None, raise_on_failure=True, progress=False):
        """The results, in input order.  Raises the first failure met (unless
        raise_on_failure=False), or TimeoutError after `timeout` seconds.
        `progress` as for wait()."""
        cdef double deadline = deadline_of(timeout)
        if progress is False:
            return self._collect(0, len(self), None, deadline, timeout, raise_on_failure, None,
                                 False, NULL)
        bar = _open_bar(self, progress)
        try:
            return self._collect(0, len(self), None, deadline, timeout, raise_on_failure, None,
                                 False, NULL)
        finally:
            if bar is not None:
                bar.close()

    # For a progress bar (taskrunner/progress.py), from its drawing thread.

    def _block_ended(self):
        """(ended, failed) of the items, as the block counts them; None once
        the list has its futures (then _scan_ended counts them)."""
        cdef MapBlock block = self._block
        if block is None:
            return None
        return block.n_ended, block.n_failed

    def _scan_ended(self, bytearray seen, Py_ssize_t start, Py_ssize_t budget):
        """Look at up to `budget` of the futures not marked in `seen` yet,
        from index `start` on and round, and mark those now final.  Returns
        (where to start next, how many of them ended, how many of those did
        not complete).  Futures end in about input order, so a bar that
        looks at a bounded number each time keeps up without a whole scan."""
        cdef Py_ssize_t n, i, looked = 0, steps = 0, ended = 0, failed = 0
        cdef unsigned char* marks = seen
        cdef uint8_t state
        cdef bint bad
        if self._block is not None:
            raise ValueError("the list has no futures yet: see _block_ended")
        n = min(len(seen), list.__len__(self))
        if n == 0:
            return 0, 0, 0
        i = start % n
        while steps < n and looked < budget:
            if not marks[i]:
                looked += 1
                fut = <object>PyList_GET_ITEM(self, i)
                if type(fut) is TaskFuture:
                    state = (<TaskFuture>fut)._state()
                    if state >= COMPLETED:
                        marks[i] = 1
                        ended += 1
                        failed += state != COMPLETED
                elif fut.done():
                    try:
                        bad = fut.exception(0) is not None
                    except Exception:   # a cancelled concurrent.futures.Future, say
                        bad = True
                    marks[i] = 1
                    ended += 1
                    failed += bad
            steps += 1
            i += 1
            if i == n:
                i = 0
        return i, ended, failed

    def _task_name(self):
        """The name of the mapped task, without making futures; or None."""
        if self._block is not None:
            return self._block.spec.name
        if list.__len__(self):
            return getattr(<object>PyList_GET_ITEM(self, 0), "task_name", None)
        return None

    # For a consumer that streams the results (taskrunner.streaming), which
    # alone holds this list: the values it takes are let go here.

    def _final_prefix(self, Py_ssize_t lo, Py_ssize_t hi):
        """Wait until item `lo` is final, then take (values, failed, waited)
        of items lo .. j-1, where j (at most `hi`) is the first item from
        `lo` not final yet.  A run that did not complete has its exception
        for its value, and its position (from `lo`) in `failed`; `waited`
        says whether the caller had to wait: item `lo` was not final yet at
        the call, or results had to be fetched from where they are kept."""
        cdef list failed = []
        cdef Py_ssize_t j
        cdef bint waited, fetched = False
        hi = min(hi, len(self))
        if lo >= hi:
            return [], failed, False
        waited = not self._is_final(lo)
        if waited:
            self._wait_item(lo)
        j = lo + 1
        while j < hi and self._is_final(j):
            j += 1
        values = self._collect(lo, j, None, -1.0, None, False, failed, True, &fetched)
        return values, failed, waited or fetched

    def _take_final(self, list indexes):
        """(values, failed, fetched) of the items at `indexes`, all final:
        as _final_prefix, `failed` the positions in `indexes`, and
        `fetched` whether values had to be fetched."""
        cdef list failed = []
        cdef bint fetched = False
        values = self._collect(0, len(indexes), indexes, -1.0, None, False, failed, True,
                               &fetched)
        return values, failed, fetched

    def _notify_ends(self, queue, Py_ssize_t base):
        """From now on put base + i on `queue` as item i ends; and now, for
        those that have ended.  A number may come twice."""
        cdef MapBlock block = self._block
        cdef Py_ssize_t i
        if block is None:
            for i in range(list.__len__(self)):
                (<object>PyList_GET_ITEM(self, i)).add_done_callback(_EndNote(queue, base + i))
            return
        # With the GIL held throughout, no item ends between the two steps.
        block.on_end = queue
        block.on_end_base = base
        for i in range(block.n):
            if self._is_final(i):
                queue.put(base + i)
            elif handed(block, i) != NULL:
                (<TaskFuture>handed(block, i)).add_done_callback(_EndNote(queue, base + i))

    cdef int _wait_item(self, Py_ssize_t i) except -1:
        cdef MapBlock block = self._block
        if block is None:
            (<object>PyList_GET_ITEM(self, i)).wait()
        elif handed(block, i) != NULL:
            (<TaskFuture>handed(block, i)).wait()
        elif not block.ended[i]:
            wait_run(block.engine.graph, block.runs[i], -1.0)
        return 0

    cdef bint _is_final(self, Py_ssize_t i) except -1:
        cdef MapBlock block = self._block
        if block is None:
            fut = <object>PyList_GET_ITEM(self, i)
        elif handed(block, i) != NULL:
            fut = <object>handed(block, i)
        else:
            return block.ended[i] != 0
        if type(fut) is TaskFuture:
            return (<TaskFuture>fut)._state() >= COMPLETED
        return fut.done()

    cdef list _collect(self, Py_ssize_t lo, Py_ssize_t hi, list indexes, double deadline,
                       object timeout, bint raise_on_failure, list failed, bint clear,
                       bint* fetched):
        """The results of items lo .. hi-1 (or of indexes[lo:hi]), as
        result() gives them; with `failed`, the positions (from lo) of the
        runs that did not complete; with `clear`, the block lets go of the
        values it gives; with `fetched`, set if any had to be fetched."""
        cdef MapBlock block = self._block
        cdef Py_ssize_t i, k
        cdef list results = [None] * (hi - lo)
        cdef dict kept_elsewhere = None     # engine -> ([index], [handle])
        cdef uint8_t state
        for k in range(hi - lo):
            i = lo + k if indexes is None else <Py_ssize_t>indexes[lo + k]
            if block is None:
                fut = <object>PyList_GET_ITEM(self, i)
            elif handed(block, i) != NULL:
                fut = <TaskFuture>handed(block, i)
            else:
                state = block.ended[i]
                if not state:
                    if not wait_run(block.engine.graph, block.runs[i], deadline):
                        raise TimeoutError(
                            f"task run {block.spec.name!r} did not finish within "
                            f"{timeout} seconds")
                    state = block.ended[i]
                if state == COMPLETED and handed(block, i) == NULL:
                    if block.values[i] != NULL:
                        # In place of the None there: the block's reference
                        # is moved (`clear`) or shared.
                        if not clear:
                            Py_INCREF(<object>block.values[i])
                        PyList_SET_ITEM(results, k, <object>block.values[i])
                        block.values[i] = NULL if clear else block.values[i]
                        Py_DECREF(None)
                    continue
                fut = block.future_at(i)
            if type(fut) is not TaskFuture:
                if failed is not None and fut.exception(remaining(deadline)) is not None:
                    failed.append(k)
                results[k] = fut.result(remaining(deadline), raise_on_failure)
            elif _result_into(results, k, <TaskFuture>fut, deadline, raise_on_failure, failed):
                if kept_elsewhere is None:
                    kept_elsewhere = {}
                positions, handles = kept_elsewhere.setdefault((<TaskFuture>fut)._engine, ([], []))
                positions.append(k)
                handles.append((<TaskFuture>fut)._value)
        if kept_elsewhere is not None:
            if fetched != NULL:
                fetched[0] = True
            for engine, (positions, handles) in kept_elsewhere.items():
                values = (<EngineBase>engine).fetch_many(handles, remaining(deadline))
                for k, value in zip(positions, values):
                    results[k] = value
        return results

    # Every other use is a use as a list: the futures are made first.

    def __len__(self):
        return self._block.n if self._block is not None else list.__len__(self)

    def __getitem__(self, index):
        self._materialize()
        return list.__getitem__(self, index)

    def __setitem__(self, index, value):
        self._materialize()
        list.__setitem__(self, index, value)

    def __delitem__(self, index):
        self._materialize()
        list.__delitem__(self, index)

    def __iter__(self):
        self._materialize()
        return list.__iter__(self)

    def __reversed__(self):
        self._materialize()
        return list.__reversed__(self)

    def __contains__(self, value):
        self._materialize()
        return list.__contains__(self, value)

    def __richcmp__(self, other, int op):
        self._materialize()
        if isinstance(other, FutureList):
            (<FutureList>other)._materialize()
        return _compare(self, other, op)

    def __add__(self, other):
        self._materialize()
        if isinstance(other, FutureList):
            (<FutureList>other)._materialize()
        return list.__add__(self, other)

    def __radd__(self, other):
        self._materialize()
        return other + list(self)

    def __iadd__(self, other):
        self._materialize()
        list.extend(self, other)
        return self

    def __mul__(self, n):
        self._materialize()
        return list.__mul__(self, n)

    def __rmul__(self, n):
        self._materialize()
        return list.__mul__(self, n)

    def __imul__(self, n):
        self._materialize()
        return list.__imul__(self, n)

    def __repr__(self):
        self._materialize()
        return f"FutureList({list.__repr__(self)})"

    def __reduce__(self):
        self._materialize()
        return FutureList, (list(self),)

    def __sizeof__(self):
        self._materialize()
        return list.__sizeof__(self)

    def copy(self):
        self._materialize()
        return list.copy(self)

    def index(self, *args):
        self._materialize()
        return list.index(self, *args)

    def count(self, value):
        self._materialize()
        return list.count(self, value)

    def append(self, value):
        self._materialize()
        list.append(self, value)

    def extend(self, values):
        self._materialize()
        list.extend(self, values)

    def insert(self, index, value):
        self._materialize()
        list.insert(self, index, value)

    def pop(self, *args):
        self._materialize()
        return list.pop(self, *args)

    def remove(self, value):
        self._materialize()
        list.remove(self, value)

    def sort(self, *, key=None, reverse=False):
        self._materialize()
        list.sort(self, key=key, reverse=reverse)

    def reverse(self):
        self._materialize()
        list.reverse(self)

    def clear(self):
        self._block = None
        list.clear(self)


cdef object _open_bar(FutureList futures, object progress):
    """The progress bar of a wait on `futures`, drawing already; None if
    `progress` says not to draw (ValueError or TypeError if it is no valid
    value)."""
    from taskrunner.progress import bar_for_futures     # only when asked: its imports cost
    return bar_for_futures(futures, progress)


cdef object _compare(FutureList self, object other, int op):
    # list's own comparison, on the list as it now is
    if op == 2:
        return list.__eq__(self, other)
    if op == 3:
        return list.__ne__(self, other)
    if op == 0:
        return list.__lt__(self, other)
    if op == 1:
        return list.__le__(self, other)
    if op == 4:
        return list.__gt__(self, other)
    return list.__ge__(self, other)


cdef bint _result_into(list results, Py_ssize_t i, TaskFuture fut, double deadline,
                       bint raise_on_failure, list failed) except -1:
    """results[i] = fut's result (or error, and i appended to `failed`);
    True if it is kept elsewhere and must be fetched."""
    cdef uint8_t state = fut._state()
    if state < COMPLETED:       # only then the time left matters
        state = fut._final_state(remaining(deadline))
    if state != COMPLETED:
        error = fut._error(state)
        if raise_on_failure:
            raise error
        results[i] = error
        if failed is not None:
            failed.append(i)
    elif not (fut._flags & REMOTE_VALUE):
        results[i] = fut._value
    elif fut._engine.fetch_many is None:
        results[i] = fut._engine.fetch(fut._value, remaining(deadline))
    else:
        return True
    return False


# -- taken runs -----------------------------------------------------------------

@cython.final
@cython.no_gc_clear     # a view's __dealloc__ tells it from an owner by `base`
cdef class RunList:
    """Runs a consumer elsewhere took, in order: futures and mapped items,
    with no future made for an item.  Slicing gives a RunList of its own;
    view() one that shares this one's items (and keeps it alive); indexing
    or iterating gives futures (made for items on the way)."""

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.items == NULL or self.base is not None:
            return
        for i in range(self.n):
            release_payload(self.items[i])
        free(self.items)

    cdef int32_t run_at(self, Py_ssize_t i) noexcept:
        return run_of(self.items[i])

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        cdef Py_ssize_t start, stop, step, i, k
        cdef RunList part
        if isinstance(index, slice):
            start, stop, step = index.indices(self.n)
            if step != 1:
                raise ValueError("a RunList slice takes no step")
            part = new_runlist(max(0, stop - start))
            for i in range(part.n):
                part.items[i] = self.items[start + i]
                hold_payload(part.items[i])
            return part
        k = index
        if k < 0:
            k += self.n
        if not 0 <= k < self.n:
            raise IndexError("RunList index out of range")
        return future_of(self.items[k])

    def view(self, Py_ssize_t start, Py_ssize_t stop):
        """The runs start .. stop-1 (clipped to this list), sharing this
        list's items: no per-run work, for the batches a long list is cut
        into.  This list lives as long as the view: its runs' futures and
        blocks too."""
        cdef RunList part = RunList.__new__(RunList)
        start = min(max(start, 0), self.n)
        stop = min(max(stop, start), self.n)
        part.items = self.items + start
        part.n = stop - start
        part.base = self if self.base is None else self.base
        return part

    def __iter__(self):
        cdef Py_ssize_t i
        for i in range(self.n):
            yield future_of(self.items[i])

    def run_ids(self):
        """The runs' ids (their graph slots), in order: what a consumer
        keeps its own records of them by, while it holds them."""
        return [self.run_at(i) for i in range(self.n)]

    def run_facts(self, Py_ssize_t i):
        """(task name, run id, attempt) of run i, as log records carry
        them: the id its future shows, with no future made for an item."""
        if not 0 <= i < self.n:
            raise IndexError("RunList index out of range")
        return run_facts(self.items[i])

    def timeout_at(self, Py_ssize_t i):
        """The timeout_seconds of run i's task (0.0: none)."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        return spec_at(self.items[i]).timeout

    def position_of(self, int32_t run):
        """The index of run `run` (an id, see run_ids) here, or -1."""
        cdef Py_ssize_t i
        for i in range(self.n):
            if self.run_at(i) == run:
                return i
        return -1

    def __repr__(self):
        return f"<RunList of {self.n} runs>"


cdef RunList runlist_of(TaskFuture fut):
    """A RunList of one future's run."""
    cdef RunList runs = new_runlist(1)
    Py_INCREF(fut)
    runs.items[0] = <void*>fut
    return runs


cdef RunList new_runlist(Py_ssize_t n):
    cdef RunList runs = RunList.__new__(RunList)
    runs.items = <void**>malloc(n * sizeof(void*) + 1)
    if runs.items == NULL:
        raise MemoryError()
    runs.n = n
    return runs


def join_runs(parts):
    """One RunList of the runs of `parts` (RunLists), in order."""
    cdef RunList part, joined
    cdef Py_ssize_t total = 0, at = 0, i
    parts = list(parts)
    if len(parts) == 1:
        return <RunList?>parts[0]      # a RunList is never changed: it can be shared
    for part in parts:
        total += part.n
    joined = new_runlist(total)
    for part in parts:
        for i in range(part.n):
            joined.items[at] = part.items[i]
            hold_payload(part.items[i])
            at += 1
    return joined
