# Finding the futures inside parameter values, and replacing them by their
# results when the run starts.

from taskrunner._futures cimport TaskFuture


cdef inline bint is_plain(object value):
    # The common case, ruled out with a few pointer comparisons.
    cdef type t = type(value)
    return t is int or t is str or t is float or value is None or t is bool or t is bytes


cdef int scan(object value, list ups, bint allow, int depth) except -1
cdef list scan_call(TaskFuture fut)
cdef list wait_for_upstreams(object wait_for, list ups)
cdef dict checked_dependencies(object dependencies)
cdef object resolve(object value, bint allow, int depth)
cdef tuple resolve_args(tuple args)
