"""ProcessPoolTaskRunner: runs tasks in worker processes.

The dependency graph stays in this process: only ready runs are sent, with
their upstream results in place of the futures.  Three kinds of threads
serve the pool here.  The feeder takes ready runs from the engine as workers
have room and splits them into batches, sized so that a batch takes about
BATCH_SECONDS of the workers' time (from the task durations they report) and
no worker is left idle while runs wait.  One sender per worker writes its
batches to the worker's pipe, so a slow reader never holds the others up.
The receiver reads results as they stream back and completes their runs;
it also watches the worker processes and replaces any that dies, running
again what the dead one had not finished, except the run that killed it,
which ends CRASHED.

Each worker shares a control block with this process (see _worker.pyx): the
run it started last, the run it finished last, and a window of runs it must
not start.  That is how a dead worker's runs are told apart, and how runs
sent but not started are taken back (cancel() and cancel_all()).
"""

import collections
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
from multiprocessing import connection

import cloudpickle

from taskrunner._calls import call_spec
from taskrunner._engine import Engine
from taskrunner._graph import STATES
from taskrunner._mapped import join_runs
from taskrunner._remote import Outbox
from taskrunner._pickling import (
    check_picklable, checked_map_value, dumps, dumps_checked, unsendable_call_error,
    with_remote_traceback,
)
from taskrunner._worker import BLOCK_WORDS, SKIP, ControlBlock, serve, unpacked
from taskrunner.base import EngineTaskRunner, checked_max_workers
from taskrunner.exceptions import CrashedRun, TaskRunnerError

__all__ = ["ProcessPoolTaskRunner"]

_log = logging.getLogger("taskrunner")

_COMPLETED, _FAILED, _CRASHED = STATES["COMPLETED"], STATES["FAILED"], STATES["CRASHED"]

BATCH_SECONDS = 0.01        # worker time one batch aims to take
MAX_BATCH = 20_000          # runs in one batch at most
_FIRST_GUESS = 0.001        # seconds a run takes, before any was timed
_UNLIMITED = 2**30          # the engine's running limit: the feeder sets the pace
REBALANCE_POLL = 0.02       # seconds between looks while a rebalance waits for a load


