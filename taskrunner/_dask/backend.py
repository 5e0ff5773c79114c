"""DaskBackend: the client side of DaskTaskRunner, a backend of the
remote-runner protocol (taskrunner.remote).

    dispatcher (remote.py) ── room / place / send ──> DaskBackend.send:
        each call pickled with its upstream results left out (calls.py),
        one Client.map per batch ──> scheduler ──> workers (worker.run)
    watcher thread: distributed.as_completed, in batches ──> ended()
        ──> Outbox.finish (a Handle per result: the value stays there)
    take_back (the engine's recall): marks, then Client.cancel (worker.py)

The backend's state, under `lock`:

    placed      run id -> Sent, for every run handed over and not ended
    keys        Dask key -> Sent, once send() named the run's key
    recalling   keys being recalled now: the watcher leaves their ends to
                the recall
    handles     the Handles of completed runs, fetched when the runner exits

A run placed and not yet named never reached Dask: a recall takes it back
at once, and send() skips it.  A named one may be on the cluster: the
recall marks it (see worker.py) and cancels it, unless a worker reports it
may have started; then it ends as Dask reports it.
"""

import itertools
import logging
import threading
import uuid
import weakref

from distributed import CancelledError, KilledWorker, as_completed

from taskrunner._dask.calls import CallDumper, SharedValues
from taskrunner._dask.results import Handle, fetch, gather_each, within
from taskrunner._dask.worker import MarksPlugin, Recalled, TaskRaised, hold_back, marks_key, run
from taskrunner._mapped import join_runs
from taskrunner._pickling import dumps, unsendable_call_error
from taskrunner.exceptions import CrashedRun, TaskRunnerError
from taskrunner.remote import COMPLETED, CRASHED, FAILED, Backend

__all__ = ["DaskBackend"]

_log = logging.getLogger("taskrunner")

# How many runs are handed to the cluster at once.  Measured on a 4-thread
# LocalCluster: throughput is the same from 16 to 2,000 runs per thread (the
# scheduler sets the pace); many runs per thread make few, large messages,
# and a cancel_all() still asks the workers about all of them in one.
RUNS_PER_THREAD = 512   # runs handed to the cluster at once, per worker thread
MIN_WINDOW = 1_024      # ... at least (a cluster may have no worker yet)
MAX_BATCH = 5_000       # runs in one message to the scheduler at most
HOLD_BACK_SECONDS = 3.0     # a recall waits this long for the workers to answer


class Sent:
    """A run handed to Dask: the run (a RunList of one), its task's name,
    and once sent its key and dask future."""

    __slots__ = ("runs", "name", "key", "dask_future")

    def __init__(self, runs):
        self.runs = runs
        self.name = None
        self.key = None
        self.dask_future = None


