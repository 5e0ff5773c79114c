"""What runners that send runs to other processes share about pickling:
how values are pickled, the checks that reject an unpicklable task or
parameter at the call, and the remote traceback a task's exception brings
back."""

import pickle

import cloudpickle

from taskrunner._engine import is_mappable
from taskrunner._futures import TaskFuture
from taskrunner._params import all_plain
from taskrunner.annotations import allow_failure, quote, unmapped

__all__ = ["PLAIN_TYPES", "dumps", "dumps_checked", "check_picklable", "checked_map_value",
           "unsendable_call_error", "RemoteTraceback", "with_remote_traceback"]

# Values of these types always pickle, and are small: checking, sharing or
# scanning them would only cost time.  (The compiled core's is_plain, in
# _params.pxd, is the same test written as pointer comparisons.)
PLAIN_TYPES = frozenset((int, float, str, bytes, bool, type(None)))


def dumps(value):
    """Pickle by reference where possible (fast), by value where needed
    (lambdas, closures, classes of __main__)."""
    try:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return cloudpickle.dumps(value, pickle.HIGHEST_PROTOCOL)


def dumps_checked(value, what):
    """`value` pickled by value; TypeError naming `what` if it cannot be."""
    try:
        return cloudpickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        raise TypeError(f"{what} cannot be pickled to go to another process: {error}") from error


def check_picklable(value, what):
    """TypeError naming `what` if `value` cannot be pickled once its
    upstream futures are replaced by their results.  Those are the futures
    the engine finds: inside lists, tuples, sets, dict values and
    annotations other than quote(); any other future stays in the value
    and cannot leave this process."""
    if type(value) in PLAIN_TYPES or type(value) is TaskFuture:
        return
    try:
        dumps(value)
    except Exception:
        upstreams = set()
        _find_upstreams(value, upstreams, 0)
        try:
            _FutureStub(_Discard(), upstreams).dump(value)
        except _HiddenFuture as error:
            raise TypeError(f"{what} holds a task future {error}") from None
        except Exception as error:
            raise TypeError(
                f"{what} cannot be pickled to go to another process: {error}") from error


def checked_map_value(name, value):
    """A parameter of map(), checked for pickling before anything is
    scheduled; an iterator is read into a list so that it can be checked
    and then mapped."""
    if isinstance(value, unmapped):
        check_picklable(value.value, f"parameter {name!r}")
        return value
    if (isinstance(value, (allow_failure, quote)) and not isinstance(value.value, TaskFuture)
            and is_mappable(value.value)):
        # Mapped item by item, each item wrapped (see Engine.map).
        return type(value)(checked_map_value(name, value.value))
    if isinstance(value, (range, TaskFuture)) or not is_mappable(value):
        check_picklable(value, f"parameter {name!r}")
        return value
    if not isinstance(value, (list, tuple)):
        value = list(value)
    if type(value) is list and all_plain(value):
        return value
    try:
        dumps(value)
    except Exception:
        for index, item in enumerate(value):
            check_picklable(item, f"item {index} of parameter {name!r}")
    return value


class _Discard:
    def write(self, data):
        return len(data)


_MAX_DEPTH = 1000       # as deep as the engine looks for futures


def _find_upstreams(value, found, depth):
    """Add to `found` the ids of the futures in `value` that the engine
    replaces by their results (the same walk as _params.scan)."""
    if type(value) in PLAIN_TYPES or depth >= _MAX_DEPTH:
        return
    if isinstance(value, TaskFuture):
        found.add(id(value))
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _find_upstreams(item, found, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            _find_upstreams(item, found, depth + 1)
    elif isinstance(value, (allow_failure, unmapped)):
        _find_upstreams(value.value, found, depth + 1)


class _HiddenFuture(Exception):
    """A future where the engine does not replace it by its result."""


class _FutureStub(cloudpickle.CloudPickler):
    """Pickles a value with its upstream futures left out: they are
    replaced by their results before the run is sent."""

    def __init__(self, file, upstreams):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.upstreams = upstreams

    def persistent_id(self, obj):
        if not isinstance(obj, TaskFuture):
            return None
        if id(obj) in self.upstreams:
            return id(obj)
        raise _HiddenFuture(
            f"({obj.task_name!r}) inside quote() or inside an object the runner does not "
            f"look into (it replaces futures by their results only inside lists, tuples, "
            f"sets and dict values): a future cannot go to another process; pass the "
            f"future itself, or its result")


def unpicklable_parameter(spec, args, kwargs, dump):
    """(name, error) of the first parameter of a call (its arguments, with
    upstream results in place) that `dump` cannot pickle; (None, None) if
    each pickles alone."""
    for i, value in enumerate(args):
        try:
            dump(value)
        except Exception as error:
            return spec.name_of_position(i), error
    for name, value in (kwargs or {}).items():
        try:
            dump(value)
        except Exception as error:
            return name, error
    return None, None


def unsendable_call_error(spec, args, kwargs, dump, where, error):
    """The TypeError that fails a run whose call `dump` could not pickle
    (with `error`) to go to `where`, naming the parameter if one is to blame."""
    name, why = unpicklable_parameter(spec, args, kwargs, dump)
    if name is None:
        return TypeError(f"the arguments of task run {spec.name!r} cannot be pickled to go to "
                         f"{where}: {error}")
    return TypeError(f"parameter {name!r} of task run {spec.name!r} cannot be pickled to go "
                     f"to {where} (an upstream's result, say): {why}")


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process, attached
    as that exception's __cause__."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text

    def __str__(self):
        return f'\n"""\n{self.text}"""'


def with_remote_traceback(exc, text):
    """`exc`, with the traceback text it had where it was raised (if any)
    as its __cause__."""
    if text:
        exc.__cause__ = RemoteTraceback(text)
    return exc
