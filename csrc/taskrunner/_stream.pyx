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
  read and the runs not started are cancelled.
"""

cimport cython

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
            except BaseException:
                self.fetching = False
                self._stop()
                raise
            self.fetching = False
            if batch is None:
                self._stop()
                raise StopIteration
            self.values, failed = batch
            self.pos = 0
            self.failed = set(failed) if failed else None

    cdef object _failure(self, error):
        if self.raise_on_failure:
            self._stop()
            raise error
        return error

    cdef int _stop(self) except -1:
        stream, self.stream = self.stream, None
        self.values = []
        if stream is not None:
            stream.cancel_rest()
        return 0

    def end(self, str reason):
        """Make the next step raise CancelledRun, saying `reason`."""
        if self.ended is None:
            self.ended = CancelledRun(f"imap of task {self.task_name!r} ended: {reason}")

    def close(self):
        """Stop: read no more input, cancel the runs not started."""
        self._stop()

    def __del__(self):
        self._stop()
