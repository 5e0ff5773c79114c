"""Done callbacks of runs that end elsewhere, run on threads of their own.

A runner whose runs execute in other processes ends them on one thread (the
process runner's receiver, the Dask runner's watcher).  A done callback run
there that blocks (on another run of the same runner, say) would stop every
later result from arriving.  So the engine of such a runner queues each
future's callbacks here instead:

    receiver ──put(future, callbacks)──> queue ──> callback thread(s)

One thread runs the queue in order.  When a callback blocks on a future (or
inside `blocking()`), its thread tells this pool through the consumer hooks
(see _futures.consumer_hooks), and if callbacks are waiting and no other
thread is free to run them, another thread starts: so a queued callback
never waits behind a blocked one.  A thread with nothing to do exits unless
it is the last free one.

The engine counts each queued future as being settled until its callbacks
have run (`done()` below, Engine.callbacks_done), so the runner's exit
waits for them, and a callback may still submit while the exit waits.
"""

import collections
import threading

from taskrunner._futures import consumer_hooks

__all__ = ["CallbackPool"]


class CallbackPool:
    """Threads that run queued done callbacks for one engine.

    State, under `lock`:
    - queue: (future, callbacks) waiting, in the order their runs ended;
    - free: threads not blocked in a callback (running one, or idle);
    - idle: threads waiting for the queue;
    - stopped: no more callbacks come; idle threads exit.
    """

    def __init__(self, run_one, done, name):
        self._run_one = run_one     # run_one(future, callbacks): run them
        self._done = done           # done(): one queued future's callbacks have run
        self._name = name
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue = collections.deque()
        self._free = 0
        self._idle = 0
        self._stopped = False

    def put(self, future, callbacks):
        with self._lock:
            self._queue.append((future, callbacks))
            if self._idle:
                self._wake.notify()
            elif self._free == 0:
                self._start_locked()

    def stop(self):
        """No more callbacks will come: the threads exit when idle (one
        blocked forever in a user's callback is left to its daemon fate)."""
        with self._lock:
            self._stopped = True
            self._wake.notify_all()

    # The hooks a callback thread's waits call (see consumer_hooks).

    def blocking(self):
        with self._lock:
            self._free -= 1
            if self._queue and self._free == 0 and not self._stopped:
                self._start_locked()

    def resumed(self):
        with self._lock:
            self._free += 1

    def _start_locked(self):
        self._free += 1
        thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        try:
            thread.start()
        except BaseException:
            self._free -= 1
            raise

    def _serve(self):
        with consumer_hooks(self):
            while True:
                with self._lock:
                    while not self._queue:
                        # A surplus thread (one started while another was
                        # blocked, which has since resumed) goes.
                        if self._stopped or self._free > 1:
                            self._free -= 1
                            return
                        self._idle += 1
                        self._wake.wait()
                        self._idle -= 1
                    future, callbacks = self._queue.popleft()
                try:
                    self._run_one(future, callbacks)
                finally:
                    self._done()
