# The runs of one map(), kept as plain arrays until someone asks for their
# futures; the list of futures map() returns; and the list of taken runs a
# consumer elsewhere (a worker process) works through.
#
# A mapped item's payload in the graph is a tagged pointer (see item_payload)
# to its slot in the block's `tags` array, so the engine can tell items from
# futures without touching either.  Asking for an item's future hands the
# item over: the future takes its payload and from then on the item is an
# ordinary run, and every fast path here defers to that future.

from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int32_t, int64_t, uint8_t, uintptr_t

from taskrunner._calls cimport CallSpec
from taskrunner._futures cimport ITEM_TAG, EngineBase, TaskFuture, is_item
from taskrunner._graph cimport RunVec


cdef class MapBlock:
    cdef EngineBase engine
    cdef CallSpec spec
    cdef Py_ssize_t n
    cdef Py_ssize_t registered  # items 0 .. registered-1 are runs of the graph
    cdef Py_ssize_t pending     # runs neither ended (as the block saw it) nor handed over
    cdef bint held              # the engine's reference, while `pending`
    cdef bint detached          # its runs left the graph (see Engine.release): every item ended
    cdef int32_t* runs          # item i's run
    cdef uint8_t* ended         # item i's final state once the block saw it end, else 0
    cdef PyObject** values      # item i's result, exception, or NOT_READY cause (owned)
    cdef PyObject** futures     # item i's future once handed over (owned); see handed()
    cdef void** tags            # tags[i] is this block: item i's payload points here
    cdef int32_t* retried       # item i's retries so far (as TaskFuture._retried); NULL: none yet
    # The calls: the template's bound arguments with mapped positions taken
    # from the columns (see Engine.map).
    cdef list columns
    cdef tuple template_args
    cdef list column_at
    cdef list kw_slots
    cdef object static_kwargs
    cdef uint8_t flags          # the TaskFuture flags of every item's call
    cdef bint one_column        # each item's call is its column-0 item alone
    # A streaming consumer's queue (see FutureList._notify_ends): each item
    # that ends puts on_end_base + its index there, as it ends.
    cdef object on_end
    cdef Py_ssize_t on_end_base
    # The items the block saw end (as items, or as futures it still
    # counted in `pending`), and of those the ones that did not complete:
    # what a progress bar reads (taskrunner/progress.py), at no cost per run.
    cdef Py_ssize_t n_ended
    cdef Py_ssize_t n_failed
    # The int its items' run ids derive from (item_run_id), once one was needed.
    cdef object id_base
    # Traced (see _trace.pyx): item i's key in the run trace is trace_key + i,
    # and its future's too, once it has one.
    cdef bint traced
    cdef int64_t trace_key

    cdef object args_at(self, Py_ssize_t i)
    cdef object kwargs_at(self, Py_ssize_t i)
    cdef TaskFuture future_at(self, Py_ssize_t i)
    cdef TaskFuture take_over(self, Py_ssize_t i)
    cdef int hand_over(self, Py_ssize_t lo, Py_ssize_t hi, bint taker) except -1
    cdef void item_ended(self, Py_ssize_t i, uint8_t state, object value) noexcept
    cdef void notify_end(self, Py_ssize_t i) noexcept
    cdef void item_added(self, Py_ssize_t i, int32_t run) noexcept
    cdef void hold_while_pending(self) noexcept
    cdef void cancel_unstarted_locked(self, RunVec* out)
    cdef void let_go_if_done(self) noexcept


cdef MapBlock new_block(EngineBase engine, CallSpec spec, Py_ssize_t n)
cdef tuple fill_args(tuple template, list column_at, list row)


cdef inline void* item_payload(MapBlock block, Py_ssize_t i) noexcept:
    return <void*>(<uintptr_t>&block.tags[i] | ITEM_TAG)


cdef inline PyObject* handed(MapBlock block, Py_ssize_t i) noexcept:
    """Item i's future, borrowed, if it was handed over; else NULL.  Most
    maps never hand one over: the array is made at the first (hand_over),
    so that they neither allocate nor read it."""
    return block.futures[i] if block.futures != NULL else NULL


