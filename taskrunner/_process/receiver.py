"""The receiver side of the process backend: one thread that reads every
worker's answers and watches the worker processes.

    loop:
        wait for a message, a worker's exit, a wake-up (the pool changed),
            or, while a rebalance waits for a worker to finish loading a
            batch, a short timeout
        Done        end the runs answered (results, errors; skipped ones
                    go back, or are cancelled if cancel_all() asked)
        Ready       the worker can take runs
        InitFailed  no worker can run tasks: every run ends CRASHED
        BadBatch    the feeder sends the batch again by value
        exit        the run it was running ends CRASHED, its other runs
                    run again, a new worker takes its place
        deadlines   (once a task with timeout_seconds was sent) a worker
                    whose run has run past its task's timeout is killed;
                    at its exit that run ends TimedOut (or is retried) and
                    its other runs run again

After each, if a worker is idle while another has runs waiting behind a
long one, half of those move (rebalance).
"""

import logging
import os
import pickle
import signal
import time
from multiprocessing import connection
from typing import NamedTuple

from taskrunner import _logging as _logs
from taskrunner._mapped import join_runs
from taskrunner._pickling import with_remote_traceback
from taskrunner._process.wire import BadBatch, Done, InitFailed, Logged, Ready
from taskrunner._worker import unpacked
from taskrunner.exceptions import CrashedRun, TaskRunnerError
from taskrunner.exceptions import run_timed_out as timed_out_error
from taskrunner.remote import COMPLETED, CRASHED, FAILED

__all__ = ["Receiver", "REBALANCE_POLL"]

_log = logging.getLogger("taskrunner.worker")

REBALANCE_POLL = 0.02       # seconds between looks while a rebalance waits for a load
DEADLINE_POLL = 0.01        # seconds between looks at the runs' start times, once one has a timeout
EARLY_DEATHS = 3            # workers in a row dying before ready: the pool is broken


class Overdue(NamedTuple):
    """The run a worker was killed for: it ran past its task's timeout."""
    number: int             # its sequence number on that worker
    limit: float            # the task's timeout_seconds


