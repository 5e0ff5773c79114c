# cython: language_level=3
"""The iterator imap() returns: the results of a Stream, one step at a time.

A Stream (taskrunner/streaming.py) reads the input, submits it in chunks
and hands back batches of results; this iterator gives them out one by one
in C, so that a step costs a few dozen instructions, not a Python frame.

Lifecycle:
- each step first checks `ended` (set by end(), from the runner's exit or
  cancel_all(), from any thread): if set, the stream stops and the step
  raises it, whatever results are still at hand;
- a batch used up, the next comes from stream.next_batch(), which refills
  the window and waits; None there means the stream is done;
- a failed item raises its exception (raise_on_failure) or is the value;
- stopping, however it comes (done, an error, close(), the iterator
  garbage-collected), calls stream.cancel_rest() once: no more input is
  read and the runs not started are cancelled (for a Ctrl-C, those sent on
  elsewhere are taken back in the background: the Ctrl-C reaches the user
  at once); and closes the progress bar, if there is one;
- a KeyboardInterrupt that comes while the iterator is being collected
  (its __del__, where an exception is only printed) is raised again, as a
  new SIGINT, where the main thread goes on.

A progress bar (imap(progress=...)) reads _taken() from a thread of its
own: the results given out, counted a batch at a time plus the position in
the batch at hand, so a step costs no more with a bar than without.
"""

cimport cython

import _thread

from taskrunner.exceptions import CancelledRun


@cython.final
cdef class Results:
    cdef object stream          # the Stream; None once stopped
    cdef list values            # the batch at hand
    cdef Py_ssize_t pos         # the next of `values` to give
    cdef object failed          # positions in `values` of failed items, or None
    cdef bint raise_on_failure
    cdef bint fetching          # a step is in stream.next_batch()
    cdef object ended           # a CancelledRun once end() was called
    cdef str task_name
    cdef object progress        # its ProgressBar, or None
    cdef Py_ssize_t given_before    # results given out of the batches before this one
    cdef Py_ssize_t failed_before   # of those, the failed ones
    cdef object __weakref__     # the runner keeps its iterators in a WeakSet

    def __cinit__(self, stream, bint raise_on_failure, str task_name):
        self.stream = stream
        self.task_name = task_name
        self.values = []
        self.raise_on_failure = raise_on_failure

    def __iter__(self):
        return self

    def __next__(self):
        cdef object value, batch
        while True:
            if self.ended is not None:
                self._stop()
                raise self.ended
            if self.pos < len(self.values):
                value = self.values[self.pos]
                self.pos += 1
                if self.failed is not None and (self.pos - 1) in self.failed:
                    return self._failure(value)
                return value
            if self.stream is None:
                raise StopIteration
            if self.fetching:
                # Another thread is waiting for the next batch (as for a
                # generator that is already executing).
                raise ValueError("this imap iterator is already being advanced in another thread")
            self.fetching = True
            try:
                batch = self.stream.next_batch()
            except BaseException as error:
                self.fetching = False
                self._stop(not isinstance(error, KeyboardInterrupt))
                raise
            self.fetching = False
            if batch is None:
                self._stop()
                raise StopIteration
            # The batch before was used up.
            self.given_before += self.pos
            self.failed_before += len(self.failed) if self.failed is not None else 0
            self.values, failed = batch
            self.pos = 0
            self.failed = set(failed) if failed else None

    cdef object _failure(self, error):
        if self.raise_on_failure:
            self._stop()
            raise error
        return error

    cdef int _stop(self, bint wait=True) except -1:
        given, failed = self._taken()
        self.given_before, self.failed_before = given, failed
        self.pos = 0
        self.failed = None
        stream, self.stream = self.stream, None
        self.values = []
        try:
            if stream is not None:
                stream.cancel_rest(wait)
        finally:
            bar, self.progress = self.progress, None
            if bar is not None:
                bar.close((given, failed))
        return 0

    def _taken(self):
        """(given, failed): how many results this iterator gave out, and
        how many of those were failures (raised or given)."""
        cdef Py_ssize_t failed = self.failed_before
        if self.failed is not None:
            for at in self.failed:
                failed += <Py_ssize_t>at < self.pos
        return self.given_before + self.pos, failed

    def _show_progress(self, bar):
        """Close `bar` (a ProgressBar reading _taken()) when this stops."""
        self.progress = bar

    def end(self, str reason):
        """Make the next step raise CancelledRun, saying `reason`."""
        if self.ended is None:
            self.ended = CancelledRun(f"imap of task {self.task_name!r} ended: {reason}")

    def close(self):
        """Stop: read no more input, cancel the runs not started."""
        self._stop()

    def __del__(self):
        try:
            self._stop()
        except KeyboardInterrupt:
            # This frame is C: the signal is handled at the next Python
            # line the main thread runs, outside this finalizer.
            _thread.interrupt_main()
