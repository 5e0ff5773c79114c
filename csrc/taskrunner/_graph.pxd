# The dependency graph and ready queue: the scheduler core's contract.
#
# A run is a slot number.  Its record (state, count of unfinished upstreams,
# first successor edge) lives in C arrays; successor edges live in one edge
# pool; ready runs wait in a FIFO ring.  One mutex guards all of it, so
# every method here may be called without the GIL.  The graph never
# dereferences a payload: each run carries one opaque pointer for its owner.
#
# Methods named *_locked expect the caller to hold the mutex (lock()/unlock());
# the others take it themselves.  A caller must never wait for the GIL, or run
# Python code that could (allocation, decref to zero), while it holds the mutex.
#
# Glossary.  One word, one meaning, across csrc/ and taskrunner/:
#   run         a graph slot (an int32): one call of one task, from submit
#               or one item of a map, until its owner lets it go.  Its
#               Python face is a TaskFuture, or a MapBlock item until one is
#               asked for (_mapped.pxd hides which).
#   payload     the one opaque pointer a run carries for its owner (the
#               future or the block); only this graph writes it.
#   take        hand ready runs to a consumer: take() for one that runs
#               them here (a thread), take_out() for one that sends them on
#               (the ledger: F_OUT, then F_SENT once mark_sent says so).
#   finish      a consumer reports how taken runs ended (complete_taken_many_locked):
#               COMPLETED, FAILED or CRASHED; what depends on them moves on.
#   give back   a consumer returns taken runs that never started (unstart_locked):
#               ready again, or cancelled.
#   take back   what a remote runner's backend does when the engine asks it
#               to recall runs sent on: it takes back those that surely
#               never started, and the engine cancels them.
#   cancel      end a run CANCELLED before it started, here or by a recall.
#   left behind a consumer whose attempt timed out (a thread cannot be
#               killed): the run ends or is retried without it, its place
#               goes to other runs, and its late result is dropped.
#   retry       a consumer's taken run failed and will run again: it goes
#               back to PENDING, held, until its retry delay has passed
#               (retry_locked, then release_locked); an attempt is one run
#               of its task, and a run has one more after each retry.
#   settle      what an owner does after runs end, outside the lock: wake
#               waiters, run done callbacks, let runs go (n_settling).
#   consumer    whatever takes ready runs: a thread of the thread runner,
#               or the dispatcher of a remote runner (taskrunner/remote.py).

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

cdef extern from "sync.h" nogil:
    ctypedef struct tr_mutex_t:
        pass
    ctypedef struct tr_cond_t:
        pass
    int tr_mutex_init(tr_mutex_t*)
    void tr_mutex_destroy(tr_mutex_t*)
    void tr_mutex_lock(tr_mutex_t*)
    void tr_mutex_unlock(tr_mutex_t*)
    int tr_cond_init(tr_cond_t*)
    void tr_cond_destroy(tr_cond_t*)
    void tr_cond_signal(tr_cond_t*)
    void tr_cond_broadcast(tr_cond_t*)
    int tr_cond_wait_until(tr_cond_t*, tr_mutex_t*, double deadline)
    double tr_monotonic()

# Run states.  Every state >= COMPLETED is final.
cdef enum:
    PENDING = 0      # waiting for upstreams, or held by the code creating it
    READY = 1        # in the ready queue
    RUNNING = 2      # taken by a consumer
    COMPLETED = 3
    FAILED = 4       # the task raised
    NOT_READY = 5    # an upstream did not complete, so the task never ran
    CANCELLED = 6
    CRASHED = 7      # whatever ran it died
    FREE_SLOT = 8

# Run flags.
cdef enum:
    F_WAITED = 1     # someone sleeps on done_cond for this run
    F_DROPPED = 2    # the owner let go; the slot is reused once nothing points at it
    F_QUEUED = 4     # an entry for it sits in the ready ring
    # The ledger of runs taken by a consumer elsewhere (see take_out):
    F_OUT = 8        # in its hands, RUNNING, not started: cancellable here
    F_SENT = 16      # sent on (mark_sent): it may start; only its consumer can take it back
    F_PARKED = 32    # READY, but waits in a limit's queue for a slot (see limits below)

# The cause of a run made NOT_READY by an upstream outside this graph.
cdef enum:
    CAUSE_OUTSIDE = -2

# What add_edge_locked found.
cdef enum:
    EDGE_ADDED = 0      # the downstream now waits for the upstream
    EDGE_SATISFIED = 1  # nothing to wait for: upstream done, or its failure allowed
    EDGE_BROKEN = 2     # the upstream ended badly and failure is not allowed

# What take() returns when it hands out no run.
cdef enum:
    TAKE_CLOSED = -1
    TAKE_TIMEOUT = -2
    TAKE_NONE = -3