class Receiver:
    """The receiving thread of a ProcessBackend (see the module docstring)."""

    def __init__(self, pool):
        self.pool = pool
        self.wake_read, self.wake_write = os.pipe()
        self.rebalance_due = False      # a rebalance waits for a worker to load a batch
        self.rebalance_asked = False    # by a placement that left a worker idle
        self.early_deaths = 0           # workers in a row that died before ready
        self.watching_deadlines = False  # a task with timeout_seconds was sent

    def ask_rebalance(self):
        """A placement left a worker idle: look for runs to move (lock held)."""
        self.rebalance_asked = True
        self.wake()

    def watch_deadlines(self):
        """From now on, look at the workers' runs' start times."""
        self.watching_deadlines = True
        self.wake()

    def wake(self):
        try:
            os.write(self.wake_write, b"x")
        except OSError:
            pass

    def close(self):
        os.close(self.wake_read)
        os.close(self.wake_write)

    def run(self):
        """Read answers and watch the workers until the pool stops."""
        pool = self.pool
        while True:
            with pool.lock:
                workers = list(pool.workers.workers)
                # Closing, it stops once no worker lives, and none that died
                # (killed at a second Ctrl-C) still has runs to end.
                if pool.closing and not any(w.process.is_alive() or w.count for w in workers):
                    return
            waiting = {self.wake_read: None}
            for worker in workers:
                waiting[worker.results] = worker
                waiting[worker.process.sentinel] = worker
            timeout = REBALANCE_POLL if self.rebalance_due else None
            if self.watching_deadlines:
                self.kill_overdue(workers)
                timeout = DEADLINE_POLL
            events = connection.wait(list(waiting), timeout=timeout)
            if (not events and self.rebalance_due) or self.rebalance_asked:
                self.rebalance_asked = False
                self.rebalance()
            for ready in events:
                try:
                    self._attend(ready, waiting[ready])
                except Exception:               # a bug: log it, never lose the receiver
                    _log.exception("error handling a message from a worker")
            if pool.closing and not any(w.process.is_alive() or w.count
                                        for w in pool.workers.workers):
                return

    def _attend(self, ready, worker):
        if worker is None:
            os.read(self.wake_read, 4096)
        elif worker not in self.pool.workers.workers:
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
        if type(message) is Done:
            self._done(worker, message)
        elif type(message) is Logged:
            self._logged(worker, message)
        elif type(message) is Ready:
            with self.pool.lock:
                worker.ready = True
                self.pool.room_changed.notify_all()
            _logs.worker_ready(worker.index, message.pid)
            self.rebalance()
        elif type(message) is InitFailed:
            self.pool.break_down(CrashedRun(f"the worker initializer failed:\n{message.text}"))
        elif type(message) is BadBatch:
            self.pool.feeder.resend_by_value(worker, message.text)
        return True

    def _logged(self, worker, message):
        """A record a worker logged: to this process's handlers, naming the
        run it came from (it is still in flight: its answer comes after)."""
        facts = None
        if message.run >= 0:
            with self.pool.lock:
                facts = worker.facts_of(message.run)
        task_name, run_id, attempt = facts or (message.task_name, None, None)
        _logs.reemit(message.record, run_id, task_name, attempt)

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

    def _done(self, worker, done):
        first, count = done.first, done.n_runs
        try:
            answers = pickle.loads(done.body)
            values, errors, skipped = unpacked(answers.values), answers.errors, answers.skipped
        except Exception as error:   # the worker checked; this process differs
            values, skipped = [None] * count, []
            failure = TaskRunnerError(f"the result could not be unpickled here: {error!r}")
            errors = {first + i: (failure, "") for i in range(count)}
        pool = self.pool
        with pool.lock:
            runs = worker.take_answered(first, count)
            answered = runs
            ran = count - len(skipped)
            if ran:
                # The batch size follows what runs cost (Feeder.observe).
                pool.feeder.observe(ran, done.busy)
            back = cancel = ()
            states = COMPLETED
            if worker.given_up or errors or skipped:
                runs, values, states, back, cancel = _sorted_answers(
                    worker, first, runs, values, errors, skipped)
            # The dispatcher sends whole batches (Feeder.room_of): waking it
            # for an answer that opens no room would only cost a switch.
            if pool.feeder.free_room():
                pool.room_changed.notify_all()
        if pool.trace is not None and done.times is not None:
            pool.trace.add_answers(answered, self.track_of(worker), done.times, first, errors)
        pool.give_back(cancel, back)
        if runs:
            pool.outbox.finish(runs, values, states)
        self.rebalance()

    def track_of(self, worker):
        """The run trace's track of a worker process (a new one for a
        worker that replaces a dead one)."""
        pid = worker.process.pid
        return self.pool.trace.track(("worker", pid), f"worker process {worker.index} (pid {pid})",
                                     "runs")

    def _lost(self, worker):
        """A worker died: the run it was running ends CRASHED, its other
        runs go back to be run again, and a new worker takes its place."""
        pool = self.pool
        code = worker.process.exitcode
        # Killed by a signal (from outside: an operator, the OOM killer), a
        # worker says nothing about whether new workers can start.
        if not worker.ready and not pool.closing and (code is None or code >= 0):
            self.early_deaths += 1
            if self.early_deaths >= EARLY_DEATHS:
                pool.break_down(CrashedRun(
                    f"worker processes die before they can run tasks (the last one "
                    f"{how_it_ended(code)}); is the main module importable by a new "
                    f"interpreter?"))
        elif worker.ready:
            self.early_deaths = 0
        with pool.lock:
            crashed_number = worker.block.started
            crashed, rerun = worker.crashed_and_rest()
            _logs.worker_died(worker.index, worker.process.pid, how_it_ended(code), bool(crashed))
            if not pool.closing and pool.broken is None:
                pool.workers.replace(worker)
            else:
                pool.workers.remove(worker)
            pool.room_changed.notify_all()
        worker.outbox.put(None)
        worker.tasks.close()
        worker.results.close()
        if crashed and worker.overdue is not None:
            if worker.overdue.number == crashed_number:
                pool.outbox.finish(join_runs(crashed), [timed_out_error(
                    crashed[0][0].task_name, worker.overdue.limit)], FAILED)
            else:
                rerun.extend(crashed)   # it moved on as we killed it: not that run's fault
        elif crashed:
            crashed = join_runs(crashed)
            pool.outbox.finish(crashed, [crash_error(crashed[0], worker.process.pid, code)],
                               CRASHED)
        if rerun:
            # Closing (a second Ctrl-C killed it): nothing runs again.
            pool.outbox.give_back(join_runs(rerun), pool.closing)

    def kill_overdue(self, workers):
        """Kill each worker whose run has run past its task's timeout
        (a process, unlike a thread, can be stopped); _lost() ends the run
        when the worker's exit is seen."""
        now = time.monotonic()
        with self.pool.lock:
            for worker in workers:
                if worker.overdue is not None or not worker.count:
                    continue
                number, since = worker.block.started, worker.block.started_at
                if number <= worker.block.finished or number in worker.given_up:
                    continue
                limit = worker.timeout_of(number)
                if limit and now - since >= limit:
                    worker.overdue = Overdue(number, limit)
                    name, run_id, attempt = worker.run_facts_of(number)
                    _logs.run_timed_out(name, run_id, attempt, limit, scope=self.pool.runner._engine)
                    _log.debug("killing worker process %s (pid %s): its run is past its "
                               "timeout", worker.index, worker.process.pid)
                    try:
                        worker.process.kill()
                    except (OSError, AttributeError):
                        pass                # it is gone already

    def rebalance(self):
        """More workers are idle than runs are ready, while another worker
        has runs waiting behind the one it runs (a long one, say): take half
        of those back, for the dispatcher to hand out again.  Asked after
        every message, and after every placement that left a worker idle
        (ProcessBackend.place): no ready run waits while a worker is idle.

        Nothing is taken from a worker that is loading a batch (see
        _worker.pyx): runs whose arguments are slow to arrive or to unpickle
        would only start that wait again on the idle worker, and then be
        taken back from there, and so on for ever.  Instead the receiver
        looks again soon (REBALANCE_POLL)."""
        pool = self.pool
        requeued = []
        with pool.lock:
            self.rebalance_due = False
            if pool.closing:
                return
            ready = [w for w in pool.workers.workers if w.ready]
            # Ready runs in the engine go to idle workers first: rebalance
            # only for the idle workers they will not fill.
            idle = sum(1 for w in ready if w.count == 0)
            if idle <= pool.outbox.ready_count:
                return
            busiest = max(ready, key=lambda w: w.count)
            if busiest.block.loading:
                self.rebalance_due = busiest.count > 0
                return
            # The later half of the runs waiting behind the one it started
            # last go.  (Counted, not listed: there may be many.)
            waiting = busiest.waiting()
            if waiting < 1:
                return
            started = busiest.block.started
            first = started + 1 + waiting // 2
            for number in sorted(n for n in busiest.given_up if n > started):
                if number <= first:
                    first += 1
            _, requeued = busiest.take_back(first, None, cancel=False)
        pool.give_back([], requeued)


