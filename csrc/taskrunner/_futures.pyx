# cython: language_level=3, boundscheck=False, wraparound=False
"""Task futures.

A future reads its run's state from the graph under the graph's lock; a
blocked reader sleeps on the graph's condition variable without the GIL (on
the main thread it wakes every SIGNAL_SLICE seconds so Ctrl-C gets through).
Nothing is made for a run until someone asks: the run id (a UUID), the State
object, the exception of a run that never ran, the list of done callbacks.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport PyThread_get_thread_ident
from libc.stdint cimport int32_t, uint8_t

from taskrunner._graph cimport (
    CANCELLED, COMPLETED, CRASHED, FAILED, Graph, NOT_READY, PENDING, READY, RUNNING,
    tr_monotonic,
)

import logging
import threading
import uuid

from taskrunner.exceptions import CancelledRun, UpstreamTaskError, is_timeout
from taskrunner.states import State, StateType

_log = logging.getLogger("taskrunner.engine")

cdef double _SIGNAL_SLICE = 0.02                # how often a blocked main thread checks signals
cdef object _current = threading.local()       # .consumer: this thread's Consumer, if any
cdef unsigned long _main_thread = threading.main_thread().ident

_STATE_TYPES = {
    PENDING: StateType.PENDING, READY: StateType.PENDING, RUNNING: StateType.RUNNING,
    COMPLETED: StateType.COMPLETED, FAILED: StateType.FAILED, NOT_READY: StateType.FAILED,
    CANCELLED: StateType.CANCELLED, CRASHED: StateType.CRASHED,
}


# -- time ---------------------------------------------------------------------

cdef double deadline_of(object timeout) except? -3.0:
    """A tr_monotonic() deadline `timeout` seconds from now; -1 for None."""
    cdef double t
    if timeout is None:
        return -1.0
    try:
        t = timeout
    except TypeError:
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}") from None
    if t != t:
        raise ValueError("timeout must not be NaN")
    if t < 0:
        t = 0
    return tr_monotonic() + t


cdef object remaining(double deadline):
    """Seconds left until `deadline` (-1: None, no deadline)."""
    cdef double left
    if deadline < 0:
        return None
    left = deadline - tr_monotonic()
    return left if left > 0 else 0.0


cdef double until_signal_check(double deadline):
    """`deadline`, or sooner on the main thread: a thread sleeping without
    the GIL never sees Ctrl-C, so the main thread wakes now and then to let
    signal handlers run."""
    cdef double soon
    if PyThread_get_thread_ident() != _main_thread:
        return deadline
    soon = tr_monotonic() + _SIGNAL_SLICE
    return soon if deadline < 0 or soon < deadline else deadline


cdef bint _wait_final(Graph graph, int32_t run, double deadline) except -1:
    """Block (without the GIL) until `run` is final or the deadline passes.

    Signals are checked after every wait, the one that saw the run end
    too: a caller waiting on many runs in turn (FutureList.result(), a
    loop in C with no bytecode between the waits) would otherwise never
    see a Ctrl-C while each run ends within a slice."""
    cdef double until
    cdef bint final
    while True:
        until = until_signal_check(deadline)
        with nogil:
            final = graph.wait_final(run, until)
        PyErr_CheckSignals()
        if final:
            return True
        if deadline >= 0 and tr_monotonic() >= deadline:
            return False


cdef bint wait_run(Graph graph, int32_t run, double deadline) except -1:
    """_wait_final for a caller that may be a consumer thread: it makes
    room while it blocks (see _secede)."""
    cdef Consumer consumer = _consumer()
    cdef int how = _secede(consumer)
    try:
        return _wait_final(graph, run, deadline)
    finally:
        _rejoin(consumer, how)


# -- consumers ----------------------------------------------------------------

@cython.final
cdef class Consumer:
    pass


cdef Consumer consumer_begin(EngineBase engine):
    """Mark this thread as a consumer of `engine` (see _secede)."""
    cdef Consumer consumer = Consumer.__new__(Consumer)
    consumer.engine = engine
    consumer.thread_ident = PyThread_get_thread_ident()
    _current.consumer = consumer
    return consumer


cdef void consumer_end():
    _current.consumer = None


cdef inline Consumer _consumer():
    return getattr(_current, "consumer", None)


cdef enum:
    _STAYED = 0         # nothing to give up
    _GAVE_PLACE = 1     # gave its running place up
    _STEPPED_ASIDE = 2  # ran callbacks: stopped counting as a consumer
    _TOLD_HOOKS = 3     # called its hooks


cdef int _secede(Consumer consumer) except -1:
    """If this thread is a consumer, make room while it blocks, so a task
    (or a done callback) waiting on another run never holds the pool
    hostage: give its running place up, or stop counting as one of the
    engine's consumers, or tell its hooks.  Returns what it did, for
    _rejoin to undo."""
    cdef int32_t wanted
    cdef bint holding
    if consumer is None:
        return _STAYED
    holding = consumer.holding
    if holding or consumer.in_callbacks:
        # Cleared with no Python code before the graph's update: a timer
        # leaving this consumer behind (_consume) sees both or neither.
        consumer.holding = False
        wanted = consumer.engine.graph.secede(holding)
        if wanted:
            consumer.engine._spawn(wanted)
        return _GAVE_PLACE if holding else _STEPPED_ASIDE
    if consumer.hooks is not None:
        consumer.hooks.blocking()
        return _TOLD_HOOKS
    return _STAYED


cdef void _rejoin(Consumer consumer, int how):
    if how == _GAVE_PLACE:
        consumer.engine.graph.rejoin(True)
        consumer.holding = True
    elif how == _STEPPED_ASIDE:
        consumer.engine.graph.rejoin(False)
    elif how == _TOLD_HOOKS:
        try:
            consumer.hooks.resumed()
        except BaseException:
            _log.exception("could not resume after a blocking wait")


@cython.final
cdef class blocking:
    """`with blocking():` around a wait that is not on a future (a queue,
    say) but may last until other runs end: a consumer thread makes room
    meanwhile, as it does when it blocks on a future."""
    cdef Consumer consumer
    cdef int how

    def __enter__(self):
        self.consumer = _consumer()
        self.how = _secede(self.consumer)
        return self

    def __exit__(self, *exc_info):
        _rejoin(self.consumer, self.how)
        self.consumer = None
        return False


@cython.final
cdef class consumer_hooks:
    """`with consumer_hooks(hooks):` makes this thread a consumer that calls
    hooks.blocking() before it blocks on a future (or in blocking()) and
    hooks.resumed() after, until the block ends."""
    cdef object hooks
    cdef object saved

    def __cinit__(self, hooks):
        self.hooks = hooks

    def __enter__(self):
        cdef Consumer consumer = Consumer.__new__(Consumer)
        consumer.hooks = self.hooks
        self.saved = _consumer()
        _current.consumer = consumer
        return self

    def __exit__(self, *exc_info):
        _current.consumer = self.saved
        self.saved = None
        return False


# -- futures ------------------------------------------------------------------

cdef class EngineBase:

    cdef void _spawn(self, int32_t n):
        pass

    cdef bint _cancel(self, TaskFuture fut) except -1:
        return False

    cdef void _run_callbacks(self, TaskFuture fut, list callbacks):
        """Run a future's done callbacks, here and now."""
        for fn in callbacks:
            _call_callback(fn, fut)


