# Retries of failed attempts: the one place every consumer (the thread
# runner's loop, Outbox.finish for runners elsewhere) asks whether a failed
# attempt runs again, and puts it back.

from libc.stdint cimport int32_t

from taskrunner._calls cimport CallSpec
from taskrunner._engine cimport Engine


cdef object retry_delay(CallSpec spec, void* payload, object exc)
cdef int retry_taken(Engine engine, void* payload, int32_t run, double delay,
                     object exc) except -1
