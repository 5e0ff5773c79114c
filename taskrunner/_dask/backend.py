"""DaskBackend: the client side of DaskTaskRunner, a backend of the
remote-runner protocol (taskrunner.remote).

    dispatcher (remote.py) ── room / place / send ──> DaskBackend.send:
        each call pickled with its upstream results left out (calls.py),
        runs that need no dependency packed several to a Dask task,
        one Client.map per batch ──> scheduler ──> workers (worker.run,
        worker.run_pack)
    watcher thread: distributed.as_completed, in batches ──> ended()
        ──> Outbox.finish (a Handle per result: the value stays there)
    take_back (the engine's recall): marks, then Client.cancel (worker.py)

The backend's state, under `lock`:

    placed      run id -> Sent, for every run handed over and not ended
    keys        run key -> Sent, once send() named the run's key
    tasks       Dask task key -> the Sents it runs (one, or a pack's), from
                the moment send() made it until the watcher saw it end
    recalling   run keys being recalled now: the watcher leaves the ends of
                their Dask tasks to the recall, in
    deferred    Dask task key -> its dask future, ended while a run of it
                was being recalled: the recall has the watcher see it again
    releaser    the Handles of completed runs (fetched when the runner exits),
                and their dask futures, let go of on its own thread
                (results.Releaser)

A run placed and not yet named never reached Dask: a recall takes it back
at once, and send() skips it.  A named one may be on the cluster: the
recall marks it (see worker.py), and cancels its Dask task once none of
the task's runs is left to run, unless a worker reports it may have
started; then it ends as Dask reports it.

A run alone is a Dask task whose key is the run's; a pack's runs have keys
of their own, and their Sents the pack's key and their index in it.
"""

import itertools
import logging
import threading
import time
import uuid
from typing import NamedTuple

from distributed import CancelledError, KilledWorker, as_completed

from taskrunner import _logging as _logs
from taskrunner._dask import worker
from taskrunner._dask.calls import CallDumper, SharedValues
from taskrunner._dask.results import (
    Handle,
    PackValues,
    Releaser,
    fetch,
    gather_each,
    items_alone,
    within,
)
from taskrunner._dask.worker import (
    MarksPlugin,
    PackEnded,
    Recalled,
    TaskRaised,
    collect_times,
    end_session,
    hold_back,
    marks_key,
    run,
    run_key,
    run_pack,
    sent_function,
)
from taskrunner._mapped import join_runs
from taskrunner._pickling import dumps, unsendable_call_error
from taskrunner._timer import deadline_of
from taskrunner.exceptions import CrashedRun, TaskRunnerError
from taskrunner.remote import COMPLETED, CRASHED, FAILED, Backend

__all__ = ["DaskBackend"]

_log = logging.getLogger("taskrunner.dask")

# How many runs are handed to the cluster at once.  Measured on a 4-thread
# LocalCluster: throughput is the same from 16 to 2,000 runs per thread (the
# scheduler sets the pace); many runs per thread make few, large messages,
# and a cancel_all() still asks the workers about all of them in one.
RUNS_PER_THREAD = 512   # runs handed to the cluster at once, per worker thread
MIN_WINDOW = 1_024      # ... at least (a cluster may have no worker yet)
MAX_BATCH = 5_000       # runs in one message to the scheduler at most
# Packs (worker.py): a batch's plain runs are spread over at least this many
# Dask tasks per worker thread, so that the cluster stays balanced and a
# recall finds most runs unclaimed, in packs of at most MAX_PACK runs.
PACKS_PER_THREAD = 4
MAX_PACK = 1_000
HOLD_BACK_SECONDS = 3.0     # a recall waits this long for the workers to answer
# The outcomes of a run that a recall's mark kept from starting (worker.py):
# RUN_AGAIN, a mark left where the run was not (it may have started
# elsewhere), so it is run again; WITHHELD_RUN, a mark set where it was, by a
# recall told it may have started: it never did, and ends cancelled.
RUN_AGAIN, WITHHELD_RUN = object(), object()


