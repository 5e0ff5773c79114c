# cython: language_level=3, boundscheck=False, wraparound=False
"""The loop of a consumer thread in this process (the thread runner's).

    work(engine, loop):
        take a ready run (sleeping without the GIL while there is none)
        read its call (TakenCall), resolve its upstreams, call the task
        record how it ended (record_end), then in one critical section
            complete it and take the next ready run (complete_and_take)
        settle what ended: done callbacks, the engine's references

A consumer holds one of the engine's running places while it runs a task;
blocked on a future, it gives the place up (see _futures.wait_run).  Done
callbacks may block too: while they run the consumer holds no run, and if
one blocks it steps aside, so the graph starts another consumer.
"""

from libc.stdint cimport int32_t, uint8_t

from taskrunner._calls cimport CallSpec, awaited
from taskrunner._engine cimport Engine
from taskrunner._futures cimport (
    HAS_OUTSIDE, NEEDS_RESOLVE, ONE_ARG, Consumer, TaskFuture, consumer_begin, consumer_end,
)
from taskrunner._graph cimport (
    COMPLETED, FAILED, TAKE_NONE, Graph, RunVec, runvec_free, tr_monotonic,
)
from taskrunner._mapped cimport TakenCall, owner_of, record_end, settle_end, settle_ended
from taskrunner._params cimport find_kept_elsewhere, prefetch_found, resolve, resolve_args
from taskrunner._trace cimport Trace


def work(Engine engine, loop):
    """Run ready runs on this thread until the engine shuts down.
    `loop.run_coroutine(coro)` runs the coroutine of an async task."""
    cdef Graph graph = engine.graph
    cdef RunVec out = RunVec(NULL, 0, 0)
    cdef void* payload = NULL
    cdef void* taken
    cdef int32_t run = TAKE_NONE, spawn = 0
    cdef uint8_t state
    cdef bint settling
    cdef TaskFuture fut
    cdef object owner = None
    cdef TakenCall call = TakenCall.__new__(TakenCall)
    cdef Consumer consumer = consumer_begin(engine)
    cdef Trace trace = engine.trace
    cdef int32_t track = trace.thread_track() if trace is not None else -1
    cdef double started = 0.0
    graph.consumer_enter()
    try:
        while True:
            if run < 0:
                with nogil:
                    run = graph.take(&payload, -1.0)
                if run < 0:
                    break
            consumer.holding = True
            taken = payload
            # The run's owner (its future, or its map's block) is kept
            # until the run is settled: once the graph has the run final,
            # every other reference to it may go (another consumer ending
            # the block's last item lets the engine's go, and the waiter
            # drops the list) while this thread still settles it.
            owner = <object>owner_of(taken)
            call.read(taken, True)
            if trace is not None:
                started = tr_monotonic()
            try:
                value = _call(engine, call, loop)
                state = COMPLETED
            except BaseException as exc:
                value = exc
                state = FAILED
            if trace is not None:
                trace.add(taken, track, started, tr_monotonic(), state)
            fut = record_end(taken, state, value, False)
            value = None
            settling = fut is not None and fut._extra is not None and bool(fut._extra.callbacks)
            run = graph.complete_and_take(run, state, &out, &payload, &spawn, &settling)
            if settling and run >= 0:
                # Done callbacks may block: hold no run meanwhile, or this
                # thread would start it on top of the consumers started in
                # its place (or wait for the run it holds).
                spawn += _give_back(graph, run, &out)
                run = TAKE_NONE
            consumer.holding = run >= 0
            if spawn:
                engine._spawn(spawn)
                spawn = 0
            # A callback that blocks makes this thread step aside: the graph
            # starts another consumer in its place.
            consumer.in_callbacks = settling
            if out.len:
                settle_ended(&out)
            if (run >= 0 and not settling and fut is not None and fut._extra is not None
                    and fut._extra.callbacks):
                # A done callback added since the test above (while this
                # thread ran Python code: starting a consumer, say) may block
                # too: give the run held back first, as above.
                spawn = _give_back(graph, run, &out)
                run = TAKE_NONE
                consumer.holding = False
                consumer.in_callbacks = True
                if spawn:
                    engine._spawn(spawn)
                    spawn = 0
            settle_end(taken, fut, True)
            fut = None
            owner = None
            consumer.in_callbacks = False
            if settling:
                graph.settling_end()
    finally:
        consumer_end()
        runvec_free(&out)
        graph.consumer_exit()


cdef int32_t _give_back(Graph graph, int32_t run, RunVec* out) noexcept:
    """Put a taken, unstarted run back in the ready queue; returns the
    consumers the graph asks to start."""
    cdef int32_t spawn
    graph.lock()
    graph.unstart_locked(run, False, out)
    spawn = graph.pop_spawn_wanted_locked()
    graph.unlock()
    return spawn


cdef object _call(Engine engine, TakenCall call, object loop):
    """Call a taken run's task with its upstream futures resolved; await it
    if it is async.  Raises what the task raises."""
    cdef CallSpec spec = call.spec
    cdef uint8_t flags = call.flags
    cdef bint one = flags & ONE_ARG
    cdef dict found
    args = call.args
    kwargs = call.kwargs
    call.args = call.kwargs = None      # held by nobody here once the call ends
    if flags & HAS_OUTSIDE:
        # Results kept elsewhere among its upstreams: fetched at once.
        found = {}
        find_kept_elsewhere(args, engine, found, 0)
        find_kept_elsewhere(kwargs, engine, found, 0)
        if found:
            prefetch_found(found)
    if flags & NEEDS_RESOLVE:
        args = resolve(args, False, 0, engine) if one else resolve_args(args, engine)
        if kwargs is not None:
            kwargs = resolve(kwargs, False, 0, engine)
    if one:
        value = spec.fn(args) if kwargs is None else spec.fn(args, **kwargs)
    elif kwargs is None:
        value = spec.fn(*args)
    else:
        value = spec.fn(*args, **kwargs)
    return awaited(value, spec.is_async, loop)
