# cython: language_level=3, boundscheck=False, wraparound=False
"""The loop of a consumer thread in this process (the thread runner's).

    work(engine, loop):
        take a ready run (sleeping without the GIL while there is none)
        read its call (TakenCall), resolve its upstreams, call the task
        failed and to be retried: put it back (_retry), take the next
        else record how it ended (record_end), then in one critical section
            complete it and take the next ready run (complete_and_take)
        settle what ended: done callbacks, the engine's references

A consumer holds one of the engine's running places while it runs a task;
blocked on a future, it gives the place up (see _futures.wait_run).  Done
callbacks may block too: while they run the consumer holds no run, and if
one blocks it steps aside, so the graph starts another consumer.
"""

from libc.stdint cimport int32_t, uint8_t

from taskrunner._calls cimport CallSpec, TaskLoop, awaited
from taskrunner._engine cimport Engine
from taskrunner._futures cimport (
    HAS_OUTSIDE, NEEDS_RESOLVE, ONE_ARG, Consumer, TaskFuture, consumer_begin, consumer_end,
)
from taskrunner._graph cimport (
    COMPLETED, CRASHED, FAILED, TAKE_NONE, Graph, RunVec, runvec_free, tr_monotonic,
)
from taskrunner._mapped cimport (
    TakenCall, owner_of, record_end, run_facts, settle_end, settle_ended, spec_at,
)
from taskrunner._params cimport find_kept_elsewhere, prefetch_found, resolve, resolve_args
from taskrunner._retry cimport retried
from taskrunner._trace cimport Trace

from taskrunner import _logging
from taskrunner._calls import cancel_task
from taskrunner.exceptions import CrashedRun
from taskrunner.exceptions import run_timed_out as timed_out_error


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
    cdef CallSpec spec
    cdef Consumer consumer = consumer_begin(engine)
    consumer.loop = loop
    engine.consumers.add(consumer)
    cdef Trace trace = engine.trace
    cdef int32_t track = trace.thread_track() if trace is not None else -1
    cdef double started = 0.0
    cdef bint left_behind, timed
    graph.consumer_enter()
    try:
        while True:
            if run < 0:
                with nogil:
                    run = graph.take(&payload, -1.0, &spawn)
                if spawn:
                    engine._spawn(spawn)
                    spawn = 0
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
            spec = call.spec
            # Published for leaving this consumer behind (below): two
            # writes, then the test after the call, with no Python code
            # in between.
            consumer.current_payload = taken
            consumer.current_run = run
            timed = spec.timeout > 0
            if timed:
                _start_timed(engine, consumer, spec)
            if trace is not None:
                started = tr_monotonic()
                if spec.lim:
                    _trace_limit_wait(engine, trace, taken, run, started)
            try:
                value = _call(engine, call, loop)
                state = COMPLETED
            except BaseException as exc:
                value = exc
                state = FAILED
            if timed:
                _end_timed(engine, consumer)
            left_behind = consumer.stale
            consumer.current_payload = NULL
            if left_behind:
                _back_from_behind(engine, consumer, run)
            if trace is not None:
                # Each attempt a slice; one that outlived its deadline failed.
                trace.add(taken, track, started, tr_monotonic(), FAILED if left_behind else state)
            if left_behind:
                # It timed out, or the runner's exit abandoned it: the run
                # was ended (or retried) without this thread meanwhile.
                value = owner = None
                run = TAKE_NONE
                continue
            if state == FAILED and spec.retries and retried(engine, spec, taken, run, value):
                value = owner = None
                run = TAKE_NONE
                consumer.holding = False
                continue
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
        engine.consumers.discard(consumer)
        consumer_end()
        runvec_free(&out)
        spawn = graph.consumer_exit()
        if spawn:
            engine._spawn(spawn)


# -- timeouts ------------------------------------------------------------------
#
# A run of a task with timeout_seconds has a deadline from when its attempt
# starts, kept on its consumer; the engine's timer holds at most one entry
# per consumer, due at the earliest deadline it must look at (a consumer
# running many short timed runs costs no timer entry each).  Whoever comes
# first decides, under the graph's lock: the consumer returning from the
# call ends its timed attempt (the timer then finds none, or a later one,
# and does nothing), or the timer leaves the consumer behind (Graph.leave_behind_locked: its place
# goes to other runs) and ends the run itself, TimedOut, or retries it.  A
# consumer left behind drops its late result when the call returns.  An
# async task is cancelled on its loop; a Python thread cannot be stopped.


cdef int _start_timed(Engine engine, Consumer consumer, CallSpec spec) except -1:
    cdef bint arm
    engine.graph.lock()
    consumer.deadline = tr_monotonic() + spec.timeout
    consumer.timing = True
    arm = not consumer.armed
    consumer.armed = True
    engine.graph.unlock()
    if arm:
        engine.call_later(spec.timeout, _check_deadline, (engine, consumer))
    return 0


cdef int _end_timed(Engine engine, Consumer consumer) except -1:
    """A timed call returned: from now on the timer cannot leave this
    consumer behind (`stale` says whether it did before)."""
    engine.graph.lock()
    consumer.timing = False
    engine.graph.unlock()
    return 0