class ProcessPoolTaskRunner(EngineTaskRunner):
    """Runs tasks in up to `max_workers` worker processes (default: the
    number of CPUs).

    `initializer(*initargs)` runs once in each worker before its first task;
    `mp_context` is a start method name or a multiprocessing context
    ("spawn" by default).  Tasks, their parameters and results travel with
    cloudpickle, so lambdas and closures work; each task function is
    serialised once per runner.
    """

    def __init__(self, max_workers=None, initializer=None, initargs=(), mp_context=None):
        max_workers = checked_max_workers(max_workers, os.cpu_count() or 1)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
        try:
            initargs = tuple(initargs)
        except TypeError:
            raise TypeError(
                f"initargs must be a tuple of arguments, not {type(initargs).__name__}") from None
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = initargs
        self._mp_context = mp_context
        self._context = _context_of(mp_context)
        self._setup = dumps_checked((initializer, initargs), "initializer and initargs")
        self._pool = None

    @property
    def name(self):
        return "processpool"

    @property
    def max_workers(self):
        return self._max_workers

    def duplicate(self):
        return type(self)(max_workers=self._max_workers, initializer=self._initializer,
                          initargs=self._initargs, mp_context=self._mp_context)

    def submit(self, task, parameters=None, wait_for=None, dependencies=None):
        engine = self._started()
        self._pool.function_of(task)
        if parameters is not None and hasattr(parameters, "items"):
            for name, value in parameters.items():
                check_picklable(value, f"parameter {name!r}")
        future = engine.submit(task, parameters, wait_for, dependencies)
        self._pool.submitted(1)
        return future

    def map(self, task, parameters, wait_for=None):
        engine = self._started()
        self._pool.function_of(task)
        if hasattr(parameters, "items"):
            parameters = {name: checked_map_value(name, value)
                          for name, value in parameters.items()}
        futures = engine.map(task, parameters, wait_for)
        self._pool.submitted(len(futures))
        return futures

    def _start(self):
        engine = Engine(_UNLIMITED, None, self._recall, callbacks_apart=True)
        self._pool = _Pool(engine, self._context, self._max_workers, self._setup)
        try:
            self._pool.start()
        except BaseException:
            self._pool.stop()
            self._pool = None
            engine.close()
            raise
        return engine

    def _recall(self, future):
        return self._pool.recall(future)

    def _stop(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def __repr__(self):
        return f"ProcessPoolTaskRunner(max_workers={self._max_workers})"


def _context_of(mp_context):
    if mp_context is None:
        return multiprocessing.get_context("spawn")
    if isinstance(mp_context, str):
        try:
            return multiprocessing.get_context(mp_context)
        except ValueError:
            raise ValueError(
                f"mp_context {mp_context!r} is not a start method here; use one of "
                f"{multiprocessing.get_all_start_methods()}") from None
    if not hasattr(mp_context, "Process"):
        raise TypeError(
            f"mp_context must be a start method name or a multiprocessing context, "
            f"not {type(mp_context).__name__}")
    return mp_context


# -- the pool -------------------------------------------------------------------

class _Batch:
    """Runs in flight to one worker, numbered first .. first+len(runs)-1:
    `taken` of them (from the start) have been answered."""

    __slots__ = ("first", "runs", "taken", "by_value")

    def __init__(self, first, runs, by_value):
        self.first = first
        self.runs = runs            # a RunList
        self.taken = 0
        self.by_value = by_value    # pickled by value (cloudpickle): no retry by value


class _Worker:
    """This process's view of one worker process."""

    def __init__(self, index, process, tasks, results, block):
        self.index = index
        self.process = process
        self.tasks = tasks                  # our end of the pipe runs go down
        self.results = results              # our end of the pipe results come up
        self.block = block
        self.outbox = queue.SimpleQueue()   # pickled batches for the sender
        self.functions = set()              # function ids it has
        self.next_run = 0                   # number of the next run sent
        self.in_flight = collections.deque()    # of _Batch, oldest first
        self.count = 0                      # runs in flight, those given back aside
        self.given_back = set()             # runs in flight no longer ours
        self.cancel_if_skipped = set()      # given back if it skips them: cancelled
        self.ready = False
        self.by_value = False               # its batches go pickled by value
        self.sender = None

    def enter_flight(self, runs, by_value=False):
        """Number a batch and count it in flight; returns its first run."""
        first = self.next_run
        self.next_run += len(runs)
        self.in_flight.append(_Batch(first, runs, by_value))
        self.count += len(runs)
        return first

    def take_range(self, first, count):
        """The runs first .. first+count-1 (a RunList), leaving flight.
        The worker answers every run sent, in order: anything else is a bug."""
        out = []
        while count:
            batch = self.in_flight[0]
            if batch.first + batch.taken != first:
                raise AssertionError(f"worker {self.index}: results out of order")
            n = min(count, len(batch.runs) - batch.taken)
            out.append(batch.runs[batch.taken:batch.taken + n])
            batch.taken += n
            if batch.taken == len(batch.runs):
                self.in_flight.popleft()
            first += n
            count -= n
        out = join_runs(out)
        self.count -= len(out)
        return out

    def give_up(self, runs):
        """Runs in flight (their numbers) are no longer ours: the worker
        will answer them (skipped, or a result nobody uses)."""
        fresh = set(runs) - self.given_back
        self.given_back |= fresh
        self.count -= len(fresh)

    def run_of(self, run_id):
        """The number of run `run_id` (an engine id) if it is in flight here
        and ours."""
        for batch in self.in_flight:
            position = batch.runs.position_of(run_id)
            if position >= batch.taken and batch.first + position not in self.given_back:
                return batch.first + position
        return None

    def runs_from(self, first, end=None):
        """(run, that run as a RunList) for every run in flight numbered
        `first` or later (and before `end`)."""
        for batch in self.in_flight:
            stop = len(batch.runs) if end is None else min(len(batch.runs), end - batch.first)
            for i in range(max(batch.taken, first - batch.first), stop):
                yield batch.first + i, batch.runs[i:i + 1]


class _Pool:
    """The worker processes of one entered runner, and its threads."""

    def __init__(self, engine, context, size, setup):
        self.engine = engine
        self.outbox = Outbox(engine)
        self.context = context
        self.size = size
        self.setup = setup
        self.shared = context.RawArray("q", size * BLOCK_WORDS)
        self.workers = []
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        self.closing = False
        self.functions = {}                 # id(task) -> (task, function id, name, blob, is_async)
        self.function_ids = itertools.count()
        self.seconds_per_run = _FIRST_GUESS
        self.wake_read, self.wake_write = os.pipe()
        self.threads = []
        self.failure = None                 # why no worker can run tasks, if none can
        self.unstarted = list(range(1, size))   # workers to start when there is work for them
        self.runs_submitted = 0
        self.early_deaths = 0               # workers in a row that died before ready
        self.rebalance_due = False          # a rebalance waits for a worker to load a batch

    # -- functions ------------------------------------------------------------

    def function_of(self, task):
        """(function id, name, blob, is_async) of a task, pickled once per
        runner; TypeError if it cannot be pickled."""
        found = self.functions.get(id(task))
        if found is None or found[0] is not task:
            spec = call_spec(task)
            blob = dumps_checked(spec.fn, f"task {spec.name!r}")
            found = (task, next(self.function_ids), spec.name, blob, spec.is_async)
            self.functions[id(task)] = found
        return found[1:]

    # -- starting and stopping ---------------------------------------------------

    def start(self):
        """Start one worker now, the others with the second run submitted:
        a lone first task need not wait while every worker starts."""
        self.workers.append(self._spawn(0))
        for target, name in ((self._feed, "feeder"), (self._receive, "receiver")):
            thread = threading.Thread(target=target, name=f"taskrunner-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def submitted(self, count):
        """`count` more runs were submitted."""
        self.runs_submitted += count
        if self.unstarted and self.runs_submitted > 1:
            self.start_the_rest()

    def start_the_rest(self):
        """Start the workers not started yet (under the lock, so that stop()
        sees every process)."""
        with self.lock:
            if not self.unstarted or self.closing or self.failure is not None:
                return
            indices, self.unstarted = self.unstarted, []
            for index in indices:
                self.workers.append(self._spawn(index))
        self._wake()        # the receiver watches the new ones too

    def _spawn(self, index):
        block = ControlBlock(self.shared, index)
        block.reset()
        task_read, task_write = self.context.Pipe(duplex=False)
        result_read, result_write = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=serve, args=(task_read, result_write, self.shared, index, self.setup),
            name=f"taskrunner-worker-{index}", daemon=True)
        process.start()
        task_read.close()
        result_write.close()
        worker = _Worker(index, process, task_write, result_read, block)
        worker.sender = threading.Thread(target=self._send, args=(worker,), daemon=True,
                                         name=f"taskrunner-sender-{index}")
        worker.sender.start()
        return worker

    def stop(self):
        """Stop the workers and the threads; no worker process outlives this."""
        with self.lock:
            self.closing = True
            self.room.notify_all()
            workers = list(self.workers)
        self.engine.close()
        for worker in workers:
            worker.outbox.put(None)
        self._wake()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join()
        for worker in workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.sender.join()
            worker.tasks.close()
            worker.results.close()
        os.close(self.wake_read)
        os.close(self.wake_write)

    def _wake(self):
        try:
            os.write(self.wake_write, b"x")
        except OSError:
            pass

    # -- sending ----------------------------------------------------------------

    def _batch_size(self):
        return max(1, min(MAX_BATCH, int(BATCH_SECONDS / self.seconds_per_run)))

    def _feed(self):
        """Take ready runs as workers have room, and send them in batches."""
        outbox = self.outbox
        while True:
            with self.lock:
                while not self.closing and self.failure is None and self._free_room() == 0:
                    self.room.wait()
                if self.closing:
                    return
                failure = self.failure
                room = self._free_room() if failure is None else MAX_BATCH
            runs = outbox.take(room)
            if runs is None:
                return
            if failure is not None:
                outbox.finish(runs, [failure] * len(runs), _CRASHED)
                continue
            with self.lock:
                if self.closing:
                    outbox.give_back(runs, True)
                    return
                # Sent and in flight in one critical section of ours: a
                # recall (under this lock) finds every run sent.  Those
                # cancelled since we took them stay behind.
                runs = outbox.mark_sent(runs)
                plan = self._plan(runs) if len(runs) else []
            for worker, batch, first in plan:
                try:
                    self._send_batch(worker, batch, first, worker.by_value)
                except Exception as error:     # a bug: fail the batch, never the feeder
                    _log.exception("could not send runs to a worker")
                    self._fail_in_flight(worker, batch, first, error)

    def _free_room(self):
        size = self._batch_size()
        return sum(_room_of(w, size) for w in self.workers)

    def _plan(self, runs):
        """Split `runs` (a RunList) among the workers with room, least loaded first,
        evenly, in batches of at most the batch size, and put them in
        flight: [(worker, batch, its first run number)].  Lock held."""
        size = self._batch_size()
        open_workers = sorted((w for w in self.workers if _room_of(w, size)),
                              key=lambda w: w.count)
        plan = []
        start = 0
        for i, worker in enumerate(open_workers):
            left = len(runs) - start
            if left == 0:
                break
            share = min(_room_of(worker, size), -(-left // (len(open_workers) - i)))
            # Whole batches, the odd remainder first: when it is done the
            # worker still has a whole batch to run while the next is sent.
            end = start + share
            cut = start + share % size if share % size else start + size
            while start < end:
                batch = runs[start:cut]
                plan.append((worker, batch, worker.enter_flight(batch, worker.by_value)))
                start, cut = cut, cut + size
        if start < len(runs):
            self.outbox.give_back(runs[start:], False)
        return plan

    def _bad_batch(self, worker, text):
        """The worker could not unpickle its next batch (an object of a
        __main__ it cannot import, say): send the runs still ours again,
        pickled by value, or if the batch already went so, fail them with
        the reason."""
        with self.lock:
            batch = worker.in_flight[0]
            numbers = range(batch.first + batch.taken, batch.first + len(batch.runs))
            taken = worker.take_range(numbers.start, len(numbers))
            ours, cancelled = [], []
            for number, one in zip(numbers, _each(taken)):
                if number in worker.given_back:
                    worker.given_back.discard(number)
                    worker.count += 1       # take_range counted it out already
                elif number in worker.cancel_if_skipped:
                    cancelled.append(one)   # cancel_all() meant it: it never started
                else:
                    ours.append(one)
            worker.cancel_if_skipped.difference_update(numbers)
            runs = join_runs(ours)
            again = not batch.by_value
            # From now on this worker gets every batch by value.
            worker.by_value = True
            if again and len(runs):
                first = worker.enter_flight(runs, by_value=True)
        self._give_back(cancelled, [])
        if not len(runs):
            return
        if again:
            self._send_batch(worker, runs, first, by_value=True)
        else:
            error = TaskRunnerError(f"a worker process could not unpickle these runs:\n{text}")
            self.outbox.finish(runs, [error] * len(runs), _FAILED)

    def _send_batch(self, worker, runs, run, by_value):
        """Pickle a batch in flight to `worker`, its first run numbered
        `run`, and hand it to the worker's sender."""
        groups = self.outbox.calls(runs, True)
        new_functions = {}
        wire = []
        with self.lock:
            for spec, args_list, kwargs_list, single in groups:
                function_id, name, blob, is_async = self.function_of(spec.task)
                if function_id not in worker.functions:
                    new_functions[function_id] = (function_id, name, blob, is_async)
                wire.append((function_id, run, args_list, kwargs_list, single))
                run += len(args_list)
        # Functions go apart from the arguments: if the worker cannot load
        # the arguments, it has the functions all the same.
        dump = cloudpickle.dumps if by_value else dumps
        try:
            body = dump(wire)
        except Exception:
            body = dump(self._fail_unpicklable(worker, groups, wire, dump))
        worker.outbox.put(pickle.dumps((list(new_functions.values()), body),
                                       pickle.HIGHEST_PROTOCOL))
        # Known to the worker only once they are on their way to it.
        with self.lock:
            worker.functions.update(new_functions)

    def _fail_unpicklable(self, worker, groups, wire, dump):
        """A batch did not pickle (an upstream's result, say): fail the runs
        that do not, each naming its parameter, and return the wire with
        those runs left as SKIP groups, so that the worker still answers
        every number."""
        kept, bad = [], {}
        for (spec, _, _, _), (function_id, first, args_list, kwargs_list, single) in zip(
                groups, wire):
            for i, args in enumerate(args_list):
                kwargs = kwargs_list[i] if kwargs_list else None
                try:
                    dump((args, kwargs))
                except Exception as error:
                    call = (args,) if single else args
                    bad[first + i] = unsendable_call_error(
                        spec, call, kwargs, dump, "a worker process", error)
                    kept.append((SKIP, first + i, [None], None, True))
                else:
                    kept.append((function_id, first + i, [args], [kwargs], single))
        with self.lock:
            ours = [(number, one) for number, one in worker.runs_from(min(bad), max(bad) + 1)
                    if number in bad and number not in worker.given_back]
            worker.give_up(bad)
        if ours:
            self.outbox.finish(join_runs(one for _, one in ours),
                               [bad[number] for number, _ in ours], _FAILED)
        return kept

    def _fail_in_flight(self, worker, runs, first, error):
        """Sending a batch failed (a bug): fail its runs still ours, and have
        the worker answer their numbers as skipped."""
        numbers = range(first, first + len(runs))
        with self.lock:
            ours = [one for number, one in worker.runs_from(numbers.start, numbers.stop)
                    if number not in worker.given_back]
            worker.give_up(numbers)
        worker.outbox.put(pickle.dumps(
            ([], dumps([(SKIP, first, range(len(runs)), None, True)])), pickle.HIGHEST_PROTOCOL))
        if ours:
            self.outbox.finish(join_runs(ours), [error] * len(ours), _FAILED)

    def _send(self, worker):
        while True:
            data = worker.outbox.get()
            if data is None:
                try:
                    worker.tasks.send_bytes(pickle.dumps(None))
                except OSError:
                    pass
                return
            try:
                worker.tasks.send_bytes(data)
            except OSError:
                return      # it died; the receiver takes care of its runs

    # -- taking runs back ----------------------------------------------------------

    def recall(self, runs):
        """The engine's recall hook: take back runs sent but not started,
        the one run of `runs`, or with None every such run, and return
        those (a RunList) for the engine to cancel.  The feeder marks runs
        sent and puts them in flight under this lock, so a run sent is
        always in some worker's flight here."""
        target = None if runs is None else runs.run_ids()[0]
        cancelled, requeued = [], []
        with self.lock:
            for worker in self.workers:
                first = worker.block.started + 1 if target is None else worker.run_of(target)
                if first is not None:
                    self._take_back(worker, first, target, cancelled, requeued)
            self.room.notify_all()
        self._give_back([], requeued)
        return join_runs(cancelled)

    def _rebalance(self):
        """A worker is idle and no run is ready, while another worker has
        runs waiting behind the one it runs (a long one, say): take half of
        those back, for the feeder to hand out again.

        Nothing is taken from a worker that is loading a batch (see
        _worker.pyx): runs whose arguments are slow to arrive or to unpickle
        would only start that wait again on the idle worker, and then be
        taken back from there, and so on for ever."""
        requeued = []
        with self.lock:
            self.rebalance_due = False
            if self.closing or self.outbox.ready_count:
                return
            ready = [w for w in self.workers if w.ready]
            if not any(w.count == 0 for w in ready):
                return
            busiest = max(ready, key=lambda w: w.count)
            if busiest.block.loading:
                # Look again soon: once it has loaded, what waits behind
                # the run it starts may move.
                self.rebalance_due = busiest.count > 0
                return
            self.rebalance_due = False
            # The runs numbered after the one it started last wait, those
            # given back aside; the later half of them go.  (Counted, not
            # listed: there may be many.)
            started = busiest.block.started
            gone = sorted(run for run in busiest.given_back if run > started)
            waiting = busiest.next_run - started - 1 - len(gone)
            if waiting < 1:
                return
            first = started + 1 + waiting // 2
            for run in gone:
                if run <= first:
                    first += 1
            self._take_back(busiest, first, None, [], requeued, cancel=False)
        self._give_back([], requeued)

    def _take_back(self, worker, first, target, cancelled, requeued, cancel=True, end=None):
        """Stop `worker` from run `first` (to `end`, by default every run
        sent) and take back what surely never starts: `target` (every such
        run if None, when `cancel`) is to be cancelled, the rest requeued.
        Runs that may have started just now stay in flight; if the worker
        reports them skipped they are requeued, or with `target` None
        (cancel_all) cancelled.  Lock held."""
        if end is None:
            end = worker.next_run
        if first >= end:
            return
        old_first, old_end = worker.block.stop_window
        if worker.block.started < old_end - 1:          # the old window still matters
            first, end = min(first, old_first), max(end, old_end)
        started = worker.block.stop(first, end)
        for run, one in list(worker.runs_from(first, end)):
            if run in worker.given_back:
                continue
            is_target = cancel and (target is None or one.position_of(target) == 0)
            if run > started:                           # surely never starts
                worker.given_back.add(run)
                worker.count -= 1
                (cancelled if is_target else requeued).append(one)
            elif is_target and target is None:
                worker.cancel_if_skipped.add(run)

    def _give_back(self, cancelled, requeued):
        """Give back runs (lists of RunLists)."""
        if requeued:
            self.outbox.give_back(join_runs(requeued), False)
        if cancelled:
            self.outbox.give_back(join_runs(cancelled), True)

    # -- receiving -----------------------------------------------------------------

    def _receive(self):
        """Read results and watch the workers until the pool stops."""
        while True:
            with self.lock:
                workers = list(self.workers)
                if self.closing and not any(w.process.is_alive() for w in workers):
                    return
            waiting = {self.wake_read: None}
            for worker in workers:
                waiting[worker.results] = worker
                waiting[worker.process.sentinel] = worker
            events = connection.wait(
                list(waiting), timeout=REBALANCE_POLL if self.rebalance_due else None)
            if not events:
                self._rebalance()
            for ready in events:
                worker = waiting[ready]
                try:
                    self._attend(ready, worker)
                except Exception:               # a bug: log it, never lose the receiver
                    _log.exception("error handling a message from a worker")
            if self.closing and not any(w.process.is_alive() for w in self.workers):
                return

    def _attend(self, ready, worker):
        if worker is None:
            os.read(self.wake_read, 4096)
        elif worker not in self.workers:
            return                              # already replaced this round
        elif ready is worker.results and self._read(worker):
            return
        else:
            worker.process.join(timeout=5)      # its pipe closed: it is exiting
            self._drain(worker)
            self._lost(worker)

    def _read(self, worker):
        """One message from `worker`; False at EOF (it died)."""
        try:
            data = worker.results.recv_bytes()
        except (EOFError, OSError):
            return False
        message = pickle.loads(data)
        kind = message[0]
        if kind == "done":
            _, first, count, busy, body = message
            try:
                values, errors, skipped = pickle.loads(body)
                values = unpacked(values)
            except Exception as error:   # the worker checked; this process differs
                values, skipped = [None] * count, []
                failure = TaskRunnerError(f"the result could not be unpickled here: {error!r}")
                errors = {first + i: (failure, "") for i in range(count)}
            self._done(worker, first, values, errors, skipped, busy)
        elif kind == "ready":
            with self.lock:
                worker.ready = True
                self.room.notify_all()
            self._rebalance()
        elif kind == "init-failed":
            self._broken(CrashedRun(f"the worker initializer failed:\n{message[1]}"))
        elif kind == "bad-batch":
            self._bad_batch(worker, message[1])
        return True

    def _drain(self, worker):
        """Read what a worker sent before it exited."""
        while True:
            try:
                if not worker.results.poll():
                    return
            except (EOFError, OSError):
                return
            if not self._read(worker):
                return

    def _done(self, worker, first, values, errors, skipped, busy):
        count = len(values)
        with self.lock:
            runs = worker.take_range(first, count)
            if count:
                ran = count - len(skipped)
                if ran:
                    # The batch size follows what runs cost, smoothed.
                    self.seconds_per_run = 0.7 * self.seconds_per_run + 0.3 * max(busy / ran, 1e-7)
            given_back = worker.given_back
            cancel_if_skipped = worker.cancel_if_skipped
            if given_back or errors or skipped:
                ours, ok_values, states = [], [], []
                back, cancel = [], []
                skipped = set(skipped)
                for i in range(len(runs)):
                    one = runs[i:i + 1]
                    run = first + i
                    if run in given_back:
                        given_back.discard(run)
                        worker.count += 1       # take_range counted it out already
                        continue
                    if run in skipped:
                        (cancel if run in cancel_if_skipped else back).append(one)
                        cancel_if_skipped.discard(run)
                        continue
                    cancel_if_skipped.discard(run)
                    ours.append(one)
                    if run in errors:
                        ok_values.append(with_remote_traceback(*errors[run]))
                        states.append(_FAILED)
                    else:
                        ok_values.append(values[i])
                        states.append(_COMPLETED)
                runs, values = join_runs(ours), ok_values
            else:
                back = cancel = ()
                states = _COMPLETED
            self.room.notify_all()
        self._give_back(cancel, back)
        if runs:
            self.outbox.finish(runs, values, states)
        self._rebalance()

    def _lost(self, worker):
        """A worker died: the run it was running ends CRASHED, its other
        runs go back to be run again, and a new worker takes its place."""
        code = worker.process.exitcode
        if not worker.ready and not self.closing:
            self.early_deaths += 1
            if self.early_deaths >= 3:
                self._broken(CrashedRun(
                    f"worker processes die before they can run tasks (the last one "
                    f"{_how_it_ended(code)}); is the main module importable by a new "
                    f"interpreter?"))
        elif worker.ready:
            self.early_deaths = 0
        with self.lock:
            started, finished = worker.block.started, worker.block.finished
            crashed, rerun = [], []
            for run, one in worker.runs_from(0):
                if run in worker.given_back:
                    continue
                if run == started and started > finished:
                    crashed.append(one)
                else:
                    rerun.append(one)
            worker.in_flight.clear()
            worker.count = 0
            replace = not self.closing and self.failure is None
            if replace:
                self.workers[self.workers.index(worker)] = self._spawn(worker.index)
            else:
                self.workers.remove(worker)
            self.room.notify_all()
        worker.outbox.put(None)
        worker.tasks.close()
        worker.results.close()
        if crashed:
            crashed = join_runs(crashed)
            self.outbox.finish(crashed, [_crash_error(crashed[0], worker.process.pid, code)],
                               _CRASHED)
        if rerun:
            self.outbox.give_back(join_runs(rerun), False)

    def _broken(self, error):
        """No worker can run tasks (the initializer raises, say): every run
        ends CRASHED with `error`, now and from now on."""
        with self.lock:
            if self.failure is None:
                self.failure = error
            self.room.notify_all()


def _each(runs):
    """A RunList's runs one by one, each as a RunList (no future made)."""
    return (runs[i:i + 1] for i in range(len(runs)))


def _room_of(worker, size):
    """How many runs `worker` may be sent now.  It holds up to two batches,
    one running and one waiting, and gets another only when a whole batch
    has room: topping it up as each result comes back would split the work
    into many small messages, each costing as much as a large one."""
    if not worker.ready:
        return 0
    room = 2 * size - worker.count
    return room if room >= size else 0


def _how_it_ended(code):
    if code is not None and code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _crash_error(future, pid, code):
    return CrashedRun(
        f"the worker process (pid {pid}) running task run {future.task_name!r} "
        f"({future.task_run_id}) died: it {_how_it_ended(code)}")
