# Retries of failed attempts: the one place every consumer (the thread
# runner's loop, Outbox.finish for runners elsewhere) asks whether a failed
# attempt runs again, and puts it back.

from libc.stdint cimport int32_t

from taskrunner._calls cimport CallSpec
from taskrunner._engine cimport Engine


cdef bint retried(Engine engine, CallSpec spec, void* payload, int32_t run,
                  object exc) except -1
