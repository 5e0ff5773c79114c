"""The feeder side of the process backend: how many runs the workers have
room for, how taken runs are split into batches, and how a batch becomes a
message.

Batches are sized so that one takes about BATCH_SECONDS of a worker's time
(from the task durations the workers report; see Feeder.observe); a worker holds up
to two batches, one running and one waiting, and gets another only when a
whole batch has room: topping it up as each answer comes back would split
the work into many small messages, each costing as much as a large one.

A batch goes as one wire.Batch: the functions the worker has not had, then
its runs as wire.Group records, pickled apart.  Runs whose arguments do not
pickle (an upstream's result that holds a lock, say) fail alone, each
naming its parameter, and go as SKIP groups, so that the worker still
answers every number.  A worker that cannot unpickle a batch by reference
(a class defined under the `__main__` guard) gets it again by value, and
every later batch too.
"""

import logging
import pickle
from typing import NamedTuple

import cloudpickle

from taskrunner._mapped import join_runs
from taskrunner._pickling import dumps, unsendable_call_error
from taskrunner._process.wire import BATCH_SECONDS, MAX_FUNCTIONS, SKIP, Batch, Function, Group
from taskrunner.exceptions import TaskRunnerError
from taskrunner.remote import FAILED

__all__ = ["Feeder", "Placed"]

_log = logging.getLogger("taskrunner.worker")

MAX_BATCH = 20_000          # runs in one batch at most
FIRST_BATCH = 10            # runs in a batch of a task not timed yet
FIRST_GUESS = BATCH_SECONDS / FIRST_BATCH   # seconds a run takes, before any was timed
MIN_SECONDS = 1e-7          # below this a timing is noise
FASTER_STEP = 10            # the most an estimate drops in one answer


class Placed(NamedTuple):
    """A batch placed in a worker's flight: its runs are numbered from `first`."""
    worker: object
    runs: object            # a RunList
    first: int
    by_value: bool


