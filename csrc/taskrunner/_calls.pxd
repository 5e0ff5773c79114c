# How a task is called: the callable, its name, and a plan that binds a
# parameters mapping to its signature once per callable, not once per call.

from cpython.object cimport PyObject


cdef class CallSpec:
    cdef readonly object task   # what the user passed: a Task or the callable
    cdef readonly object fn     # what is called
    cdef readonly str name
    cdef readonly bint is_async
    cdef readonly bint may_cycle    # the callable can refer back to futures
    cdef tuple pos_names        # bound by position, in order
    cdef tuple pos_defaults     # a default per positional name, or _MISSING
    cdef tuple kw_names         # keyword-only
    cdef tuple kw_defaults
    cdef object var_pos_name    # the name of *args, or None
    cdef bint var_kw            # takes **kwargs
    cdef bint checked           # False when the signature is unknown
    cdef frozenset declared     # every named parameter

    cdef tuple bind(self, dict params, PyObject** kwargs)


cdef CallSpec spec_of(object task)
cdef dict as_params(object parameters)