cdef inline void* untagged(void* payload) noexcept nogil:
    return <void*>(<uintptr_t>payload & ~(<uintptr_t>ITEM_TAG))


cdef inline PyObject* owner_of(void* payload) noexcept nogil:
    """What owns a payload, borrowed: the future, or the item's block."""
    if is_item(payload):
        return (<PyObject**>untagged(payload))[0]
    return <PyObject*>payload


cdef inline MapBlock block_of(void* payload):
    return <MapBlock>owner_of(payload)


cdef inline Py_ssize_t index_of(void* payload, MapBlock block) noexcept:
    return <void**>untagged(payload) - block.tags


cdef inline TaskFuture future_of(void* payload):
    """The future a payload stands for: made (handed over) for an item."""
    cdef MapBlock block
    if is_item(payload):
        block = block_of(payload)
        return block.future_at(index_of(payload, block))
    return <TaskFuture>payload


cdef inline int32_t run_of(void* payload) noexcept:
    """The run a taken payload stands for."""
    cdef PyObject* block
    if is_item(payload):
        block = owner_of(payload)
        return (<MapBlock>block).runs[(<void**>untagged(payload)) - (<MapBlock>block).tags]
    return (<TaskFuture>payload)._run


cdef inline void hold_payload(void* payload) noexcept:
    """A reference to what owns a payload."""
    Py_INCREF(<object>owner_of(payload))


cdef inline void release_payload(void* payload) noexcept:
    Py_DECREF(<object>owner_of(payload))


cdef class FutureList(list):
    cdef MapBlock _block        # until the list is first used as a list
    cdef int _materialize(self) except -1
    cdef int _wait_all(self, double deadline) except -1
    cdef int _wait_item(self, Py_ssize_t i) except -1
    cdef bint _is_final(self, Py_ssize_t i) except -1
    cdef list _collect(self, Py_ssize_t lo, Py_ssize_t hi, list indexes, double deadline,
                       object timeout, bint raise_on_failure, list failed, bint clear,
                       bint* fetched)


cdef class RunList:
    cdef void** items           # futures and item payloads, each owning a reference
    cdef Py_ssize_t n
    cdef RunList base           # a view's owner (of the items and their references), or None

    cdef int32_t run_at(self, Py_ssize_t i) noexcept


cdef RunList new_runlist(Py_ssize_t n)


# -- taken runs --------------------------------------------------------------
# A consumer holds the payloads of the runs it took.  These read and end
# them the same way whether a payload is a future or a mapped item: the one
# place outside MapBlock that tells them apart.

cdef class TakenCall:
    """The call of a taken run, as read() found it."""
    cdef CallSpec spec
    cdef object args            # a tuple (or with ONE_ARG the one argument); () once dropped
    cdef object kwargs
    cdef uint8_t flags          # its TaskFuture flags

    cdef int read(self, void* payload, bint starting) except -1


cdef TaskFuture record_end(void* payload, uint8_t state, object value, bint kept_elsewhere)
cdef CallSpec spec_at(void* payload)
cdef int32_t retries_of(void* payload) noexcept
cdef int count_retry(void* payload) except -1
cdef Py_ssize_t end_items(void** payloads, Py_ssize_t n, uint8_t* states, list values,
                          Py_ssize_t offset, int32_t* runs) noexcept
cdef void settle_end(void* payload, TaskFuture fut, bint last_of_stretch)
cdef void settle_ended(RunVec* out)
cdef void detach(void* payload, uint8_t state) noexcept
cdef RunList runlist_of(TaskFuture fut)
cdef object item_run_id(MapBlock block, Py_ssize_t i)
cdef tuple run_facts(void* payload)
cdef MapBlock plain_stretch(void** payloads, Py_ssize_t n, Py_ssize_t* first,
                            Py_ssize_t* length)