class Feeder:
    """Batching and sending for a ProcessBackend (whose lock guards the
    flights and `seconds_per_run`)."""

    def __init__(self, pool):
        self.pool = pool
        self.seconds_per_run = FIRST_GUESS

    def observe(self, ran, busy):
        """`ran` runs took `busy` seconds of a worker's time (lock held).

        Runs dearer than thought are believed at once: a batch too large
        keeps a worker busy while others could help.  Cheaper ones are
        believed a step of at most FASTER_STEP at a time, so that one quick
        answer (a cached result, say) does not make the next batch huge, yet
        the batch size after a slow task (a warm-up) grows to a cheap
        task's in a few answers, not dozens."""
        seconds = max(busy / ran, MIN_SECONDS)
        self.seconds_per_run = max(seconds, self.seconds_per_run / FASTER_STEP)

    def batch_size(self):
        return max(1, min(MAX_BATCH, int(BATCH_SECONDS / self.seconds_per_run)))

    def room_of(self, worker, size=None):
        """How many runs `worker` may be sent now (see the module docstring)."""
        if not worker.ready:
            return 0
        size = size or self.batch_size()
        room = 2 * size - worker.count
        return room if room >= size else 0

    def free_room(self):
        size = self.batch_size()
        return sum(self.room_of(w, size) for w in self.pool.workers.workers)

    def place(self, runs):
        """Split `runs` (a RunList) among the workers with room, least
        loaded first, evenly, in batches of at most the batch size, and put
        them in flight: a list of Placed.  What does not fit goes back to
        the ready queue.  Lock held."""
        size = self.batch_size()
        open_workers = sorted((w for w in self.pool.workers.workers if self.room_of(w, size)),
                              key=lambda w: w.count)
        placed = []
        start = 0
        for i, worker in enumerate(open_workers):
            left = len(runs) - start
            if left == 0:
                break
            share = min(self.room_of(worker, size), -(-left // (len(open_workers) - i)))
            # Whole batches, the odd remainder first: when it is done the
            # worker still has a whole batch to run while the next is sent.
            end = start + share
            cut = start + share % size if share % size else start + size
            while start < end:
                batch = runs.view(start, cut)
                placed.append(Placed(worker, batch, worker.enter_flight(batch, worker.by_value),
                                     worker.by_value))
                start, cut = cut, cut + size
        if start < len(runs):
            self.pool.outbox.give_back(runs.view(start, len(runs)), False)
        return placed

    def send(self, placed):
        for batch in placed:
            try:
                self.send_batch(batch)
            except Exception as error:     # a bug: fail the batch, never the others
                _log.exception("could not send runs to a worker")
                self.fail_in_flight(batch, error)

    def send_batch(self, batch):
        """Pickle a batch in flight and hand it to its worker's sender."""
        pool, worker = self.pool, batch.worker
        calls = pool.outbox.calls(batch.runs, True)
        functions = {}
        groups = []
        run = batch.first
        forget = len(worker.functions) >= MAX_FUNCTIONS
        known = () if forget else worker.functions
        for spec, args, kwargs, single in calls:
            if spec.timeout and not pool.receiver.watching_deadlines:
                pool.receiver.watch_deadlines()
            wire = pool.runner.wire_of_spec(spec)
            if wire.id not in known:
                functions[wire.id] = Function(wire.id, wire.name, wire.blob, wire.is_async)
            groups.append(Group(wire.id, run, args, kwargs, single, bool(spec.timeout)))
            run += len(args)
        dump = cloudpickle.dumps if batch.by_value else dumps
        try:
            body = dump(groups)
        except Exception:
            body = dump(self._fail_unpicklable(worker, calls, groups, dump))
        worker.outbox.put(pickle.dumps(Batch(list(functions.values()), body, forget),
                                       pickle.HIGHEST_PROTOCOL))
        # Known to the worker only once they are on their way to it.
        with pool.lock:
            if forget:
                worker.functions.clear()
            worker.functions.update(functions)

    def _fail_unpicklable(self, worker, calls, groups, dump):
        """A batch did not pickle (an upstream's result, say): fail the runs
        that do not, each naming its parameter, and return the groups with
        those runs left as SKIP groups."""
        kept, bad = [], {}
        for call, group in zip(calls, groups):
            for i, args in enumerate(group.args):
                kwargs = group.kwargs[i] if group.kwargs else None
                number = group.first + i
                try:
                    dump((args, kwargs))
                except Exception as error:
                    bad[number] = unsendable_call_error(
                        call.spec, (args,) if group.single else args, kwargs, dump,
                        "a worker process", error)
                    kept.append(Group(SKIP, number, [None], None, True))
                else:
                    kept.append(Group(group.function_id, number, [args],
                                      [kwargs] if group.kwargs else None, group.single,
                                      group.timed))
        with self.pool.lock:
            ours = [(number, worker.run_numbered(number)) for number in sorted(bad)]
            ours = [(number, one) for number, one in ours if one is not None]
            worker.give_up(bad)
        if ours:
            self.pool.outbox.finish(join_runs(one for _, one in ours),
                                    [bad[number] for number, _ in ours], FAILED)
        return kept

    def fail_in_flight(self, batch, error):
        """Sending a batch failed (a bug): fail its runs still ours, and have
        the worker answer their numbers as skipped."""
        worker = batch.worker
        numbers = range(batch.first, batch.first + len(batch.runs))
        with self.pool.lock:
            ours = join_runs(runs for _, runs in worker.stretches(numbers.start, numbers.stop))
            worker.give_up(numbers)
        worker.outbox.put(pickle.dumps(
            Batch([], dumps([Group(SKIP, batch.first, range(len(batch.runs)), None, True)])),
            pickle.HIGHEST_PROTOCOL))
        if ours:
            self.pool.outbox.finish(ours, [error] * len(ours), FAILED)

    def resend_by_value(self, worker, text):
        """The worker could not unpickle its next batch (an object of a
        __main__ it cannot import, say): send the runs still ours again,
        pickled by value, or if the batch already went so, fail them with
        the reason."""
        pool = self.pool
        with pool.lock:
            batch = worker.in_flight[0]
            numbers = range(batch.first + batch.answered, batch.first + len(batch.runs))
            answered = worker.take_answered(numbers.start, len(numbers))
            dropped = worker.drop_answers(numbers)
            ours, cancelled = [], []
            for number, i in zip(numbers, range(len(answered))):
                if number in dropped:
                    continue
                one = answered[i:i + 1]
                if number in worker.cancel_if_skipped:
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
        if cancelled:
            pool.outbox.give_back(join_runs(cancelled), True)
        if not len(runs):
            return
        if again:
            self.send_batch(Placed(worker, runs, first, True))
        else:
            error = TaskRunnerError(f"a worker process could not unpickle these runs:\n{text}")
            pool.outbox.finish(runs, [error] * len(runs), FAILED)
