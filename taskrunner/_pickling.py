"""What runners that send runs to other processes share about pickling:
how values are pickled, the checks that reject an unpicklable task or
parameter at the call, and the remote traceback a task's exception brings
back."""

import pickle

import cloudpickle

from taskrunner._futures import TaskFuture
from taskrunner.annotations import unmapped

__all__ = ["dumps", "dumps_checked", "check_picklable", "checked_map_value",
           "RemoteTraceback", "with_remote_traceback"]

# Values of these types always pickle: checking them would only cost time.
_PLAIN = frozenset((int, float, str, bytes, bool, type(None)))


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
    """TypeError naming `what` if `value` (futures aside) cannot be pickled."""
    if type(value) in _PLAIN or type(value) is TaskFuture:
        return
    try:
        dumps(value)
    except Exception:
        try:
            _FutureStub(_Discard(), pickle.HIGHEST_PROTOCOL).dump(value)
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
    if isinstance(value, (str, bytes, range, TaskFuture)) or not hasattr(value, "__iter__"):
        check_picklable(value, f"parameter {name!r}")
        return value
    if not isinstance(value, (list, tuple)):
        value = list(value)
    try:
        dumps(value)
    except Exception:
        for index, item in enumerate(value):
            check_picklable(item, f"item {index} of parameter {name!r}")
    return value


class _Discard:
    def write(self, data):
        return len(data)


class _FutureStub(cloudpickle.CloudPickler):
    """Pickles a value with its futures left out: they are replaced by their
    results before the run is sent."""

    def persistent_id(self, obj):
        return id(obj) if isinstance(obj, TaskFuture) else None


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