class DaskBackend(Backend):
    """Runs on a Dask cluster through one client (see the module docstring)."""

    def __init__(self, client, cluster):
        self.client = client
        self.cluster = cluster          # ours to close, or None
        self.window = max(MIN_WINDOW, RUNS_PER_THREAD * sum(client.nthreads().values()))
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)   # room, runs to watch, or closing
        self.session = uuid.uuid4().hex
        self.numbers = itertools.count()
        self.placed = {}
        self.keys = {}
        self.recalling = set()
        self.handles = weakref.WeakSet()
        self.shared = SharedValues(client)
        self.marks_installed = False
        self.completions = None
        self.closing = False
        self.outbox = None
        self.watcher = None
        self.fetch = fetch              # the engine's hooks for results kept on the cluster

    def start(self, runner):
        self.outbox = runner.outbox
        self.completions = as_completed(loop=self.client.loop)
        self.watcher = threading.Thread(target=self._watch, name="taskrunner-dask-watcher",
                                        daemon=True)
        self.watcher.start()

    def stop(self):
        """After the engine closed: stop the watcher, fetch the results
        still held, drop the marks, close the client (and the cluster if
        ours)."""
        with self.lock:
            self.closing = True
            self.changed.notify_all()
        if self.completions is not None:
            self.completions.clear()
        self.shared.clear()
        if self.watcher is not None:
            self.watcher.join()
        try:
            self._fetch_held()
            if self.marks_installed and self.client.status == "running":
                # Bounded, as the marks were: a lost scheduler must not hold
                # the exit (the marks then go with the workers).
                within(HOLD_BACK_SECONDS, self._forget_marks)
        except TimeoutError:
            _log.warning("the Dask workers did not answer within %s s on exit",
                         HOLD_BACK_SECONDS)
        except Exception:
            _log.exception("could not settle the Dask results on exit")
        finally:
            close_quietly(self.client, self.cluster)

    # -- handing runs over --------------------------------------------------------------

    def room(self):
        # With more than half the window in flight the cluster has work
        # queued: wait for the rest to free up, and send it in one go.
        with self.lock:
            while len(self.placed) > self.window // 2 and not self.closing:
                self.changed.wait()
            if self.closing:
                return 0
            return min(MAX_BATCH, self.window - len(self.placed))

    def place(self, runs):
        placed = []
        for i, run_id in enumerate(runs.run_ids()):
            sent = self.placed[run_id] = Sent(runs[i:i + 1])
            placed.append(sent)
        return runs, placed

    def send(self, placed):
        runs, sents = placed
        calls = []
        for spec, args_list, kwargs_list, _ in self.outbox.calls(runs):
            for j, args in enumerate(args_list):
                calls.append((spec, args, kwargs_list[j] if kwargs_list else None))
        with self.lock:
            # Named under the lock: a recall finds the run either unnamed
            # (never sent: taken back here) or named (marked on the cluster).
            for sent, (spec, _, _) in zip(sents, calls):
                if self.placed.get(sent.runs.run_ids()[0]) is sent:
                    sent.name = spec.name
                    sent.key = f"{spec.name}-{self.session}-{next(self.numbers)}"
                    self.keys[sent.key] = sent
        todo = [(sent, call) for sent, call in zip(sents, calls) if sent.key is not None]
        fns, asyncs, blobs, deps, keys = [], [], [], [], []
        unpicklable = []
        dumper = CallDumper(self.client, self.shared.of([call[1:] for _, call in todo]))
        for sent, (spec, args, kwargs) in todo:
            try:
                blob, dep = dumper.dump((args, kwargs))
            except Exception as error:
                unpicklable.append((sent, spec, args, kwargs, error))
                continue
            fns.append(spec.fn)
            asyncs.append(spec.is_async)
            blobs.append(blob)
            deps.append(dep)
            keys.append(sent.key)
        if unpicklable:
            self._fail_unpicklable(unpicklable)
        with self.lock:
            kept = [i for i, key in enumerate(keys) if key in self.keys]
        if len(kept) < len(keys):       # some were recalled meanwhile
            fns, asyncs, blobs, deps, keys = (
                [column[i] for i in kept] for column in (fns, asyncs, blobs, deps, keys))
        if not keys:
            return
        dask_futures = self.client.map(run, fns, asyncs, keys, blobs, deps, key=keys,
                                       pure=False)
        self.completions.update(dask_futures)
        with self.lock:
            for key, dask_future in zip(keys, dask_futures):
                # One recalled since refuses to run: it is marked.
                sent = self.keys.get(key)
                if sent is not None:
                    sent.dask_future = dask_future
            self.changed.notify_all()       # the watcher: runs to watch

    def send_failed(self, placed, error):
        """send() raised (a bug, or the cluster is gone): end CRASHED the
        runs it did not hand to Dask."""
        _, sents = placed
        with self.lock:
            crashed = [sent.runs for sent in sents
                       if sent.dask_future is None and self._forget(sent)]
        if crashed:
            crash = CrashedRun(f"could not hand the run to the Dask scheduler: "
                               f"{type(error).__name__}: {error}")
            self.outbox.finish(join_runs(crashed), [crash] * len(crashed), CRASHED)

    def _fail_unpicklable(self, failures):
        ended, errors = [], []
        with self.lock:
            for sent, spec, args, kwargs, error in failures:
                if self._forget(sent):
                    ended.append(sent.runs)
                    errors.append(unsendable_call_error(
                        spec, args, kwargs, dumps, "the Dask cluster", error))
        if ended:
            self.outbox.finish(join_runs(ended), errors, FAILED)

    def _forget(self, sent):
        """Drop a run handed over: True if it was still ours (the caller
        ends it in the engine).  Lock held."""
        run_id = sent.runs.run_ids()[0]
        if self.placed.get(run_id) is not sent:
            return False
        del self.placed[run_id]
        if sent.key is not None:
            del self.keys[sent.key]
        if len(self.placed) == self.window // 2:
            self.changed.notify_all()       # room() waits for this, and only this
        return True

    # -- runs ending ------------------------------------------------------------------

    def _watch(self):
        completions = self.completions
        while True:
            with self.lock:
                # Whoever adds to `completions` notifies after it: no
                # wake-up is lost between the test and the wait.
                while completions.is_empty() and not self.closing:
                    self.changed.wait()
                if self.closing:
                    # The engine has closed: every run has ended, unless the
                    # exit was interrupted, and then none will be waited for.
                    return
            try:
                batch = completions.next_batch(block=True)
            except StopIteration:
                continue        # emptied meanwhile (by the exit)
            try:
                self._ended(batch)
            except Exception:               # a bug: log it, never lose the watcher
                _log.exception("error handling Dask results")

    def _ended(self, batch):
        ended, values, states = [], [], []
        requeue, rewatch = [], []
        for dask_future in batch:
            key = dask_future.key
            with self.lock:
                sent = self.keys.get(key)
                if sent is None or key in self.recalling:
                    continue            # recalled: the recall ends it
            status = dask_future.status
            if status == "finished":
                outcome = Handle(dask_future, sent.name), COMPLETED
            elif status == "cancelled":
                # Not by a recall (that one ends the run itself): the
                # scheduler went, or the cluster restarted.
                outcome = self._lost_reason(), CRASHED
            elif status != "error":
                # Its result was lost with a worker after it ended, and Dask
                # computes it again: watch for that.
                rewatch.append(dask_future)
                continue
            else:
                error = _error_of(dask_future)
                outcome = None if isinstance(error, Recalled) else _outcome_of(error)
            with self.lock:
                if not self._forget(sent):
                    continue
            if outcome is None:
                # Marks left by a recall that found the run may have started
                # elsewhere; this attempt did not start: run it again.
                requeue.append(sent.runs)
                continue
            value, state = outcome
            if state == COMPLETED:
                self.handles.add(value)
            elif state == CRASHED:
                future = sent.runs[0]
                value = CrashedRun(f"task run {future.task_name!r} ({future.task_run_id}): "
                                   f"{value}")
            ended.append(sent.runs)
            values.append(value)
            states.append(state)
        if rewatch:
            self._watch_again(rewatch)
        if requeue:
            self.outbox.give_back(join_runs(requeue), False)
        if ended:
            self.outbox.finish(join_runs(ended), values, states)

    def _lost_reason(self):
        if self.client.status != "running":
            return ("the Dask scheduler was lost (the client's connection to it closed) "
                    "while this run was on the cluster")
        return "Dask cancelled it (the cluster restarted, or another client cancelled it)"

    # -- taking runs back -------------------------------------------------------------

    def take_back(self, runs):
        """Take back runs handed to Dask that surely never started, the one
        run of `runs` or with None every such run, and return them (a
        RunList) for the engine to cancel."""
        cancelled = []
        with self.lock:
            if runs is None:
                chosen = [s for s in self.placed.values() if s.key not in self.recalling]
            else:
                sent = self.placed.get(runs.run_ids()[0])
                chosen = [sent] if sent is not None and sent.key not in self.recalling else []
            named = []
            for sent in chosen:
                if sent.key is None:            # never reached Dask
                    self._forget(sent)
                    cancelled.append(sent.runs)
                else:
                    named.append(sent)
            keys = [sent.key for sent in named]
            self.recalling.update(keys)
        if not keys:
            return join_runs(cancelled) if cancelled else None
        maybe_started = self._hold_back(keys)
        dask_futures = []
        with self.lock:
            self.recalling.difference_update(keys)
            for sent in named:
                if sent.key in maybe_started:
                    continue
                dask_future = sent.dask_future
                if self._forget(sent):
                    cancelled.append(sent.runs)
                    if dask_future is not None:
                        dask_futures.append(dask_future)
            again = [s.dask_future for s in named
                     if s.key in maybe_started and s.dask_future is not None
                     and self.keys.get(s.key) is s]
        if dask_futures:
            try:
                self.client.cancel(dask_futures)
            except Exception:
                pass        # marked: they cannot run anyway
        if again:
            # The watcher skipped their ends while they were being recalled
            # (one seen twice is ended once).
            self._watch_again(again)
        return join_runs(cancelled) if cancelled else None

    def _watch_again(self, dask_futures):
        self.completions.update(dask_futures)
        with self.lock:
            self.changed.notify_all()

    def _hold_back(self, keys):
        """Mark `keys` on the cluster (see worker.py); the set of those that
        may have started."""
        if self.client.status != "running":
            # No scheduler to reach the workers through (it is lost, or
            # being reconnected to): asking would block until a timeout.
            # The runs end as Dask reports them.
            return set(keys)
        try:
            # Bounded: a scheduler that died a moment ago (the client has not
            # noticed yet) would keep the call waiting for Dask's connect
            # timeout.  Unanswered, every run may have started.
            answers = within(HOLD_BACK_SECONDS, self._mark, keys)
        except TimeoutError:
            _log.warning("the Dask workers did not answer a recall within %s s",
                         HOLD_BACK_SECONDS)
            return set(keys)
        except Exception:
            _log.exception("could not recall runs from the Dask workers")
            return set(keys)
        maybe_started = set()
        for answer in answers.values():
            if isinstance(answer, BaseException):
                return set(keys)        # a worker that could not answer
            maybe_started.update(answer)
        return maybe_started

    def _mark(self, keys):
        """Steps 1 and 2 of a recall (worker.py): the marks in the
        scheduler's metadata, for workers that join from now on, then on
        every worker; their answers."""
        client = self.client
        client.set_metadata([marks_key(self.session), str(next(self.numbers))], keys)
        if not self.marks_installed:
            client.register_plugin(MarksPlugin(self.session))
            self.marks_installed = True
        return client.run(hold_back, keys, on_error="return")

    def _forget_marks(self):
        self.client.unregister_worker_plugin(marks_key(self.session))
        self.client.set_metadata([marks_key(self.session)], None)

    # -- results kept on the cluster ------------------------------------------------------

    def prefetch(self, handles):
        """Fetch the values of `handles` not yet here in one gather, and
        keep them in the handles (the engine's prefetch hook: for runs of
        other runners that take many of them)."""
        todo = [h for h in handles if h.future is not None and not h.kept]
        for handle, (value, error) in zip(todo, self._gather(todo)):
            handle.value, handle.error, handle.kept = value, error, True

    def fetch_many(self, handles, timeout):
        """The values `handles` stand for, those still on the cluster
        fetched in one gather (the engine's fetch_many hook)."""
        on_cluster = [h for h in handles if h.future is not None]
        try:
            gathered = within(timeout, self._gather, on_cluster) if on_cluster else []
        except TimeoutError:
            raise TimeoutError(
                f"the results of {len(on_cluster)} task runs ({on_cluster[0].name!r}, ...) "
                f"did not arrive from the Dask cluster within {timeout} seconds") from None
        fetched = dict(zip(map(id, on_cluster), gathered))
        values = []
        for handle in handles:
            value, error = fetched.get(id(handle)) or (fetch(handle, timeout), None)
            if error is not None:
                raise error
            values.append(value)
        return values

    def _fetch_held(self):
        handles = [h for h in list(self.handles) if h.future is not None and not h.kept]
        if handles and self.client.status != "running":
            lost = TaskRunnerError("the client lost its connection to the Dask scheduler")
            for handle in handles:
                handle.error, handle.future = lost, None
            return
        for handle, (value, error) in zip(handles, self._gather(handles)):
            handle.value, handle.error, handle.future = value, error, None

    def _gather(self, handles):
        """(value, error) for each handle's dask future (see gather_each)."""
        return gather_each(self.client, [h.future for h in handles])


def close_quietly(client, cluster):
    for closable in (client, cluster):
        if closable is not None:
            try:
                closable.close()
            except Exception:
                _log.exception("could not close %r", closable)


def _error_of(dask_future):
    """The exception of an erred or cancelled dask future."""
    try:
        return dask_future.exception()
    except BaseException as error:     # cancelled: exception() raises the reason
        return error


def _outcome_of(error):
    """(value, state) of a run whose dask future did not finish."""
    if isinstance(error, TaskRaised):
        return error.reraised(), FAILED
    if isinstance(error, KilledWorker):
        return f"the Dask workers running it kept dying (KilledWorker): {error}", CRASHED
    if isinstance(error, CancelledError):
        return f"Dask cancelled it: {error}", CRASHED
    return TaskRunnerError(f"Dask could not run this task: {type(error).__name__}: "
                           f"{error}"), FAILED