def _sorted_answers(worker, first, runs, values, errors, skipped):
    """A batch's answers that are not all results: (the runs to end, their
    values, their states, the runs to give back, the runs to cancel), the
    runs as RunLists.  Answers to runs given up are dropped; a skipped run
    goes back to be run again, or is cancelled if cancel_all() asked.  Runs
    between the exceptions end COMPLETED as stretches (views): after a
    rebalance took back half of a batch, a Python step per run of it would
    cost more than the runs."""
    numbers = range(first, first + len(runs))
    dropped = worker.drop_answers(numbers)
    skipped = {n for n in skipped if n in numbers} - dropped
    failed = {n for n in errors if n in numbers} - dropped - skipped
    ours, kept_values, states, back, cancel = [], [], [], [], []
    at = 0                  # the next index not yet sorted
    for number in sorted(dropped | skipped | failed) + [numbers.stop]:
        i = number - first
        if i > at:
            ours.append(runs.view(at, i))
            kept_values.extend(values[at:i])
            states.extend([COMPLETED] * (i - at))
        at = i + 1
        if number in failed:
            ours.append(runs.view(i, i + 1))
            kept_values.append(with_remote_traceback(*errors[number]))
            states.append(FAILED)
        elif number in skipped:
            (cancel if number in worker.cancel_if_skipped else back).append(runs.view(i, i + 1))
    if worker.cancel_if_skipped:
        worker.cancel_if_skipped.difference_update(numbers)
    return join_runs(ours), kept_values, states, back, cancel


def how_it_ended(code):
    if code is not None and code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def crash_error(future, pid, code):
    return CrashedRun(
        f"the worker process (pid {pid}) running task run {future.task_name!r} "
        f"({future.task_run_id}) died: it {how_it_ended(code)}")