class Sent:
    """A run handed to Dask: the run (a RunList of one), its task's name,
    and once sent its key, the key of the Dask task that runs it (its own,
    or its pack's), its index in that task, and that task's dask future."""

    __slots__ = ("runs", "name", "key", "task_key", "index", "dask_future")

    def __init__(self, runs):
        self.runs = runs
        self.name = None
        self.key = None
        self.task_key = None
        self.index = 0
        self.dask_future = None

    def recall_entry(self):
        """What a worker's hold_back needs to know of this run."""
        return (self.task_key or self.key, self.index, self.key)


class _Call(NamedTuple):
    """A run's call, pickled for the cluster."""
    sent: Sent
    spec: object
    blob: bytes
    deps: list


class DaskBackend(Backend):
    """Runs on a Dask cluster through one client (see the module docstring)."""

    def __init__(self, client, cluster, traced=False):
        self.client = client
        self.traced = traced            # the workers keep each run's times (worker.collect_times)
        self.trace = None               # the runner's run trace, once started, if traced
        self.trace_keys = {}            # traced: run key -> (its key in the trace, its call spec)
        self.cluster = cluster          # ours to close, or None
        threads = client.nthreads()
        self.threads = max(1, sum(threads.values()))
        # Workers in this process (an in-process LocalCluster) run tasks
        # that may wait for other runs of this runner (see worker.py):
        # their runs go alone.
        self.packing = not any(address.startswith("inproc://") for address in threads)
        self.window = max(MIN_WINDOW, RUNS_PER_THREAD * self.threads)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)   # room, runs to watch, or closing
        self.session = uuid.uuid4().hex
        self.numbers = itertools.count()
        self.placed = {}
        self.keys = {}
        self.tasks = {}
        self.recalling = set()
        self.deferred = {}
        self.releaser = Releaser()
        self.shared = SharedValues(client)
        self.marks_installed = False
        self.completions = None
        self.closing = False
        self.outbox = None
        self.watcher = None
        self.fetch = fetch              # the engine's hooks for results kept on the cluster

    def start(self, runner):
        self.outbox = runner.outbox
        self.trace = runner._trace
        self.completions = as_completed(loop=self.client.loop)
        self.watcher = threading.Thread(target=self._watch, name="taskrunner-dask-watcher",
                                        daemon=True)
        self.watcher.start()

    def stop(self):
        """After the engine closed: stop the watcher, fetch the results
        still held, end the session on the workers, close the client (and
        the cluster if ours)."""
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
            if self.trace is not None and self.client.status == "running":
                within(HOLD_BACK_SECONDS, self._collect_times)
            if self.marks_installed and self.client.status == "running":
                # Bounded, as the marks were: a lost scheduler must not hold
                # the exit (the marks then go with the workers).
                within(HOLD_BACK_SECONDS, self._end_session)
        except TimeoutError:
            _log.warning("the Dask workers did not answer within %s s on exit",
                         HOLD_BACK_SECONDS)
        except Exception:
            _log.exception("could not settle the Dask results on exit")
        finally:
            self.releaser.close()
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
                    sent.key = run_key(spec.name, self.session, next(self.numbers))
                    self.keys[sent.key] = sent
        todo = [(sent, call) for sent, call in zip(sents, calls) if sent.key is not None]
        if self.trace is not None:
            for sent, (spec, _, _) in todo:
                self.trace_keys[sent.key] = (self.trace.keys_of(sent.runs)[0], spec)
        traced = {"traced": True} if self.traced else {}
        dumped, unpicklable = [], []
        dumper = CallDumper(self.client, self.shared.of([call[1:] for _, call in todo]))
        for sent, (spec, args, kwargs) in todo:
            try:
                blob, deps = dumper.dump((args, kwargs))
            except Exception as error:
                unpicklable.append((sent, spec, args, kwargs, error))
                continue
            dumped.append(_Call(sent, spec, blob, deps))
        if unpicklable:
            self._fail_unpicklable(unpicklable)
        with self.lock:
            # Those recalled meanwhile are left out; the others get the
            # Dask task that runs them before it exists, so that a recall
            # from now on asks the workers about the right task.
            alone, packs = self._pack([c for c in dumped if self.keys.get(c.sent.key) is c.sent])
        dask_futures = []
        if alone:
            dask_futures += self.client.map(
                run, [sent_function(c.spec) for c in alone], [c.spec.is_async for c in alone],
                [c.sent.key for c in alone], [c.blob for c in alone], [c.deps for c in alone],
                key=[c.sent.key for c in alone], pure=False, **traced)
        if packs:
            dask_futures += self.client.map(
                run_pack, [sent_function(p[0].spec) for p in packs], [p[0].spec.is_async for p in packs],
                [p[0].sent.task_key for p in packs],
                [tuple(c.sent.key for c in p) for p in packs],
                [[c.blob for c in p] for p in packs],
                key=[p[0].sent.task_key for p in packs], pure=False, **traced)
        if not dask_futures:
            return
        self.completions.update(dask_futures)
        with self.lock:
            for dask_future in dask_futures:
                # One recalled since refuses to run: it is marked.
                for sent in self.tasks.get(dask_future.key, ()):
                    if self.keys.get(sent.key) is sent:
                        sent.dask_future = dask_future
            self.changed.notify_all()       # the watcher: runs to watch

    def _pack(self, calls):
        """Split `calls` into those sent alone and packs (lists of calls),
        and record each Dask task in `tasks`.  Lock held.  A pack holds
        consecutive calls of one task that need no dependency; its size
        spreads the batch's such calls over the cluster's threads.  A run
        being recalled goes alone: the recall asks the workers about the
        Dask task that has the run's own key."""
        packable = [not c.deps and c.sent.key not in self.recalling for c in calls]
        plain = sum(packable) if self.packing else 0
        size = max(1, min(MAX_PACK, plain // (self.threads * PACKS_PER_THREAD)))
        alone, packs = [], []
        i = 0
        while i < len(calls):
            j = i + 1
            if size > 1 and packable[i]:
                while (j < len(calls) and j - i < size and packable[j]
                       and calls[j].spec is calls[i].spec):
                    j += 1
            if j - i == 1:
                alone.append(calls[i])
                self.tasks[calls[i].sent.key] = (calls[i].sent,)
            else:
                pack = calls[i:j]
                key = run_key(pack[0].spec.name, self.session, f"pack{next(self.numbers)}")
                for index, call in enumerate(pack):
                    call.sent.task_key, call.sent.index = key, index
                self.tasks[key] = tuple(call.sent for call in pack)
                packs.append(pack)
            i = j
        return alone, packs

    def send_failed(self, placed, error):
        """send() raised (a bug, or the cluster is gone): end CRASHED the
        runs it did not hand to Dask."""
        _, sents = placed
        with self.lock:
            crashed = [sent.runs for sent in sents
                       if sent.dask_future is None and self._forget(sent)]
            for sent in sents:
                if sent.dask_future is None:
                    self.tasks.pop(sent.task_key or sent.key, None)
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
        unstarted = {RUN_AGAIN: [], WITHHELD_RUN: []}
        rewatch = []
        for dask_future in batch:
            with self.lock:
                sents = self.tasks.get(dask_future.key)
                if sents is None:
                    continue            # seen before (watched twice), or never ours
                if any(sent.key in self.recalling for sent in sents):
                    self.deferred[dask_future.key] = dask_future    # for the recall
                    continue
            status = dask_future.status
            if status not in ("finished", "cancelled", "error"):
                # Its result was lost with a worker after it ended, and Dask
                # computes it again: watch for that.
                rewatch.append(dask_future)
                continue
            outcomes = self._outcomes(dask_future, sents)
            with self.lock:
                self.tasks.pop(dask_future.key, None)
                # One critical section for all the runs of a pack.
                ours = [(sent, outcome) for sent, outcome in zip(sents, outcomes)
                        if self._forget(sent)]
            for sent, outcome in ours:
                if outcome is RUN_AGAIN or outcome is WITHHELD_RUN:
                    unstarted[outcome].append(sent.runs)
                    continue
                value, state = outcome
                if state == COMPLETED:
                    self.releaser.add(value)
                elif state == CRASHED:
                    future = sent.runs[0]
                    value = CrashedRun(f"task run {future.task_name!r} ({future.task_run_id}): "
                                       f"{value}")
                ended.append(sent.runs)
                values.append(value)
                states.append(state)
        if rewatch:
            self._watch_again(rewatch)
        for outcome, runs in unstarted.items():
            if runs:
                self.outbox.give_back(join_runs(runs), outcome is WITHHELD_RUN)
        if ended:
            self.outbox.finish(join_runs(ended), values, states)

    def _outcomes(self, dask_future, sents):
        """(value, state), RUN_AGAIN or WITHHELD_RUN for each run of an
        ended Dask task."""
        status = dask_future.status
        name = sents[0].name
        if status == "finished":
            if sents[0].task_key is None:
                return [(Handle(dask_future, name), COMPLETED)]
            pack = PackValues()
            return [(Handle(dask_future, name, i, pack), COMPLETED) for i in range(len(sents))]
        if status == "cancelled":
            # Not by a recall (that one ends the runs itself): the
            # scheduler went, or the cluster restarted.
            return [(self._lost_reason(), CRASHED)] * len(sents)
        error = _error_of(dask_future)
        if isinstance(error, PackEnded):
            return [_pack_outcome(state, value, name) for state, value in error.outcomes]
        if isinstance(error, Recalled):
            return [WITHHELD_RUN if error.withheld else RUN_AGAIN] * len(sents)
        return [_outcome_of(error)] * len(sents)

    def _lost_reason(self):
        if self.client.status != "running":
            return ("the Dask scheduler was lost (the client's connection to it closed) "
                    "while this run was on the cluster")
        return "Dask cancelled it (the cluster restarted, or another client cancelled it)"

    # -- taking runs back -------------------------------------------------------------

    def take_back(self, runs):
        """Take back runs handed to Dask that surely never started, those of
        `runs` or with None every such run, and return them (a RunList) for
        the engine to cancel."""
        cancelled = []
        with self.lock:
            if runs is None:
                chosen = [s for s in self.placed.values() if s.key not in self.recalling]
            else:
                found = (self.placed.get(run) for run in runs.run_ids())
                chosen = [s for s in found if s is not None and s.key not in self.recalling]
            named = []
            for sent in chosen:
                if sent.key is None:            # never reached Dask
                    self._forget(sent)
                    cancelled.append(sent.runs)
                else:
                    named.append(sent)
            keys = [sent.key for sent in named]
            entries = [sent.recall_entry() for sent in named]
            self.recalling.update(keys)
        if not keys:
            return join_runs(cancelled) if cancelled else None
        maybe_started = self._hold_back(entries)
        with self.lock:
            self.recalling.difference_update(keys)
            for sent in named:
                if sent.key not in maybe_started and self._forget(sent):
                    cancelled.append(sent.runs)
            # The ends the watcher left to this recall are seen again (and
            # ended once); a Dask task none of whose runs is left goes.
            again, done = [], []
            for task_key in {sent.recall_entry()[0] for sent in named}:
                sents = self.tasks.get(task_key, ())
                if task_key in self.deferred:
                    again.append(self.deferred.pop(task_key))
                elif sents and not any(self.keys.get(s.key) is s for s in sents):
                    futures = [s.dask_future for s in sents if s.dask_future is not None]
                    done += futures[:1]
        if done:
            try:
                self.client.cancel(done)
            except Exception:
                pass        # marked: they cannot run anyway
        if again:
            self._watch_again(again)
        return join_runs(cancelled) if cancelled else None

    def _watch_again(self, dask_futures):
        self.completions.update(dask_futures)
        with self.lock:
            self.changed.notify_all()

    def _hold_back(self, entries):
        """Mark the runs of `entries` (Sent.recall_entry) on the cluster
        (see worker.py); the set of the keys of those that may have
        started."""
        keys = [key for _, _, key in entries]
        if self.client.status != "running":
            # No scheduler to reach the workers through (it is lost, or
            # being reconnected to): asking would block until a timeout.
            # The runs end as Dask reports them.
            return set(keys)
        try:
            # Bounded: a scheduler that died a moment ago (the client has not
            # noticed yet) would keep the call waiting for Dask's connect
            # timeout.  Unanswered, every run may have started.
            answers = within(HOLD_BACK_SECONDS, self._mark, entries)
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

    def _mark(self, entries):
        """Steps 1 and 2 of a recall (worker.py): the marks in the
        scheduler's metadata, for workers that join from now on, then on
        every worker; their answers."""
        client = self.client
        client.set_metadata([marks_key(self.session), str(next(self.numbers))],
                            [key for _, _, key in entries])
        # Once a session: registering the plugin again would tear the first
        # down on every worker, with the marks it brought.
        with self.lock:
            install, self.marks_installed = not self.marks_installed, True
        if install:
            client.register_plugin(MarksPlugin(self.session))
        return client.run(hold_back, entries, on_error="return")

    def _collect_times(self):
        """Bring the times of this session's runs from every worker into the
        run trace (their clocks are wall clocks: each taken to this
        process's monotonic clock).  A worker that left took its own."""
        answers = self.client.run(collect_times, self.session, on_error="return")
        offset = time.time() - time.monotonic()
        for address, answer in answers.items():
            if isinstance(answer, BaseException):
                _log.warning("could not collect the run trace's times from %s: %r", address,
                             answer)
                continue
            pid, names, records = answer
            for key, start, end, thread, state in records:
                found = self.trace_keys.get(key)
                if found is None:
                    continue
                track = self.trace.track(("dask", address, thread),
                                         f"dask worker {address} (pid {pid})",
                                         names.get(thread, f"thread {thread}"))
                self.trace.add_keyed(found[0], found[1], track, start - offset, end - offset,
                                     state)

    def _end_session(self):
        self.client.run(end_session, self.session, on_error="return")
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
            gathered = self._gather(on_cluster, deadline_of(timeout)) if on_cluster else []
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
        alive = self.releaser.handles()
        for handle in alive:
            if handle.kept:
                handle.future = None    # the releaser lets go of it, on its thread
        handles = [h for h in alive if h.future is not None]
        if handles and self.client.status != "running":
            lost = TaskRunnerError("the client lost its connection to the Dask scheduler")
            for handle in handles:
                handle.error, handle.future = lost, None
            return
        for handle, (value, error) in zip(handles, self._gather(handles)):
            handle.value, handle.error, handle.future = value, error, None

    def _gather(self, handles, deadline=None):
        """(value, error) for each handle (see gather_each): each dask
        future gathered once, a pack's for all its runs; TimeoutError at
        `deadline` (a time.monotonic() time, or None)."""
        futures, wanted = {}, {}
        for handle in handles:
            futures.setdefault(handle.future.key, handle.future)
            if handle.pack is not None:
                wanted.setdefault(handle.future.key, set()).add(handle.index)
        gathered = dict(zip(futures, gather_each(self.client, list(futures.values()), deadline)))
        alone = {}      # (pack key, index) -> (value, error), for packs that did not come whole
        for key, indexes in wanted.items():
            if gathered[key][1] is not None:
                try:
                    outcomes = items_alone(futures[key], sorted(indexes), deadline)
                except TimeoutError:
                    raise
                except Exception:
                    continue        # the pack's error stands for each
                alone.update(zip(((key, i) for i in sorted(indexes)), outcomes))
        outcomes = []
        for handle in handles:
            value, error = gathered[handle.future.key]
            if error is None:
                outcomes.append((handle.pick(value), None))
            else:
                outcomes.append(alone.get((handle.future.key, handle.index), (None, error)))
        return outcomes


def close_quietly(client, cluster):
    address = getattr(getattr(client, "scheduler", None), "address", None)
    for closable in (client, cluster):
        if closable is not None:
            try:
                closable.close()
            except Exception:
                _log.exception("could not close %r", closable)
    if client is not None:
        _logs.cluster_closed(address, cluster is not None)


def _error_of(dask_future):
    """The exception of an erred or cancelled dask future."""
    try:
        return dask_future.exception()
    except BaseException as error:     # cancelled: exception() raises the reason
        return error


def _pack_outcome(state, value, name):
    """(value, state) of a run of a pack that raised PackEnded."""
    if state == worker.COMPLETED:
        return Handle.holding(value, name), COMPLETED
    if state == worker.FAILED:
        return value.reraised(), FAILED
    if state == worker.WITHHELD:
        return WITHHELD_RUN
    return RUN_AGAIN


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