cdef int _back_from_behind(Engine engine, Consumer consumer, int32_t run) except -1:
    """A consumer left behind returned from its task (see above)."""
    cdef Graph graph = engine.graph
    cdef int32_t spawn
    graph.lock()
    graph.back_from_behind_locked(run, consumer.holding)
    consumer.stale = False
    consumer.holding = False
    spawn = graph.pop_spawn_wanted_locked()
    graph.unlock()
    engine.left_behind.discard(consumer.thread_ident)
    if spawn:
        engine._spawn(spawn)
    return 0


cdef object _leave_behind_locked(Engine engine, Consumer consumer):
    """With the graph's lock held (so: nothing allocated here): leave the
    consumer behind, its current run to be ended (or retried) by the
    caller; its place goes to other runs.  Returns the asyncio task running
    it if it is async (to cancel), else None.  The caller takes the run's
    owner now too, while the consumer still holds it (it lets go only
    after its call returned and it took this lock)."""
    engine.graph.leave_behind_locked(consumer.current_run, consumer.holding)
    consumer.holding = False
    consumer.stale = True
    consumer.timing = False
    if isinstance(consumer.loop, TaskLoop):
        return (<TaskLoop>consumer.loop).current
    return None


cdef int _after_leaving(Engine engine, Consumer consumer, object task) except -1:
    engine.left_behind.add(consumer.thread_ident)
    if task is not None:
        cancel_task(task)
    return 0


def _check_deadline(Engine engine, Consumer consumer):
    """The timer's side (see above).  One entry per consumer at most: it
    finds the attempt running now past its deadline (and times it out),
    or before it (and looks again then), or none."""
    cdef Graph graph = engine.graph
    cdef void* payload
    cdef int32_t run
    cdef double wait
    graph.lock()
    if graph.released or not consumer.timing or consumer.stale:
        consumer.armed = False
        graph.unlock()
        return
    wait = consumer.deadline - tr_monotonic()
    if wait > 0:
        graph.unlock()      # still armed: the entry below is this consumer's one
        engine.call_later(wait, _check_deadline, (engine, consumer))
        return
    consumer.armed = False
    payload, run = consumer.current_payload, consumer.current_run
    _owner = <object>owner_of(payload)      # alive while the run ends here
    task = _leave_behind_locked(engine, consumer)
    graph.unlock()
    _after_leaving(engine, consumer, task)
    end_timed_out(engine, payload, run, spec_at(payload))


def abandon_running(Engine engine):
    """A second Ctrl-C stopped the runner's exit: every run a consumer
    thread is running ends CRASHED now, its thread left behind (as at a
    timeout: it finishes its task in the background, the result dropped),
    and an async task is cancelled on its loop."""
    cdef Graph graph = engine.graph
    cdef Consumer consumer
    cdef void* payload
    cdef int32_t run
    for consumer in list(engine.consumers):
        graph.lock()
        if graph.released or consumer.stale or consumer.current_payload == NULL:
            graph.unlock()
            continue
        payload, run = consumer.current_payload, consumer.current_run
        _owner = <object>owner_of(payload)  # alive while the run ends here
        task = _leave_behind_locked(engine, consumer)
        graph.unlock()
        _after_leaving(engine, consumer, task)
        _finish_one(engine, payload, run, CRASHED, CrashedRun(
            "the runner's exit was interrupted by a second Ctrl-C while this run ran; "
            "its thread finishes it in the background, its result dropped"))
        _owner = None


cdef int _finish_one(Engine engine, void* payload, int32_t run, uint8_t state,
                     object value) except -1:
    """End one taken run from outside its consumer's loop (the timer)."""
    cdef Graph graph = engine.graph
    cdef RunVec out = RunVec(NULL, 0, 0)
    cdef TaskFuture fut = record_end(payload, state, value, False)
    cdef bint settling
    cdef int32_t spawn
    try:
        graph.lock()
        graph.complete_taken_many_locked(&run, &state, 1, &out)
        spawn = graph.pop_spawn_wanted_locked()
        settling = out.len > 0 or (fut is not None and fut._extra is not None
                                   and bool(fut._extra.callbacks))
        if settling:
            graph.settling_begin_locked()
        graph.unlock()
        engine.settle(&out, spawn)
        settle_end(payload, fut, True)
        if settling:
            graph.settling_end()
    finally:
        runvec_free(&out)
    return 0


cdef int end_timed_out(Engine engine, void* payload, int32_t run, CallSpec spec) except -1:
    """A taken run's attempt timed out: retry it if its task says so,
    else end it FAILED with a TimeoutError (state "TimedOut")."""
    exc = timed_out_error(spec.name, spec.timeout)
    name, run_id, attempt = run_facts(payload)
    _logging.run_timed_out(name, run_id, attempt, spec.timeout, scope=engine)
    if not retried(engine, spec, payload, run, exc):
        _finish_one(engine, payload, run, FAILED, exc)
    return 0


cdef int _trace_limit_wait(Engine engine, Trace trace, void* taken, int32_t run,
                           double now) except -1:
    """Record in the trace how long a taken run waited for its limit."""
    cdef double parked
    engine.graph.lock()
    parked = engine.graph.pop_parked_at_locked(run)
    engine.graph.unlock()
    if parked > 0.0:
        trace.limit_wait_of(taken, parked, now, engine.limited_tags(spec_at(taken)))
    return 0


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
