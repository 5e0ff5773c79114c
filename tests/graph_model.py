"""A pure-Python reference model of the scheduler core, taskrunner._graph.Graph.

The model states what the core should do, from the product's semantics, not
how the C code does it: there are no pending counts, edge pools or rings
here.  A run is known by the model's own id (0, 1, 2, ... in order of
creation, never reused); mapping ids to the core's slot numbers, which *are*
reused, is the test's business.

Semantics modelled:

* A run waits for its upstreams.  It becomes READY once every upstream has
  COMPLETED, or has ended in any way for an upstream in its `allow` set.
* If an upstream not in `allow` ends in any state but COMPLETED (FAILED,
  CRASHED, CANCELLED, NOT_READY) the run never runs: it becomes NOT_READY,
  transitively.  A run added with such an upstream is NOT_READY at once.
* cancel() succeeds only on a run not yet started (PENDING or READY); the
  cancelled run's downstreams become NOT_READY unless they allow it.
* cancel_all() cancels every run not yet started; all of them end CANCELLED,
  none NOT_READY because of a sibling.
* take() hands out READY runs in FIFO order of becoming ready, and only while
  fewer than max_running runs are RUNNING.  A finish() releases the
  downstream runs it alone made ready in the order their edges were added.
  Runs made ready together by one operation in any other way (through a
  cascade of NOT_READY runs whose failure they allow, or by a cancel) are
  ready "at the same moment": the model leaves their relative order open.

The order of the lists of ended runs an operation returns is not specified;
the model returns them in a convenient order and the test compares sets.

Slot bookkeeping (for checking forget()): a forgotten run's slot may only be
reused once the run is final and nothing points at it any more: no edge from
an upstream that has not ended yet (an edge is made only to an upstream that
was not final when the run was added) and no entry in the ready queue (a
READY run that gets cancelled leaves its entry behind until take() passes
it).  The model reports, per forgotten run, whether its slot must still be
held, must be free, or may be either.
"""

from collections import deque

PENDING = 0
READY = 1
RUNNING = 2
COMPLETED = 3
FAILED = 4
NOT_READY = 5
CANCELLED = 6
CRASHED = 7

STATE_NAMES = {
    PENDING: "PENDING", READY: "READY", RUNNING: "RUNNING", COMPLETED: "COMPLETED",
    FAILED: "FAILED", NOT_READY: "NOT_READY", CANCELLED: "CANCELLED", CRASHED: "CRASHED",
}
FINAL = frozenset({COMPLETED, FAILED, NOT_READY, CANCELLED, CRASHED})
FINISH_STATES = (COMPLETED, FAILED, CRASHED)

# What the model knows about a forgotten run's slot.
SLOT_HELD = "held"          # something still points at it: must not be free
SLOT_FREE = "free"          # nothing points at it: must be free (reusable)
SLOT_EITHER = "either"      # a ready-queue entry may or may not remain


class ModelError(AssertionError):
    """The model was driven in a way its contract forbids."""


class ModelRun:
    __slots__ = (
        "id", "upstreams", "allow", "edge_upstreams", "downstream", "state",
        "forgotten", "final_op", "queue_key", "stale_key",
    )

    def __init__(self, run_id, upstreams, allow):
        self.id = run_id
        self.upstreams = list(upstreams)        # in the order given, duplicates kept
        self.allow = frozenset(allow)
        self.edge_upstreams = []                # upstreams not final when added
        self.downstream = []                    # downstream ids, in edge order
        self.state = PENDING
        self.forgotten = False
        self.final_op = None                    # the operation that ended it
        self.queue_key = None                   # (batch, ordered position or None)
        self.stale_key = None                   # queue_key, if cancelled while READY

    def __repr__(self):
        return f"<run {self.id} {STATE_NAMES[self.state]}>"


class _Batch:
    """The runs that became READY in one operation.  `ordered` must come out
    in that order; `loose` may come out in any order, interleaved with them."""

    __slots__ = ("ordered", "loose")

    def __init__(self):
        self.ordered = []
        self.loose = []


