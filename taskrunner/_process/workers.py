"""The worker processes of one entered ProcessPoolTaskRunner, as the parent
sees them.

Each Worker is a process running _worker.serve, two pipes (runs down,
answers up), a sender thread that writes its batches (so that a slow
reader holds no other worker up), and a control block in memory shared
with the parent (_worker.ControlBlock: the run it started last, the run it
finished last, a window of runs it must skip, whether it is loading a
batch).  Its flight is the batches sent and not yet wholly answered: every
run sent has a number (increasing per worker), and the worker answers the
numbers in order.

A run in flight that is no longer this worker's to end (taken back for
another worker, cancelled, failed here before it was sent) is "given up":
its number goes in `given_up`, and its answer, when it comes, is dropped.

Every method that reads or changes a worker's flight runs under the
backend's lock.
"""

import collections
import pickle
import queue
import threading
from typing import Optional

from taskrunner import _logging as _logs
from taskrunner._mapped import join_runs
from taskrunner._worker import BLOCK_WORDS, ControlBlock, serve

__all__ = ["InFlight", "Worker", "WorkerSet"]


class InFlight:
    """A batch in flight to one worker: runs numbered first ..
    first+len(runs)-1, of which `answered` (from the start) have been."""

    __slots__ = ("first", "runs", "answered", "by_value")

    def __init__(self, first, runs, by_value):
        self.first = first
        self.runs = runs            # a RunList
        self.answered = 0
        self.by_value = by_value    # pickled by value (cloudpickle): no retry by value


class Worker:
    """One worker process (see the module docstring)."""

    def __init__(self, index, process, tasks, results, block):
        self.index = index
        self.process = process
        self.tasks = tasks                  # our end of the pipe runs go down
        self.results = results              # our end of the pipe answers come up
        self.block = block
        self.outbox = queue.SimpleQueue()   # pickled batches for the sender
        self.functions = set()              # the TaskWire ids it has
        self.next_run = 0                   # the number of the next run sent
        self.in_flight = collections.deque()    # of InFlight, oldest first
        self.count = 0                      # runs in flight, those given up aside
        self.given_up = set()               # runs in flight no longer ours
        self.cancel_if_skipped = set()      # given up if it skips them: cancelled
        self.ready = False                  # it ran the initializer
        self.by_value = False               # its batches go pickled by value
        self.overdue = None                 # receiver.Overdue: killed for a timeout
        self.sender: Optional[threading.Thread] = None

    # -- flight ---------------------------------------------------------------

    def enter_flight(self, runs, by_value=False):
        """Number a batch and count it in flight; returns its first run."""
        first = self.next_run
        self.next_run += len(runs)
        self.in_flight.append(InFlight(first, runs, by_value))
        self.count += len(runs)
        return first

    def take_answered(self, first, count):
        """The runs first .. first+count-1 (a RunList), answered: they leave
        the flight.  The worker answers every run sent, in order: anything
        else is a bug."""
        out = []
        while count:
            batch = self.in_flight[0]
            if batch.first + batch.answered != first:
                raise AssertionError(f"worker {self.index}: answers out of order")
            n = min(count, len(batch.runs) - batch.answered)
            out.append(batch.runs.view(batch.answered, batch.answered + n))
            batch.answered += n
            if batch.answered == len(batch.runs):
                self.in_flight.popleft()
            first += n
            count -= n
        out = join_runs(out)
        self.count -= len(out)
        return out

    def give_up(self, numbers):
        """Runs in flight (their numbers) are no longer ours: the worker
        will answer them (skipped, or a result nobody uses)."""
        fresh = set(numbers) - self.given_up
        self.given_up |= fresh
        self.count -= len(fresh)

    def drop_answers(self, numbers):
        """The answers to `numbers` (a range of one message) came: forget
        those of runs given up, and return them (a set).  take_answered
        counted them out of `count` a second time."""
        dropped = self.given_up.intersection(numbers)
        if dropped:
            self.given_up -= dropped
            self.count += len(dropped)
        return dropped

    def first_of(self, run_ids):
        """The lowest number of a run of `run_ids` (a set of engine ids) in
        flight here and ours, or None."""
        for batch in self.in_flight:
            for position, run_id in enumerate(batch.runs.run_ids()):
                if (position >= batch.answered and run_id in run_ids
                        and batch.first + position not in self.given_up):
                    return batch.first + position
        return None

    def facts_of(self, number):
        """(task name, run id, attempt) of run `number` in flight, or None."""
        for batch in self.in_flight:
            if batch.first <= number < batch.first + len(batch.runs):
                return batch.runs.run_facts(number - batch.first)
        return None

    def stretches(self, first, end):
        """(number, RunList) for each stretch of consecutive runs in flight,
        numbered first .. end-1 and still ours (not given up), the RunList a
        view of its batch's: no per-run work but for the runs given up, so
        that taking back half a batch of 20,000 costs no 20,000 objects.
        In order of their numbers."""
        gaps = sorted(n for n in self.given_up if first <= n < end)
        for batch in self.in_flight:
            lo = max(batch.first + batch.answered, first)
            hi = min(batch.first + len(batch.runs), end)
            for number in gaps:
                if number >= hi:
                    break
                if number >= lo:
                    if number > lo:
                        yield lo, batch.runs.view(lo - batch.first, number - batch.first)
                    lo = number + 1
            if lo < hi:
                yield lo, batch.runs.view(lo - batch.first, hi - batch.first)

    def waiting(self):
        """How many runs of ours wait behind the one it started last."""
        started = self.block.started
        gone = sum(1 for number in self.given_up if number > started)
        return self.next_run - started - 1 - gone

    def take_back(self, first, targets, cancel=True):
        """Stop this worker from run `first` on and take back what surely
        never starts: the runs of `targets` (a set of engine run ids; every
        such run if None, when `cancel`) are to be cancelled, the rest
        requeued.  Runs that may
        have started just now stay in flight; if the worker reports them
        skipped they are requeued, or with `targets` None (cancel_all)
        cancelled.  Returns (to cancel, to requeue), lists of RunLists."""
        cancelled, requeued = [], []
        end = self.next_run
        if first >= end:
            return cancelled, requeued
        old_first, old_end = self.block.stop_window
        if self.block.started < old_end - 1:            # the old window still matters
            first, end = min(first, old_first), max(end, old_end)
        started = self.block.stop(first, end)
        for number, runs in list(self.stretches(first, end)):
            if number <= started:                       # these may have started
                maybe = min(len(runs), started + 1 - number)
                if cancel and targets is None:
                    self.cancel_if_skipped.update(range(number, number + maybe))
                number, runs = number + maybe, runs.view(maybe, len(runs))
            if not len(runs):
                continue
            # The rest surely never start.
            self.give_up(range(number, number + len(runs)))
            if not cancel:
                requeued.append(runs)
            elif targets is None:
                cancelled.append(runs)
            else:
                for is_target, part in split_by(runs, targets):
                    (cancelled if is_target else requeued).append(part)
        return cancelled, requeued

    def run_numbered(self, number):
        """Run `number` in flight and ours, as a RunList, or None."""
        for _, one in self.stretches(number, number + 1):
            return one
        return None

    def timeout_of(self, number):
        """The timeout_seconds of the task of run `number` in flight (0: none)."""
        one = self.run_numbered(number)
        return one.timeout_at(0) if one is not None else 0.0

    def run_facts_of(self, number):
        """(task name, run id, attempt) of run `number` in flight, for logs."""
        one = self.run_numbered(number)
        return one.run_facts(0) if one is not None else ("?", "?", 0)

    def crashed_and_rest(self):
        """After it died: (the run it was running, if any, as a list of
        RunLists; the others of ours in flight), and an empty flight."""
        started, finished = self.block.started, self.block.finished
        crashed, rest = [], []
        for number, runs in self.stretches(0, self.next_run):
            if number <= started < number + len(runs) and started > finished:
                at = started - number
                rest.append(runs.view(0, at))
                crashed.append(runs.view(at, at + 1))
                rest.append(runs.view(at + 1, len(runs)))
            else:
                rest.append(runs)
        rest = [runs for runs in rest if len(runs)]
        self.in_flight.clear()
        self.count = 0
        return crashed, rest

    # -- sending --------------------------------------------------------------

    def send_loop(self):
        """The sender thread: write the queued batches to the worker's pipe."""
        while True:
            data = self.outbox.get()
            if data is None:
                try:
                    self.tasks.send_bytes(_STOP)
                except OSError:
                    pass
                return
            try:
                self.tasks.send_bytes(data)
            except OSError:
                return      # it died; the receiver takes care of its runs


