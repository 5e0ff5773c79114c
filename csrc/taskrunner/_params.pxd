# Finding the futures inside parameter values, and replacing them by their
# results when the run starts.

from cpython.object cimport PyObject
from libc.stdlib cimport free

from taskrunner._futures cimport EngineBase, TaskFuture


# The upstream futures of a run as found at submit, in C memory.  The
# pointers are borrowed: each future is held by the arguments (or the
# wait_for sequence) it was found in, which live until the run is added.
ctypedef struct Upstream:
    PyObject* future
    bint allow

ctypedef struct Upstreams:
    Upstream* items
    Py_ssize_t len
    Py_ssize_t cap
    Upstream local[4]       # most runs have few upstreams: no allocation

cdef inline void upstreams_init(Upstreams* ups) noexcept:
    ups.items = ups.local
    ups.len = 0
    ups.cap = 4


cdef inline void upstreams_free(Upstreams* ups) noexcept:
    if ups.items != ups.local:
        free(ups.items)
    upstreams_init(ups)


cdef inline bint is_plain(object value):
    # The common case, ruled out with a few pointer comparisons: the
    # types of taskrunner._pickling.PLAIN_TYPES.
    cdef type t = type(value)
    return t is int or t is str or t is float or value is None or t is bool or t is bytes


cdef int scan(object value, Upstreams* ups, bint allow, int depth) except -1
cdef int scan_call(TaskFuture fut, Upstreams* ups) except -1
cdef list wait_for_upstreams(object wait_for, Upstreams* ups)
cdef dict checked_dependencies(object dependencies)
cdef int find_kept_elsewhere(object value, EngineBase consumer, dict found,
                             int depth) except -1
cdef int prefetch_found(dict found) except -1
cdef object resolve(object value, bint allow, int depth, EngineBase consumer)
cdef tuple resolve_args(tuple args, EngineBase consumer)