ctypedef struct Run:
    int32_t npending    # unfired upstream edges, plus one while held
    int32_t succ        # first successor edge (-1: none); next free slot when free
    int32_t cause       # NOT_READY: the upstream that did not complete
    uint8_t state
    uint8_t flags
    uint8_t n_stale     # consumers left behind on a timed-out attempt, not yet back
    uint8_t lim         # its limit set (Graph.lim_sets), 0: none

ctypedef struct Edge:
    int32_t target      # (downstream << 1) | allow_failure
    int32_t next

# A run that an operation finalised besides the one it was asked about:
# cancelled (cause -1), or NOT_READY because of `cause`.  The payloads are
# copied out so the owner can reach its objects without taking the lock.
ctypedef struct Ended:
    int32_t run
    int32_t cause
    void* payload
    void* cause_payload

ctypedef struct RunVec:
    Ended* items
    Py_ssize_t len
    Py_ssize_t cap

cdef void runvec_clear(RunVec* v) noexcept nogil
cdef void runvec_free(RunVec* v) noexcept nogil


@cython.final
cdef class Graph:
    cdef tr_mutex_t mutex
    cdef tr_cond_t work_cond      # consumers sleep here for ready runs
    cdef tr_cond_t done_cond      # waiters sleep here for final states
    cdef Run* runs
    cdef void** payloads
    cdef int32_t run_cap
    cdef int32_t free_run
    cdef Edge* edges
    cdef int32_t edge_cap
    cdef int32_t edge_top
    cdef int32_t free_edge
    cdef int32_t* ring
    cdef int32_t ring_mask
    cdef int32_t ring_head
    cdef int32_t ring_len

    cdef readonly int64_t n_unfinished   # runs not yet visibly final
    # Owners still settling runs that ended (letting go of them, running
    # their done callbacks, which may submit more): the graph is quiet only
    # when this is 0 too.
    cdef readonly int32_t n_settling
    cdef readonly int32_t n_ready        # runs in state READY
    cdef readonly int32_t n_live         # slots in use

    # Consumers: whoever takes ready runs and runs them.  At most
    # max_running of them hold a run at once; one blocked in a nested wait
    # secedes and gives its place up until it rejoins.
    cdef readonly int32_t max_running
    cdef readonly int32_t n_running
    cdef readonly int32_t n_idle
    cdef readonly int32_t n_seceded
    cdef readonly int32_t n_consumers
    cdef int32_t n_starting
    cdef int32_t wake_tokens
    cdef int32_t spawn_wanted
    cdef int32_t quiet_waiters
    # Concurrency limits (a runner's limits={tag: n}): limit i lets at most
    # lim_cap[i] runs of its limit sets run at once.  A run's `lim` names a
    # set of limits (lim_sets[k], a bit per limit); a ready run whose set
    # has a full limit is parked in that limit's FIFO queue (linked through
    # parked_next) when it reaches the head of the ready ring, and goes back
    # to the ring when a run of that limit stops running.  Parked runs are
    # not counted in n_ready: consumers go past them.
    cdef int32_t n_limits
    cdef int32_t* lim_cap
    cdef int32_t* lim_running
    cdef int32_t* lim_head
    cdef int32_t* lim_tail
    cdef uint64_t* lim_sets
    cdef int32_t n_lim_sets
    cdef int32_t* parked_next
    cdef double* parked_at      # when a run was first parked (tr_monotonic), 0: not parked
    cdef readonly int32_t n_parked
    cdef bint spawns            # the owner starts consumers when asked (spawn_wanted)
    cdef readonly bint closed
    cdef readonly bint released    # its arrays are freed (see release_quiet)

    cdef inline void lock(self) noexcept nogil:
        tr_mutex_lock(&self.mutex)

    cdef inline void unlock(self) noexcept nogil:
        tr_mutex_unlock(&self.mutex)

    # Building runs: add (held), add its edges, then release.
    cdef int32_t add_run_locked(self, void* payload, uint8_t flags, uint8_t lim) noexcept nogil
    # Or, for a run with no upstream, no limit and nothing to hold it: add
    # it READY at once, then wake consumers once for all (ready_added_locked).
    cdef int32_t add_ready_run_locked(self, void* payload) noexcept nogil
    cdef void ready_added_locked(self) noexcept nogil
    cdef int add_edge_locked(self, int32_t up, int32_t down, bint allow) noexcept nogil
    cdef void release_locked(self, int32_t run, int32_t cause, RunVec* out) noexcept nogil
    cdef void release_added_locked(self, int32_t* runs, Py_ssize_t n, bint cancel,
                                   RunVec* out) noexcept nogil
    cdef void hold_locked(self, int32_t run) noexcept nogil

    # Consuming ready runs.
    cdef int32_t take_locked(self, void** payload) noexcept nogil
    cdef int32_t take(self, void** payload, double deadline, int32_t* spawn) noexcept nogil
    cdef inline bint _can_take(self) noexcept nogil:
        # A run is ready and the limit on running runs has room for it.
        return self.n_ready > 0 and self.n_running < self.max_running

    cdef inline int32_t _pop_ready(self, void** payload) noexcept nogil:
        # take_locked() but for waking the next consumer.  Inline: take_out()
        # runs it for each of the thousands of runs a take may hand out.
        cdef int32_t run
        if self.closed:
            return TAKE_CLOSED
        while self._can_take():
            run = self.ring[self.ring_head]
            self.ring_head = (self.ring_head + 1) & self.ring_mask
            self.ring_len -= 1
            self.runs[run].flags &= ~F_QUEUED
            if self.runs[run].state != READY:
                self._maybe_free(run)       # cancelled while queued
                continue
            if self.runs[run].lim and not self._limits_take(run):
                continue                    # parked until its limit has room
            self.runs[run].state = RUNNING
            self.n_ready -= 1
            self.n_running += 1
            payload[0] = self.payloads[run]
            return run
        return TAKE_NONE

    cdef int wait_work(self, double deadline) noexcept nogil
    cdef bint _idle_wait_locked(self, double deadline) noexcept nogil
    cdef int32_t take_out(self, void** payloads, int32_t max_n, double deadline) noexcept nogil
    cdef bint mark_sent_locked(self, int32_t run) noexcept nogil
    cdef bint swap_payload_locked(self, int32_t run, void* old, void* new,
                                  bint if_running) noexcept nogil
    cdef int32_t _take_waiting_locked(self, void** payload, double deadline) noexcept nogil
    cdef void unstart_locked(self, int32_t run, bint cancel, RunVec* out) noexcept nogil
    cdef void retry_locked(self, int32_t run) noexcept nogil
    cdef void leave_behind_locked(self, int32_t run, bint holding) noexcept nogil
    cdef void back_from_behind_locked(self, int32_t run, bint holding) noexcept nogil
    cdef void complete_locked(self, int32_t run, uint8_t state, RunVec* out) noexcept nogil
    cdef void complete_taken_many_locked(self, int32_t* runs, uint8_t* states, Py_ssize_t n,
                                         RunVec* out) noexcept nogil
    cdef int32_t complete_and_take(self, int32_t run, uint8_t state, RunVec* out,
                                   void** payload, int32_t* spawn, bint* settling) noexcept nogil
    cdef int32_t consumer_enter(self) noexcept nogil
    cdef int32_t consumer_exit(self) noexcept nogil
    cdef void ask_again(self, int32_t wanted) noexcept nogil
    cdef int32_t secede(self, bint holding) noexcept nogil
    cdef void rejoin(self, bint holding) noexcept nogil
    cdef void settling_end(self) noexcept nogil

    cdef inline void settling_begin_locked(self) noexcept nogil:
        self.n_settling += 1
    cdef int32_t pop_spawn_wanted_locked(self) noexcept nogil

    # Ending runs from outside.
    cdef bint cancel_locked(self, int32_t run, RunVec* out) noexcept nogil
    cdef void cancel_all_locked(self, RunVec* out) noexcept nogil
    cdef void drop(self, int32_t run) noexcept nogil
    cdef void drop_locked(self, int32_t run) noexcept nogil
    cdef void close(self) noexcept nogil
    cdef bint close_if_quiet(self) noexcept nogil
    cdef void free_arrays_locked(self) noexcept nogil

    # Reading and waiting.
    cdef uint8_t state_of(self, int32_t run) noexcept nogil
    cdef void* cause_payload_locked(self, int32_t run) noexcept nogil
    cdef bint wait_final(self, int32_t run, double deadline) noexcept nogil
    cdef bint wait_quiet(self, double deadline) noexcept nogil

    # Limits.
    cdef int set_limits(self, list caps) except -1
    cdef int limit_set_of(self, uint64_t mask) except -1
    cdef bint _limits_take(self, int32_t run) noexcept nogil
    cdef void _limits_give(self, int32_t run) noexcept nogil
    cdef void _stop_running(self, int32_t run) noexcept nogil
    cdef void _unready(self, int32_t run) noexcept nogil
    cdef double pop_parked_at_locked(self, int32_t run) noexcept nogil

    # Internals.
    cdef int _grow_runs(self) noexcept nogil
    cdef int32_t _new_edge(self) noexcept nogil
    cdef int _push_ready(self, int32_t run) noexcept nogil
    cdef bint _release(self, int32_t run, int32_t cause, RunVec* out) noexcept nogil
    cdef void _complete(self, int32_t run, uint8_t state, RunVec* out) noexcept nogil
    cdef void _demand(self) noexcept nogil
    cdef void _maybe_free(self, int32_t run) noexcept nogil
    cdef void _fire_edges(self, int32_t run, bint ok, RunVec* out) noexcept nogil
    cdef void _fail_downstream(self, Py_ssize_t start, RunVec* out) noexcept nogil
    cdef void _finish(self, int32_t run, uint8_t state) noexcept nogil
    cdef void _end_downstream(self, int32_t run, int32_t cause, RunVec* out) noexcept nogil
    cdef void _cancel(self, int32_t run, RunVec* out) noexcept nogil