_STOP = pickle.dumps(None)


def split_by(runs, targets):
    """(is a target, RunList) for each stretch of `runs` (a RunList) whose
    runs all are, or all are not, in `targets` (a set of engine run ids)."""
    ids = runs.run_ids()
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (ids[i] in targets) != (ids[start] in targets):
            yield ids[start] in targets, runs.view(start, i)
            start = i


class WorkerSet:
    """The worker processes of one entered runner: spawning (the first at
    once, the others when a second run is submitted), replacing a dead one
    in its place, and stopping them all.  `workers` changes under the
    backend's lock; spawn() may run under it."""

    def __init__(self, context, size, setup, traced=False):
        self.context = context
        self.size = size
        self.setup = setup          # pickled (initializer, initargs)
        self.traced = traced        # workers send when each run started and ended
        self.shared = context.RawArray("q", size * BLOCK_WORDS)
        self.workers = []
        self.unstarted = list(range(1, size))   # started when there is work for them

    def spawn(self, index):
        block = ControlBlock(self.shared, index)
        block.reset()
        task_read, task_write = self.context.Pipe(duplex=False)
        result_read, result_write = self.context.Pipe(duplex=False)
        # The levels as they are now: a worker ships only what this
        # process's loggers would let through.
        process = self.context.Process(
            target=serve,
            args=(task_read, result_write, self.shared, index, self.setup, self.traced,
                  _logs.level_config()),
            name=f"taskrunner-worker-{index}", daemon=True)
        process.start()
        _logs.worker_started(index, process.pid)
        task_read.close()
        result_write.close()
        worker = Worker(index, process, task_write, result_read, block)
        worker.sender = threading.Thread(target=worker.send_loop, daemon=True,
                                         name=f"taskrunner-sender-{index}")
        worker.sender.start()
        return worker

    def start_first(self):
        self.workers.append(self.spawn(0))

    def start_the_rest(self):
        """Start the workers not started yet; False if there were none."""
        if not self.unstarted:
            return False
        indices, self.unstarted = self.unstarted, []
        for index in indices:
            self.workers.append(self.spawn(index))
        return True

    def replace(self, worker):
        """A new worker in a dead one's place."""
        new = self.workers[self.workers.index(worker)] = self.spawn(worker.index)
        _logs.worker_replaced(worker.index, worker.process.pid, new.process.pid)

    def remove(self, worker):
        self.workers.remove(worker)

    def stop(self, workers):
        """Stop `workers`: no worker process outlives this."""
        for worker in workers:
            worker.outbox.put(None)
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
