# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The dependency graph and ready queue of the scheduler core.

Plain C data behind one mutex (see graph.pxd for the contract).  A run is
built held: add_run_locked() gives it one extra pending count, so no edge
added while it is being built can release it early; release_locked() drops
the hold.  A run whose count reaches zero goes to the ready ring.  A
completion fires its successor edges in the order they were added; a failure
makes every downstream that does not allow failure NOT_READY, transitively,
and reports those runs so their owner can let go of what it keeps for them.

The Python-level methods at the end exist for tests: they drive the same C
paths with no payloads, so a reference model can be checked against them.
"""

cimport cython
from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport abort, calloc, free, malloc, realloc
from libc.stdio cimport fprintf, stderr

cdef int32_t MAX_RUNS = 1 << 30      # targets are stored shifted left by one
cdef int32_t MAX_EDGES = 0x7ffffff0


cdef void runvec_push(RunVec* v, int32_t run, int32_t cause,
                      void* payload, void* cause_payload) noexcept nogil:
    cdef Py_ssize_t cap
    cdef Ended* items
    if v.len == v.cap:
        cap = v.cap * 2 if v.cap else 16
        items = <Ended*>realloc(v.items, <size_t>cap * sizeof(Ended))
        if items == NULL:
            # Losing track of a finalised run would leave its owner's
            # references dangling; there is no safe way back from here.
            fprintf(stderr, b"taskrunner: out of memory in the scheduler core\n")
            abort()
        v.items = items
        v.cap = cap
    v.items[v.len].run = run
    v.items[v.len].cause = cause
    v.items[v.len].payload = payload
    v.items[v.len].cause_payload = cause_payload
    v.len += 1


cdef void runvec_clear(RunVec* v) noexcept nogil:
    v.len = 0


cdef void runvec_free(RunVec* v) noexcept nogil:
    free(v.items)
    v.items = NULL
    v.len = 0
    v.cap = 0


@cython.final
cdef class Graph:
    """Runs, their edges and the ready ring, for one runner."""

    def __cinit__(self, int max_running=1, bint spawns=True):
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.spawns = spawns
        if tr_mutex_init(&self.mutex) or tr_cond_init(&self.work_cond) or tr_cond_init(&self.done_cond):
            raise MemoryError("cannot create the scheduler's locks")
        self.free_run = -1
        self.free_edge = -1
        self.max_running = max_running
        self.ring = <int32_t*>malloc(sizeof(int32_t))
        if self.ring == NULL:
            raise MemoryError()
        self.ring_mask = 0

    def __dealloc__(self):
        # (free(NULL) is a no-op: a released graph's arrays are gone already.)
        tr_cond_destroy(&self.done_cond)
        tr_cond_destroy(&self.work_cond)
        tr_mutex_destroy(&self.mutex)
        free(self.runs)
        free(self.payloads)
        free(self.edges)
        free(self.ring)
        free(self.parked_next)
        free(self.parked_at)
        free(self.lim_cap)
        free(self.lim_sets)

    # -- storage ---------------------------------------------------------

    cdef int _grow_runs(self) noexcept nogil:
        cdef int32_t old = self.run_cap
        cdef int32_t cap = old * 2 if old else 1024
        cdef int32_t ring_cap, i, j
        cdef Run* runs
        cdef void** payloads
        cdef int32_t* ring
        cdef int32_t* parked_next
        cdef double* parked_at
        if old >= MAX_RUNS:
            return -1
        if cap > MAX_RUNS:
            cap = MAX_RUNS
        runs = <Run*>realloc(self.runs, <size_t>cap * sizeof(Run))
        if runs == NULL:
            return -1
        self.runs = runs
        payloads = <void**>realloc(self.payloads, <size_t>cap * sizeof(void*))
        if payloads == NULL:
            return -1
        self.payloads = payloads
        # Every live run has at most one ring entry, so a ring as large as
        # the run table never has to grow inside a completion.
        ring_cap = self.ring_mask + 1
        if ring_cap < cap:
            while ring_cap < cap:
                ring_cap *= 2
            ring = <int32_t*>malloc(<size_t>ring_cap * sizeof(int32_t))
            if ring == NULL:
                return -1
            for i in range(self.ring_len):
                j = (self.ring_head + i) & self.ring_mask
                ring[i] = self.ring[j]
            free(self.ring)
            self.ring = ring
            self.ring_head = 0
            self.ring_mask = ring_cap - 1
        if self.n_limits:
            parked_next = <int32_t*>realloc(self.parked_next, <size_t>cap * sizeof(int32_t))
            if parked_next == NULL:
                return -1
            self.parked_next = parked_next
            parked_at = <double*>realloc(self.parked_at, <size_t>cap * sizeof(double))
            if parked_at == NULL:
                return -1
            self.parked_at = parked_at
        for i in range(old, cap):
            runs[i].state = FREE_SLOT
            runs[i].flags = 0
            runs[i].npending = 0
            runs[i].cause = -1
            runs[i].succ = i + 1
            payloads[i] = NULL
        runs[cap - 1].succ = self.free_run
        self.free_run = old
        self.run_cap = cap
        return 0

    cdef int32_t _new_edge(self) noexcept nogil:
        cdef int32_t e = self.free_edge
        cdef int32_t cap
        cdef Edge* edges
        if e >= 0:
            self.free_edge = self.edges[e].next
            return e
        if self.edge_top == self.edge_cap:
            if self.edge_cap >= MAX_EDGES:
                return -1
            cap = self.edge_cap * 2 if self.edge_cap else 1024
            if cap > MAX_EDGES:
                cap = MAX_EDGES
            edges = <Edge*>realloc(self.edges, <size_t>cap * sizeof(Edge))
            if edges == NULL:
                return -1
            self.edges = edges
            self.edge_cap = cap
        e = self.edge_top
        self.edge_top += 1
        return e

    cdef void _maybe_free(self, int32_t run) noexcept nogil:
        cdef Run* r = &self.runs[run]
        if (r.state >= COMPLETED and r.state != FREE_SLOT and r.npending == 0
                and (r.flags & (F_DROPPED | F_QUEUED)) == F_DROPPED and r.n_stale == 0):
            r.state = FREE_SLOT
            r.flags = 0
            r.succ = self.free_run
            self.free_run = run
            self.payloads[run] = NULL
            self.n_live -= 1

    # -- building runs ---------------------------------------------------

    cdef int32_t add_run_locked(self, void* payload, uint8_t flags, uint8_t lim) noexcept nogil:
        cdef int32_t run
        if self.free_run < 0 and self._grow_runs() < 0:
            return -1
        run = self.free_run
        self.free_run = self.runs[run].succ
        self.runs[run].npending = 1
        self.runs[run].succ = -1
        self.runs[run].cause = -1
        self.runs[run].state = PENDING
        self.runs[run].flags = flags
        self.runs[run].n_stale = 0
        self.runs[run].lim = lim
        if lim:
            self.parked_at[run] = 0.0
        self.payloads[run] = payload
        self.n_live += 1
        self.n_unfinished += 1
        return run

    cdef int32_t add_ready_run_locked(self, void* payload) noexcept nogil:
        """add_run_locked() and its release in one step, for a run that
        waits for nothing: no upstream, no limit, not cancelled at birth."""
        cdef int32_t run = self.add_run_locked(payload, 0, 0)
        if run >= 0:
            self.runs[run].npending = 0
            self._push_ready(run)
        return run

    cdef void ready_added_locked(self) noexcept nogil:
        """After add_ready_run_locked(): wake consumers for the new runs."""
        self._demand()

    cdef int add_edge_locked(self, int32_t up, int32_t down, bint allow) noexcept nogil:
        cdef uint8_t state = self.runs[up].state
        cdef int32_t e
        if state >= COMPLETED:
            return EDGE_SATISFIED if (state == COMPLETED or allow) else EDGE_BROKEN
        if self.runs[down].state >= COMPLETED:
            return EDGE_SATISFIED
        e = self._new_edge()
        if e < 0:
            return -1
        self.edges[e].target = (down << 1) | (1 if allow else 0)
        self.edges[e].next = self.runs[up].succ
        self.runs[up].succ = e
        self.runs[down].npending += 1
        return EDGE_ADDED

    cdef void hold_locked(self, int32_t run) noexcept nogil:
        """One more thing to wait for, released by release_locked(): an
        upstream outside this graph, say."""
        if self.runs[run].state == PENDING:
            self.runs[run].npending += 1

    cdef void release_locked(self, int32_t run, int32_t cause, RunVec* out) noexcept nogil:
        if self._release(run, cause, out):
            self._demand()

    cdef void release_added_locked(self, int32_t* runs, Py_ssize_t n, bint cancel,
                                   RunVec* out) noexcept nogil:
        """release_locked() for runs just built, each with the cause its
        edges found in its record's `cause` (-1: none), cancelled first if
        `cancel`; consumers are woken once for all of them."""
        cdef Py_ssize_t i
        cdef int32_t run, cause
        cdef bint pushed = False
        for i in range(n):
            run = runs[i]
            cause = self.runs[run].cause
            self.runs[run].cause = -1
            if cancel:
                self.cancel_locked(run, out)
            pushed |= self._release(run, cause, out)
        if pushed:
            self._demand()

    cdef bint _release(self, int32_t run, int32_t cause, RunVec* out) noexcept nogil:
        # True if a run went to the ready ring: the caller wakes a consumer.
        cdef Run* r = &self.runs[run]
        cdef int32_t ready
        r.npending -= 1
        if r.state >= COMPLETED:
            # Finalised while held (an upstream failed, or cancel_all).
            self._maybe_free(run)
            return False
        if cause != -1:
            # The run ends NOT_READY, and its allow_failure downstreams may
            # go to the ready ring: they need a consumer as much as it would.
            ready = self.n_ready
            self._end_downstream(run, cause, out)
            self._fail_downstream(out.len - 1, out)
            return self.n_ready > ready
        if r.npending == 0:
            self._push_ready(run)
            return True
        return False

    cdef void _stop_running(self, int32_t run) noexcept nogil:
        # A taken run leaves its running place (it ends, goes back, is
        # cancelled out of the ledger, or waits to retry): the place, its
        # limits' slots and its ledger marks go with it.
        self.n_running -= 1
        if self.runs[run].lim:
            self._limits_give(run)
        self.runs[run].flags &= ~(F_OUT | F_SENT)

    cdef void _unready(self, int32_t run) noexcept nogil:
        # A READY run is ended from outside: it no longer counts as ready
        # (a parked one never did; its entry in its limit's queue is
        # skipped when reached).
        if self.runs[run].flags & F_PARKED:
            self.runs[run].flags &= ~F_PARKED
        else:
            self.n_ready -= 1

    # -- concurrency limits ----------------------------------------------

    cdef int set_limits(self, list caps) except -1:
        """Limits 0 .. len(caps)-1, limit i letting caps[i] runs run at
        once; before any run is added."""
        cdef Py_ssize_t i, n = len(caps)
        if self.run_cap or self.n_limits:
            raise RuntimeError("limits are set once, before the first run")
        if n > 64:
            raise ValueError(f"at most 64 limits, not {n}")
        if n == 0:
            return 0
        # One block: cap, running, head, tail per limit.
        self.lim_cap = <int32_t*>calloc(4 * n, sizeof(int32_t))
        self.lim_sets = <uint64_t*>calloc(256, sizeof(uint64_t))
        if self.lim_cap == NULL or self.lim_sets == NULL:
            raise MemoryError()
        self.lim_running = self.lim_cap + n
        self.lim_head = self.lim_cap + 2 * n
        self.lim_tail = self.lim_cap + 3 * n
        for i in range(n):
            self.lim_cap[i] = caps[i]
            self.lim_head[i] = self.lim_tail[i] = -1
        self.n_lim_sets = 1          # set 0: no limit
        self.n_limits = <int32_t>n
        return 0

    cdef int limit_set_of(self, uint64_t mask) except -1:
        """The id of the limit set with these limits (a bit each), made on
        first use; 0 for none."""
        cdef int32_t k
        if mask == 0:
            return 0
        self.lock()
        for k in range(1, self.n_lim_sets):
            if self.lim_sets[k] == mask:
                self.unlock()
                return k
        if self.n_lim_sets == 256:
            self.unlock()
            raise ValueError("more than 255 different combinations of limited tags")
        k = self.n_lim_sets
        self.lim_sets[k] = mask
        self.n_lim_sets += 1
        self.unlock()
        return k

    cdef bint _limits_take(self, int32_t run) noexcept nogil:
        # A ready run popped from the ring: take a slot of each of its
        # limits (True), or park it in the queue of the first full one.
        cdef uint64_t mask = self.lim_sets[self.runs[run].lim]
        cdef int32_t i
        for i in range(self.n_limits):
            if (mask >> i) & 1 and self.lim_running[i] >= self.lim_cap[i]:
                self.runs[run].flags |= F_PARKED | F_QUEUED
                self.parked_next[run] = -1
                if self.parked_at[run] == 0.0:
                    self.parked_at[run] = tr_monotonic()
                if self.lim_tail[i] < 0:
                    self.lim_head[i] = run
                else:
                    self.parked_next[self.lim_tail[i]] = run
                self.lim_tail[i] = run
                self.n_ready -= 1
                self.n_parked += 1
                return False
        for i in range(self.n_limits):
            if (mask >> i) & 1:
                self.lim_running[i] += 1
        return True

    cdef void _limits_give(self, int32_t run) noexcept nogil:
        # A run of limited tags stopped running: its slots are free, and
        # the first parked run of each such limit goes back to the ring.
        cdef uint64_t mask = self.lim_sets[self.runs[run].lim]
        cdef int32_t i, r
        cdef bint pushed = False
        for i in range(self.n_limits):
            if not (mask >> i) & 1:
                continue
            self.lim_running[i] -= 1
            while self.lim_head[i] >= 0:
                r = self.lim_head[i]
                self.lim_head[i] = self.parked_next[r]
                if self.lim_head[i] < 0:
                    self.lim_tail[i] = -1
                self.n_parked -= 1
                self.runs[r].flags &= ~F_QUEUED
                if not (self.runs[r].flags & F_PARKED) or self.runs[r].state != READY:
                    self._maybe_free(r)     # cancelled while parked
                    continue
                self.runs[r].flags &= ~F_PARKED
                self._push_ready(r)
                pushed = True
                break
        if pushed:
            self._demand()

    cdef double pop_parked_at_locked(self, int32_t run) noexcept nogil:
        """When a taken run of limited tags was first parked (0.0: it never
        waited for its limit), forgotten from now on: for the run trace."""
        cdef double at
        if not self.runs[run].lim or self.parked_at == NULL:
            return 0.0
        at = self.parked_at[run]
        self.parked_at[run] = 0.0
        return at

    # -- the ready ring and its consumers --------------------------------

    cdef int _push_ready(self, int32_t run) noexcept nogil:
        self.runs[run].state = READY
        self.runs[run].flags |= F_QUEUED
        self.ring[(self.ring_head + self.ring_len) & self.ring_mask] = run
        self.ring_len += 1
        self.n_ready += 1
        return 0

    cdef void _demand(self) noexcept nogil:
        # Wake one idle consumer at a time (a woken one wakes the next if
        # work remains), and ask for a new consumer only when none is idle.
        # Waking every sleeper on every push costs a syscall each and a
        # scramble for the GIL.
        cdef int32_t uncovered, room
        if self.closed or self.n_ready <= 0:
            return
        uncovered = self.n_ready - self.wake_tokens - self.n_starting
        if uncovered <= 0:
            return
        if self.n_idle > self.wake_tokens:
            if self.wake_tokens == 0 and self.n_running < self.max_running:
                self.wake_tokens += 1
                tr_cond_signal(&self.work_cond)
        elif self.spawns:
            # As many as the runs not covered, up to the limit: a batch of
            # runs released at once asks for all its consumers at once.
            room = self.max_running - (self.n_consumers - self.n_seceded)
            if room > uncovered:
                room = uncovered
            if room > 0:
                self.n_consumers += room
                self.n_starting += room
                self.spawn_wanted += room

    cdef int32_t take_locked(self, void** payload) noexcept nogil:
        cdef int32_t run = self._pop_ready(payload)
        if run >= 0 and self.n_ready > 0:
            self._demand()
        return run

    cdef int wait_work(self, double deadline) noexcept nogil:
        """Block until a run could be taken (1), the deadline passes (0) or
        the graph closes (-1), taking none: a consumer elsewhere then takes
        with the GIL held (see Outbox.take).  It sleeps as an idle consumer
        does (_idle_wait_locked)."""
        cdef int result
        self.lock()
        while True:
            if self.closed:
                result = -1
                break
            if self._can_take():
                result = 1
                break
            if self._idle_wait_locked(deadline):
                result = 1 if self._can_take() else 0
                if not result:
                    self._demand()
                break
        self.unlock()
        return result

    cdef int32_t take_out(self, void** payloads, int32_t max_n, double deadline) noexcept nogil:
        """Take up to `max_n` ready runs for a consumer elsewhere, sleeping
        until there is one, the deadline passes (TAKE_TIMEOUT) or the graph
        closes (TAKE_CLOSED).  Returns how many were taken; their payloads
        land in `payloads`.  The ledger has them out (F_OUT) from this
        critical section on: until the consumer marks them sent, cancelling
        one is done here; after, only the consumer can take it back."""
        cdef int32_t n = 0, run
        self.lock()
        run = self._take_waiting_locked(payloads, deadline)
        if run < 0:
            self.unlock()
            return TAKE_CLOSED if self.closed else TAKE_TIMEOUT
        while True:
            self.runs[run].flags |= F_OUT
            n += 1
            if n == max_n:
                break
            run = self._pop_ready(&payloads[n])
            if run < 0:
                break
        if self.n_ready > 0:
            self._demand()
        self.unlock()
        return n

    cdef bint swap_payload_locked(self, int32_t run, void* old, void* new,
                                  bint if_running) noexcept nogil:
        """Give a run a new payload, if it has `old` (and is not RUNNING,
        unless `if_running`: a consumer may hold the old one).  The owner
        changes its payload only through this (a mapped item handed over to
        its future)."""
        if self.payloads[run] != old or (not if_running and self.runs[run].state == RUNNING):
            return False
        self.payloads[run] = new
        return True

    cdef bint mark_sent_locked(self, int32_t run) noexcept nogil:
        """The consumer sends a run on, where it may start.  False if it was
        cancelled while out: it is final, and must not be sent."""
        if self.runs[run].state != RUNNING or not (self.runs[run].flags & F_OUT):
            return False
        self.runs[run].flags |= F_SENT
        return True

    cdef int32_t take(self, void** payload, double deadline, int32_t* spawn) noexcept nogil:
        """Take a ready run, sleeping until one comes, the deadline passes
        (TAKE_TIMEOUT) or the graph closes (TAKE_CLOSED).  `spawn` gets the
        consumers the graph asks for meanwhile (others ready and no one
        idle to take them): the caller starts them, or they are never
        started and, counted as starting, block every later ask."""
        cdef int32_t run
        self.lock()
        run = self._take_waiting_locked(payload, deadline)
        spawn[0] = self.pop_spawn_wanted_locked()
        self.unlock()
        return run

    cdef bint _idle_wait_locked(self, double deadline) noexcept nogil:
        """Sleep as an idle consumer until woken (a token, or the graph
        closing) or the deadline passes: True if it passed."""
        cdef bint timed_out = False
        self.n_idle += 1
        while self.wake_tokens == 0 and not self.closed:
            if tr_cond_wait_until(&self.work_cond, &self.mutex, deadline):
                timed_out = True
                break
        self.n_idle -= 1
        # Whoever leaves the idle set takes a token if one is out, so
        # tokens never outnumber sleepers.
        if self.wake_tokens > 0:
            self.wake_tokens -= 1
        return timed_out

    cdef int32_t _take_waiting_locked(self, void** payload, double deadline) noexcept nogil:
        cdef int32_t run
        while True:
            run = self.take_locked(payload)
            if run != TAKE_NONE:
                break
            if self._idle_wait_locked(deadline):
                run = self.take_locked(payload)
                if run == TAKE_NONE:
                    self._demand()
                    run = TAKE_TIMEOUT
                break
        return run

    cdef void _finish(self, int32_t run, uint8_t state) noexcept nogil:
        cdef Run* r = &self.runs[run]
        r.state = state
        self.n_unfinished -= 1
        if (r.flags & F_WAITED) or (self.n_unfinished == 0 and self.quiet_waiters):
            tr_cond_broadcast(&self.done_cond)

    cdef void _end_downstream(self, int32_t run, int32_t cause, RunVec* out) noexcept nogil:
        self.runs[run].cause = cause
        self._finish(run, NOT_READY)
        runvec_push(out, run, cause, self.payloads[run],
                    self.payloads[cause] if cause >= 0 else NULL)

    cdef void _fire_edges(self, int32_t run, bint ok, RunVec* out) noexcept nogil:
        cdef int32_t e = self.runs[run].succ
        cdef int32_t prev = -1
        cdef int32_t nxt, target
        cdef Run* t
        self.runs[run].succ = -1
        # Edges are pushed at the head; fire them in the order they were
        # added so a fan-out releases its runs in submission order.
        while e >= 0:
            nxt = self.edges[e].next
            self.edges[e].next = prev
            prev = e
            e = nxt
        e = prev
        while e >= 0:
            target = self.edges[e].target
            nxt = self.edges[e].next
            self.edges[e].next = self.free_edge
            self.free_edge = e
            t = &self.runs[target >> 1]
            t.npending -= 1
            if t.state >= COMPLETED:
                self._maybe_free(target >> 1)
            elif ok or (target & 1):
                if t.npending == 0:
                    self._push_ready(target >> 1)
            else:
                self._end_downstream(target >> 1, run, out)
            e = nxt

    cdef void _fail_downstream(self, Py_ssize_t start, RunVec* out) noexcept nogil:
        # `out` doubles as the work list: each NOT_READY run fires its own
        # edges as a failure, which may append more.
        cdef Py_ssize_t i = start
        while i < out.len:
            self._fire_edges(out.items[i].run, False, out)
            i += 1

    cdef void complete_locked(self, int32_t run, uint8_t state, RunVec* out) noexcept nogil:
        """End a run as COMPLETED, FAILED or CRASHED and release or fail its
        downstream runs; those that fail land in `out`."""
        self._complete(run, state, out)
        self._demand()

    cdef void _complete(self, int32_t run, uint8_t state, RunVec* out) noexcept nogil:
        # complete_locked() but for waking consumers.
        cdef Py_ssize_t start = out.len
        self._finish(run, state)
        if self.runs[run].succ >= 0:       # most runs (a map's items) have no downstream
            self._fire_edges(run, state == COMPLETED, out)
            self._fail_downstream(start, out)
        self._maybe_free(run)

    cdef void complete_taken_many_locked(self, int32_t* runs, uint8_t* states, Py_ssize_t n,
                                         RunVec* out) noexcept nogil:
        """complete_locked() for runs[i], in states[i], that a consumer
        took: their places are free; consumers are woken once for all."""
        cdef Py_ssize_t i
        cdef int32_t run
        for i in range(n):
            run = runs[i]
            self._stop_running(run)
            self._complete(run, states[i], out)
        self._demand()

    cdef int32_t complete_and_take(self, int32_t run, uint8_t state, RunVec* out,
                                   void** payload, int32_t* spawn, bint* settling) noexcept nogil:
        """A consumer's step: end its run and take the next in one lock.
        If `settling` is set (the run has done callbacks to run) or runs
        ended downstream, the consumer is counted as settling them, and
        `settling` says so: it calls settling_end() when it is done."""
        cdef Py_ssize_t start = out.len
        cdef int32_t nxt
        self.lock()
        self._stop_running(run)
        self._finish(run, state)
        self._fire_edges(run, state == COMPLETED, out)
        self._fail_downstream(start, out)
        if settling[0] or out.len > start:
            self.n_settling += 1
            settling[0] = True
        # Take before waking anyone: the runs this completion released are
        # best run here, while their inputs are warm.
        nxt = self.take_locked(payload)
        if nxt < 0:
            self._demand()
        spawn[0] = self.pop_spawn_wanted_locked()
        self.unlock()
        return nxt

    cdef int32_t consumer_enter(self) noexcept nogil:
        self.lock()
        if self.n_starting > 0:
            self.n_starting -= 1
        else:
            self.n_consumers += 1
        self.unlock()
        return 0

    cdef int32_t consumer_exit(self) noexcept nogil:
        """A consumer leaves; returns the consumers the graph asks for in
        its place (see take)."""
        cdef int32_t wanted
        self.lock()
        self.n_consumers -= 1
        self._demand()
        wanted = self.pop_spawn_wanted_locked()
        self.unlock()
        return wanted

    cdef void ask_again(self, int32_t wanted) noexcept nogil:
        """Consumers asked for that could not be started now: whoever next
        takes the asks (pop_spawn_wanted_locked) starts them."""
        self.lock()
        self.spawn_wanted += wanted
        self.unlock()

    cdef int32_t secede(self, bint holding) noexcept nogil:
        """A consumer is about to block in a nested wait: free its place
        (the running place it holds, if `holding`; else it runs no task,
        done callbacks say, and only stops counting as a consumer).
        Returns how many new consumers are wanted."""
        cdef int32_t wanted
        self.lock()
        if holding:
            self.n_running -= 1
        self.n_seceded += 1
        self._demand()
        wanted = self.pop_spawn_wanted_locked()
        self.unlock()
        return wanted

    cdef void rejoin(self, bint holding) noexcept nogil:
        # May exceed max_running for a moment; the surplus drains as the
        # consumers finish, since take_locked honours the limit.
        self.lock()
        self.n_seceded -= 1
        if holding:
            self.n_running += 1
        self.unlock()

    cdef void settling_end(self) noexcept nogil:
        """An owner is done settling what one critical section ended (see
        n_settling)."""
        self.lock()
        self.n_settling -= 1
        if self.n_settling == 0 and self.n_unfinished == 0 and self.quiet_waiters:
            tr_cond_broadcast(&self.done_cond)
        self.unlock()

    cdef int32_t pop_spawn_wanted_locked(self) noexcept nogil:
        cdef int32_t wanted = self.spawn_wanted
        self.spawn_wanted = 0
        return wanted

    # -- ending runs from outside ----------------------------------------

    cdef bint cancel_locked(self, int32_t run, RunVec* out) noexcept nogil:
        """Cancel a run that has not started (and is not sent on: see
        take_out).  False if it may have."""
        cdef uint8_t state = self.runs[run].state
        if state == RUNNING and (self.runs[run].flags & (F_OUT | F_SENT)) == F_OUT:
            self._stop_running(run)
        elif state == READY:
            self._unready(run)
        elif state != PENDING:
            return False
        self._cancel(run, out)
        return True

    cdef void _cancel(self, int32_t run, RunVec* out) noexcept nogil:
        cdef Py_ssize_t start = out.len
        self._finish(run, CANCELLED)
        runvec_push(out, run, -1, self.payloads[run], NULL)
        self._fire_edges(run, False, out)
        self._fail_downstream(start + 1, out)
        # Runs that allow its failure may be ready now.
        self._demand()

    cdef void unstart_locked(self, int32_t run, bint cancel, RunVec* out) noexcept nogil:
        """A consumer gives back a run it took but never started: to the
        ready ring again, or cancelled."""
        self._stop_running(run)
        if cancel:
            self._cancel(run, out)
        else:
            self._push_ready(run)
            self._demand()

    cdef void retry_locked(self, int32_t run) noexcept nogil:
        """A consumer's taken run failed and is to run again: PENDING, held
        (as a run being built is) until release_locked() makes it ready, at
        once or when its retry delay has passed.  Meanwhile it holds no
        running place, and cancel() and cancel_all() end it; its slot stays
        until that release (the hold), so the run id stays its own."""
        self._stop_running(run)
        self.runs[run].state = PENDING
        self.runs[run].npending += 1
        self._demand()

    cdef void leave_behind_locked(self, int32_t run, bint holding) noexcept nogil:
        """The attempt a thread consumer runs timed out: the run is ended
        (or retried) without it, as if it still held its running place, and
        the consumer counts as seceded until it is back (so a new consumer
        may take the place).  A consumer in a nested wait (not `holding`)
        gave its place up already: the run takes one back to end with.  The
        slot outlives the run's end until back_from_behind_locked()."""
        if holding:
            self.n_seceded += 1
        else:
            self.n_running += 1
        self.runs[run].n_stale += 1

    cdef void back_from_behind_locked(self, int32_t run, bint holding) noexcept nogil:
        """A consumer left behind (leave_behind_locked) returned from the
        task: it gives up the place it holds (it rejoined from a nested
        wait) or stops counting as seceded, and lets the run's slot go."""
        if self.released:
            return
        if holding:
            self.n_running -= 1
        else:
            self.n_seceded -= 1
        self.runs[run].n_stale -= 1
        self._maybe_free(run)
        self._demand()

    cdef void cancel_all_locked(self, RunVec* out) noexcept nogil:
        # Mark every unstarted run first (out but not sent on included),
        # then fire: so each of them ends CANCELLED, none NOT_READY because
        # of a sibling.
        cdef Py_ssize_t start = out.len
        cdef Py_ssize_t i
        cdef int32_t run
        cdef uint8_t state
        for run in range(self.run_cap):
            state = self.runs[run].state
            if state == RUNNING and (self.runs[run].flags & (F_OUT | F_SENT)) == F_OUT:
                self._stop_running(run)
                state = PENDING
            if state == PENDING or state == READY:
                if state == READY:
                    self._unready(run)
                self._finish(run, CANCELLED)
                runvec_push(out, run, -1, self.payloads[run], NULL)
        for i in range(start, out.len):
            self._fire_edges(out.items[i].run, False, out)
        self._demand()

    cdef void drop(self, int32_t run) noexcept nogil:
        self.lock()
        self.drop_locked(run)
        self.unlock()

    cdef void drop_locked(self, int32_t run) noexcept nogil:
        """The owner lets go of a run: its slot is reused once nothing
        points at it."""
        if self.released:
            return
        self.runs[run].flags |= F_DROPPED
        # The slot may outlive its owner (an entry for it still in the ready
        # ring, say): nothing may reach the owner through it from now on.
        self.payloads[run] = NULL
        self._maybe_free(run)

    cdef void close(self) noexcept nogil:
        self.lock()
        self.closed = True
        tr_cond_broadcast(&self.work_cond)
        self.unlock()

    cdef void free_arrays_locked(self) noexcept nogil:
        """Free the run, edge and ring arrays of a closed, quiet graph whose
        owner has detached every run it still holds (so nothing reads them
        again): an exited runner keeps only what its surviving futures
        need, and they keep their states themselves.  The readers a future
        may still reach (state_of, wait_final, drop) answer as for final
        runs from now on."""
        free(self.runs)
        free(self.payloads)
        free(self.edges)
        free(self.ring)
        free(self.parked_next)
        free(self.parked_at)
        self.parked_next = NULL
        self.parked_at = NULL
        self.runs = NULL
        self.payloads = NULL
        self.edges = NULL
        self.ring = NULL
        self.run_cap = 0
        self.edge_cap = 0
        self.edge_top = 0
        self.free_run = -1
        self.free_edge = -1
        self.ring_len = 0
        self.ring_mask = 0
        self.n_live = 0
        self.released = True

    cdef bint close_if_quiet(self) noexcept nogil:
        """Close, but only if no run is unfinished and none is being
        settled: so a run added from outside (or by a done callback) at the
        last moment is refused, never stranded."""
        cdef bint quiet
        self.lock()
        quiet = self.n_unfinished == 0 and self.n_settling == 0
        if quiet:
            self.closed = True
            tr_cond_broadcast(&self.work_cond)
        self.unlock()
        return quiet

    # -- reading and waiting ---------------------------------------------

    cdef uint8_t state_of(self, int32_t run) noexcept nogil:
        cdef uint8_t state
        self.lock()
        # Released: only a reader that took the run number before its
        # future was detached gets here, and every run was final.
        state = COMPLETED if self.released else self.runs[run].state
        self.unlock()
        return state

    cdef void* cause_payload_locked(self, int32_t run) noexcept nogil:
        # Valid only while the cause's owner still holds it (see Ended).
        cdef int32_t cause
        if self.released:
            return NULL
        cause = self.runs[run].cause
        return self.payloads[cause] if cause >= 0 else NULL

    cdef bint wait_final(self, int32_t run, double deadline) noexcept nogil:
        cdef bint final
        self.lock()
        if self.released:
            self.unlock()
            return True
        self.runs[run].flags |= F_WAITED
        # Released while this thread slept (woken by the run's end, it
        # lost the race for the lock to free_arrays_locked): the run is final.
        while not self.released and self.runs[run].state < COMPLETED:
            if tr_cond_wait_until(&self.done_cond, &self.mutex, deadline):
                break
        final = self.released or self.runs[run].state >= COMPLETED
        self.unlock()
        return final

    cdef bint wait_quiet(self, double deadline) noexcept nogil:
        """Wait until no run is unfinished and none is being settled."""
        cdef bint quiet
        self.lock()
        self.quiet_waiters += 1
        while self.n_unfinished > 0 or self.n_settling > 0:
            if tr_cond_wait_until(&self.done_cond, &self.mutex, deadline):
                break
        self.quiet_waiters -= 1
        quiet = self.n_unfinished == 0 and self.n_settling == 0
        self.unlock()
        return quiet

    # -- a Python view, for tests ----------------------------------------

    def add(self, upstreams=(), allow=()):
        """Add a run waiting for `upstreams` (run numbers); `allow` holds
        those whose failure it tolerates.  Returns (run, not_ready_runs)."""
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef int32_t run, cause = -1
        cdef int rc
        allowed = set(allow)
        ups = [int(u) for u in upstreams]
        for u in ups:
            self._check(u)
        self.lock()
        run = self.add_run_locked(NULL, 0, 0)
        if run < 0:
            self.unlock()
            raise MemoryError()
        for u in ups:
            rc = self.add_edge_locked(u, run, u in allowed)
            if rc == EDGE_BROKEN and cause < 0:
                cause = u
        self.release_locked(run, cause, &out)
        self.unlock()
        return run, _drain(&out)

    def take_ready(self):
        """Take the next ready run (None if none), as a consumer would."""
        cdef void* payload
        cdef int32_t run
        self.lock()
        run = self.take_locked(&payload)
        self.unlock()
        return run if run >= 0 else None

    def finish(self, int32_t run, int state):
        """End a taken run; returns the runs that became NOT_READY."""
        cdef RunVec out = RunVec(NULL, 0, 0)
        self._check(run)
        if self.runs[run].state != RUNNING:
            raise ValueError(f"run {run} is not running")
        if state not in (COMPLETED, FAILED, CRASHED):
            raise ValueError(f"bad final state {state}")
        self.lock()
        self._stop_running(run)
        self.complete_locked(run, <uint8_t>state, &out)
        self.unlock()
        return _drain(&out)

    def cancel(self, int32_t run):
        """Cancel a run; returns (cancelled, not_ready_runs)."""
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef bint done
        self._check(run)
        self.lock()
        done = self.cancel_locked(run, &out)
        self.unlock()
        return done, _drain(&out)

    def cancel_all(self):
        """Cancel every unstarted run; returns the runs cancelled."""
        cdef RunVec out = RunVec(NULL, 0, 0)
        self.lock()
        self.cancel_all_locked(&out)
        self.unlock()
        return _drain(&out)

    def state(self, int32_t run):
        self._check(run)
        return self.state_of(run)

    def forget(self, int32_t run):
        """Let go of a run (its future died): its slot may be reused."""
        self._check(run)
        self.drop(run)

    def _check(self, run):
        if not 0 <= run < self.run_cap or self.runs[run].state == FREE_SLOT:
            raise ValueError(f"no run {run}")


cdef list _drain(RunVec* out):
    result = [out.items[i].run for i in range(out.len)]
    runvec_free(out)
    return result


# State numbers as the Python view reports them.
STATES = {
    "PENDING": PENDING, "READY": READY, "RUNNING": RUNNING, "COMPLETED": COMPLETED,
    "FAILED": FAILED, "NOT_READY": NOT_READY, "CANCELLED": CANCELLED, "CRASHED": CRASHED,
}