@cython.final
cdef class _Extra:
    """What few futures need: done callbacks and recorded dependencies."""

    def __cinit__(self):
        self.callbacks = []


@cython.final
@cython.freelist(256)
@cython.auto_pickle(False)
@cython.no_gc_clear     # __dealloc__ needs _engine to give the run's slot back
@cython.trashcan(True)  # a NotReady chain of any length deallocates without deep C recursion
cdef class TaskFuture:
    """The future result of one task run.

    Futures are hashable by identity.  `result()` blocks until the run is
    final; a run that never ran because an upstream did not complete ends
    FAILED with the state name "NotReady".
    """

    def __init__(self):
        raise TypeError("TaskFuture objects are made by a runner's submit() and map()")

    def __dealloc__(self):
        if self._run >= 0 and self._engine is not None and self._engine.graph is not None:
            self._engine.graph.drop(self._run)

    cdef uint8_t _state(self):
        if self._run < 0:
            return self._final
        return self._engine.graph.state_of(self._run)

    cdef bint _wait(self, object timeout) except -1:
        cdef double deadline
        if self._state() >= COMPLETED:
            return True
        deadline = deadline_of(timeout)
        return wait_run(self._engine.graph, self._run, deadline)

    cdef uint8_t _final_state(self, object timeout) except 255:
        """The run's final state, waiting for it up to `timeout` seconds;
        TimeoutError after that."""
        cdef uint8_t state = self._state()
        if state < COMPLETED:
            if not self._wait(timeout):
                raise TimeoutError(
                    f"task run {self.task_name!r} did not finish within {timeout} seconds")
            state = self._state()
        return state

    cdef object _error(self, uint8_t state):
        """The exception that stands for a run ending in `state`, made on
        first use and kept, so every caller sees the same object."""
        cdef object value = self._value
        if state == FAILED or state == CRASHED:
            return value
        if isinstance(value, BaseException):
            return value
        if state == NOT_READY:
            cause = value if value is not None else self._cause()
            if isinstance(cause, TaskFuture):
                # The cause's state name, not its State: that would build the
                # cause's own message, and so on up a chain of any length.
                error = UpstreamTaskError(
                    f"Upstream task run {cause.task_name!r} ({cause.task_run_id}) did not "
                    f"reach a 'COMPLETED' state (it ended {_state_name((<TaskFuture>cause)._state())}), "
                    f"so task run {self.task_name!r} ({self.task_run_id}) never ran.",
                    cause)
            else:
                error = UpstreamTaskError(
                    f"An upstream of task run {self.task_name!r} ({self.task_run_id}) did not "
                    f"reach a 'COMPLETED' state, so it never ran.")
        else:
            error = CancelledRun(
                f"Task run {self.task_name!r} ({self.task_run_id}) was cancelled before it started.")
        if not isinstance(self._value, BaseException):
            self._value = error
        return self._value

    cdef object _cause(self):
        # Between the core ending a run NOT_READY and the engine keeping a
        # reference to the cause, the core's record still names it.
        cdef Graph graph = self._engine.graph
        cdef void* payload
        if self._run < 0:
            return None
        graph.lock()
        payload = graph.cause_payload_locked(self._run)
        graph.unlock()
        if payload == NULL or is_item(payload):     # an item's future is its block's to make
            return None
        return <object>payload

    cdef object _input_value(self, bint allow, EngineBase consumer):
        """This future as the argument of a downstream run of `consumer`:
        a result kept elsewhere goes as its handle to a run of the engine
        that keeps it, fetched to any other."""
        cdef uint8_t state = self._state()
        if state == COMPLETED:
            if self._flags & REMOTE_VALUE and consumer is not self._engine:
                return self._engine.fetch(self._value, None)
            return self._value
        if allow and state >= COMPLETED:
            return self._error(state)
        raise UpstreamTaskError(
            f"Upstream task run {self.task_name!r} ({self.task_run_id}) is not completed", self)

    cdef _Extra _get_extra(self):
        if self._extra is None:
            self._extra = _Extra()
        return self._extra

    cdef void _fire_callbacks(self):
        cdef list callbacks
        self._flags |= CALLBACKS_FIRED
        if self._extra is None or not self._extra.callbacks:
            return
        callbacks = self._extra.callbacks
        self._extra.callbacks = None
        self._engine._run_callbacks(self, callbacks)

    @property
    def task_run_id(self):
        """A uuid.UUID, unique to this run, made when first read."""
        if self._uuid is None:
            run_id = uuid.uuid4()
            if self._uuid is None:
                self._uuid = run_id
        made = self._uuid
        if type(made) is int:
            # The run's key in its engine's run trace, which makes the id
            # the trace file shows for it (see _trace.pyx).
            run_id = self._engine.trace.run_uuid(made)
            if self._uuid is made:
                self._uuid = run_id
        return self._uuid

    @property
    def task_name(self):
        return self._spec.name

    @property
    def state(self):
        """A State snapshot of this run."""
        cdef uint8_t state = self._state()
        kind = _STATE_TYPES[state]
        if state == COMPLETED:
            return State(kind)
        if state == FAILED:
            if is_timeout(self._value):
                return State(kind, "TimedOut", str(self._value))
            return State(kind, message=repr(self._value))
        if state < COMPLETED and self._retried:
            return State(kind, "Retrying")
        if state == NOT_READY:
            return State(kind, "NotReady", str(self._error(state)))
        if state >= COMPLETED:
            return State(kind, message=str(self._error(state)))
        return State(kind)

    @property
    def attempt(self):
        """Which attempt at the run this is (or was, once it ended),
        counting from 1: each retry of a failed attempt counts one more."""
        return self._retried + 1

    @property
    def dependencies(self):
        """The lineage given to submit(dependencies=...): name -> set of futures."""
        if self._extra is None or self._extra.dependencies is None:
            return {}
        return self._extra.dependencies

    def done(self):
        """True once the run is final."""
        return self._state() >= COMPLETED

    def wait(self, timeout=None):
        """Block until the run is final or `timeout` seconds pass."""
        if timeout is not None:
            deadline_of(timeout)        # a bad timeout fails whether or not the run is final
        self._wait(timeout)

    def result(self, timeout=None, raise_on_failure=True):
        """The task's return value.  If the run did not complete, raise its
        exception (with raise_on_failure=False, return it).  TimeoutError if
        the run is not final within `timeout` seconds."""
        # A result kept elsewhere: fetching it counts against the timeout too.
        # Also checks `timeout`, whether or not the run is final.
        cdef double deadline = deadline_of(timeout)
        cdef uint8_t state = self._final_state(timeout)
        if state == COMPLETED:
            if self._flags & REMOTE_VALUE:
                return self._engine.fetch(self._value, remaining(deadline))
            return self._value
        error = self._error(state)
        if raise_on_failure:
            raise error
        return error

    def exception(self, timeout=None):
        """The run's exception, or None if it completed."""
        cdef uint8_t state
        if timeout is not None:
            deadline_of(timeout)        # a bad timeout fails whether or not the run is final
        state = self._final_state(timeout)
        return None if state == COMPLETED else self._error(state)

    def add_done_callback(self, fn):
        """Call fn(future) once the run is final; at once if it is."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        extra = self._get_extra()
        # No Python code may run between this test and the append: the
        # consumer sets the flag and takes the list as one step too.
        if self._flags & CALLBACKS_FIRED:
            _call_callback(fn, self)
        else:
            extra.callbacks.append(fn)

    def cancel(self):
        """Cancel the run if it has not started.  True if it is now CANCELLED."""
        return self._engine._cancel(self)

    def __repr__(self):
        return f"<TaskFuture {self._spec.name} {self.state.name}>"


cdef str _state_name(uint8_t state):
    """The name a State of `state` has (see TaskFuture.state)."""
    if state == NOT_READY:
        return "NotReady"
    return (<object>_STATE_TYPES[state]).value.capitalize()


cdef void _call_callback(fn, TaskFuture fut):
    try:
        fn(fut)
    except BaseException:
        _log.exception("done callback %r of task run %r raised", fn, fut.task_name)