class GraphModel:
    def __init__(self, max_running=1):
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.max_running = max_running
        self.runs = []              # ModelRun by id
        self.batches = []           # _Batch by batch number
        self.head = 0               # first batch that may still hold READY runs
        self.n_running = 0
        self.op = 0                 # operation counter
        self.taken_key = (-1, -1)   # (batch, ordered position) reached by take()

    # -- reading -----------------------------------------------------------

    def state(self, run_id):
        return self.runs[run_id].state

    @property
    def n_unfinished(self):
        return sum(1 for r in self.runs if r.state not in FINAL)

    @property
    def n_ready(self):
        return sum(1 for r in self.runs if r.state == READY)

    def unstarted(self):
        return [r.id for r in self.runs if r.state in (PENDING, READY)]

    def running(self):
        return [r.id for r in self.runs if r.state == RUNNING]

    # -- the rules of readiness -------------------------------------------

    def _broken_by(self, run):
        """The first upstream whose ending dooms `run`, or None."""
        for u in run.upstreams:
            s = self.runs[u].state
            if s in FINAL and s != COMPLETED and u not in run.allow:
                return u
        return None

    def _satisfied(self, run):
        for u in run.upstreams:
            s = self.runs[u].state
            if not (s == COMPLETED or (s in FINAL and u in run.allow)):
                return False
        return True

    def _end(self, run, state):
        run.state = state
        run.final_op = self.op

    def _new_batch(self):
        self.batches.append(_Batch())
        return len(self.batches) - 1

    def _push_ready(self, run, batch_no, ordered):
        run.state = READY
        batch = self.batches[batch_no]
        if ordered:
            run.queue_key = (batch_no, len(batch.ordered))
            batch.ordered.append(run.id)
        else:
            run.queue_key = (batch_no, None)
            batch.loose.append(run.id)

    def _propagate(self, ended, subject=None, ordered_fanout=False):
        """`ended` runs have just become final in this operation: settle
        their downstreams, transitively.  Returns the runs made NOT_READY.
        With `ordered_fanout`, a downstream of `subject` whose other
        upstreams had all ended before this operation is released in edge
        order; everything else released here is released together."""
        batch_no = None
        not_ready = []
        work = deque(ended)
        while work:
            u = work.popleft()
            for d in self.runs[u].downstream:
                run = self.runs[d]
                if run.state != PENDING:
                    continue
                if self._broken_by(run) is not None:
                    self._end(run, NOT_READY)
                    not_ready.append(d)
                    work.append(d)
                elif self._satisfied(run):
                    if batch_no is None:
                        batch_no = self._new_batch()
                    ordered = ordered_fanout and u == subject and all(
                        x == subject or self.runs[x].final_op < self.op
                        for x in run.upstreams)
                    self._push_ready(run, batch_no, ordered)
        return not_ready

    # -- operations ----------------------------------------------------------

    def add(self, upstreams=(), allow=()):
        """Add a run.  Returns (id, runs ended NOT_READY by this call)."""
        upstreams = list(upstreams)
        allow = set(allow)
        for u in upstreams:
            self._check_usable(u)
        if not allow <= set(upstreams):
            raise ModelError("allow must be a subset of upstreams")
        self.op += 1
        run = ModelRun(len(self.runs), upstreams, allow)
        self.runs.append(run)
        for u in upstreams:
            up = self.runs[u]
            if up.state not in FINAL:
                run.edge_upstreams.append(u)
                up.downstream.append(run.id)
        if self._broken_by(run) is not None:
            self._end(run, NOT_READY)
            return run.id, [run.id]
        if self._satisfied(run):
            self._push_ready(run, self._new_batch(), True)
        return run.id, []

    def take_candidates(self):
        """The runs take() may hand out next (empty: it must hand out none)."""
        if self.n_running >= self.max_running:
            return set()
        while self.head < len(self.batches):
            batch = self.batches[self.head]
            found = set(r for r in batch.loose if self.runs[r].state == READY)
            for r in batch.ordered:
                if self.runs[r].state == READY:
                    found.add(r)
                    break
            if found:
                return found
            self.head += 1
        return set()

    def take(self, run_id):
        """Record that take() handed out `run_id`."""
        if run_id not in self.take_candidates():
            raise ModelError(f"run {run_id} is not next in the ready queue")
        return self._take(run_id)

    def _take(self, run_id):
        self.op += 1
        run = self.runs[run_id]
        run.state = RUNNING
        self.n_running += 1
        batch_no, pos = run.queue_key
        if batch_no > self.taken_key[0]:
            self.taken_key = (batch_no, -1 if pos is None else pos)
        elif pos is not None and pos > self.taken_key[1]:
            self.taken_key = (batch_no, pos)
        return run_id

    def finish(self, run_id, state):
        """End a RUNNING run.  Returns the runs made NOT_READY."""
        if state not in FINISH_STATES:
            raise ModelError(f"bad final state {state}")
        run = self.runs[run_id]
        if run.state != RUNNING:
            raise ModelError(f"run {run_id} is not running")
        self.op += 1
        self.n_running -= 1
        self._end(run, state)
        return self._propagate([run_id], subject=run_id, ordered_fanout=True)

    def cancel(self, run_id):
        """Returns (cancelled, runs made NOT_READY), the cancelled run itself
        not among them."""
        run = self.runs[run_id]
        if run.state not in (PENDING, READY):
            return False, []
        self.op += 1
        if run.state == READY:
            run.stale_key = run.queue_key
        self._end(run, CANCELLED)
        return True, self._propagate([run_id])

    def cancel_all(self):
        """Returns the runs cancelled."""
        cancelled = self.unstarted()
        leftover = self.cancel_together(cancelled)
        # Every downstream of a run not started has not started either, so
        # nothing is left to make NOT_READY or READY.
        assert not leftover
        return cancelled

    def cancel_together(self, run_ids):
        """Cancel the given runs, none started yet, in one operation, as
        cancel_all() does for every run not started: none of them ends
        NOT_READY because of another.  Returns the runs outside the set
        made NOT_READY.  (What a test that saw a load's cancel() and
        cancel_all() calls race replays: the set is the runs seen to end
        CANCELLED.)"""
        run_ids = list(run_ids)
        for r in run_ids:
            if self.runs[r].state not in (PENDING, READY):
                raise ModelError(f"run {r} cannot be cancelled: {self.runs[r]}")
        self.op += 1
        cancelled = run_ids
        for r in cancelled:
            run = self.runs[r]
            if run.state == READY:
                run.stale_key = run.queue_key
            self._end(run, CANCELLED)
        return self._propagate(cancelled)

    def settle(self, outcome):
        """Run everything to the end: take every run take() may hand out
        (all of those ready at once together, so that a large batch of runs
        made ready at the same moment costs no more than its size) and
        finish each in the state `outcome(run_id)` gives, until no run is
        ready or running.  Returns nothing; read the states after."""
        while True:
            taken = sorted(self.take_candidates())[:self.max_running - self.n_running]
            if not taken:
                if self.n_running:
                    raise ModelError("runs left RUNNING with nothing to finish them")
                return
            for r in taken:
                self._take(r)
            for r in taken:
                self.finish(r, outcome(r))

    def forget(self, run_id):
        run = self.runs[run_id]
        if run.forgotten:
            raise ModelError(f"run {run_id} forgotten twice")
        run.forgotten = True

    def _check_usable(self, run_id):
        if not 0 <= run_id < len(self.runs):
            raise ModelError(f"no run {run_id}")
        if self.runs[run_id].forgotten:
            raise ModelError(f"run {run_id} was forgotten")

    # -- slots ---------------------------------------------------------------

    def slot_status(self, run_id):
        """Whether a forgotten run's slot must be held, must be free, or may
        be either (a ready-queue entry that take() may or may not have
        passed)."""
        run = self.runs[run_id]
        if not run.forgotten or run.state not in FINAL:
            return SLOT_HELD
        if any(self.runs[u].state not in FINAL for u in run.edge_upstreams):
            return SLOT_HELD
        if run.stale_key is None:
            return SLOT_FREE
        batch_no, pos = run.stale_key
        if batch_no < self.taken_key[0]:
            return SLOT_FREE            # take() has handed out a later run
        if batch_no > self.taken_key[0]:
            return SLOT_HELD            # take() has not got this far
        if pos is not None and pos < self.taken_key[1]:
            return SLOT_FREE
        return SLOT_EITHER
