"""Task functions used by the conformance suite.

Everything here is a module-level function or class so that it can be pickled
by reference (worker processes import this module; ``tests/`` is on sys.path
under pytest and spawn passes sys.path on) or by value with cloudpickle (for a
separately started cluster, ``cloudpickle.register_pickle_by_value`` on this
module).  Nothing here closes over threads, events or runner objects:
coordination with the test process goes through files (see ``Gate`` in
conftest.py), which works for threads, processes and local Dask workers alike.
"""

import asyncio
import collections
import enum
import os
import time

GATE_TIMEOUT = 30.0

Pair = collections.namedtuple("Pair", "a b")


class TaskError(Exception):
    """A picklable custom exception raised by tasks."""


def wait_path(path, timeout=GATE_TIMEOUT):
    """Block until ``path`` exists; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} was never opened")
        time.sleep(0.002)


def touch(path):
    with open(path, "a"):
        pass


def append_line(path, text):
    """Append one line to ``path`` atomically enough for threads and processes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (str(text) + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


# ---------------------------------------------------------------- plain tasks


def noop():
    return None


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def add_default(x, y=100):
    return x + y


def kwonly(*, x, y=5):
    return x * y


def with_kwargs(a, **kwargs):
    return {"a": a, **kwargs}


def identity(x):
    return x


def pair(x, y):
    return (x, y)


def make_range(n):
    return list(range(n))


def total(xs):
    return sum(xs)


def concat(x, s):
    return f"{x}:{s}"


def length(x, y):
    return (x, len(y))


def describe(x):
    """What did the task receive?  (type name, str) -- picklable either way."""
    return (type(x).__name__, str(x))


def describe_nested(payload):
    """``payload`` is {"deep": [value]}; describe the value inside."""
    value = payload["deep"][0]
    return (type(payload).__name__, type(payload["deep"]).__name__, describe(value))


def types_of(x):
    """Return the structure of types in a nested value."""
    if isinstance(x, dict):
        return ("dict", {k: types_of(v) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [types_of(v) for v in x])
    if isinstance(x, (set, frozenset)):
        return (type(x).__name__, sorted(repr(v) for v in x))
    return type(x).__name__


def fail(message="boom"):
    raise ValueError(message)


def fail_custom(message):
    raise TaskError(message)


def exit_task():
    raise SystemExit(3)


def fail_if(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


def sleep_reverse(x, n, unit):
    """Later items finish first: item i sleeps (n - i) * unit."""
    time.sleep((n - x) * unit)
    return x * 10


# --------------------------------------------------------- recording / gates


def record(path, x=None):
    """Record that the task ran (and with what); return x."""
    append_line(path, repr(x))
    return x


def record_add(path, x, y):
    append_line(path, f"{x}+{y}")
    return x + y


def gated(value, gate, started=None, log=None, tag=None):
    """Mark started, block until the gate file exists, log, return value."""
    if started is not None:
        touch(started)
    wait_path(gate)
    if log is not None:
        append_line(log, tag if tag is not None else value)
    return value


def gated_fail(gate, message="gated failure"):
    wait_path(gate)
    raise ValueError(message)


def gated_item(x, block_on, gate):
    """Identity, except the item ``block_on`` waits for the gate first."""
    if x == block_on:
        wait_path(gate)
    return x


def log_value(log, tag, value=None):
    append_line(log, tag)
    return value


# ---------------------------------------------------------------- async tasks


async def async_inc(x):
    await asyncio.sleep(0.001)
    return x + 1


async def async_add(x, y):
    await asyncio.sleep(0)
    return x + y


async def async_fail(message):
    await asyncio.sleep(0)
    raise TaskError(message)


async def async_gather(n):
    """Uses the running loop for real concurrency inside one task."""
    async def one(i):
        await asyncio.sleep(0.001)
        return i

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


# ------------------------------------------------------------- callable class


class Multiplier:
    """A callable object without ``__name__``."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return x * self.factor


def node(i, xs, bad=False):
    """A DAG node: fails when ``bad``, else i + sum of its upstream values."""
    if bad:
        raise ValueError(f"node {i} failed")
    return i + sum(xs)


class Colour(enum.IntEnum):
    RED = 1
    BLUE = 2


def value_of_kind(x, kind):
    """A result of the given kind for item x: many of one kind come back
    from a worker process in one message."""
    return {
        "int": lambda: x - 100,
        "big": lambda: 2**70 + x,
        "bool": lambda: x % 2 == 0,
        "float": lambda: x / 4 - 10.0,
        "enum": lambda: Colour.RED if x % 2 else Colour.BLUE,
        "mixed": lambda: x if x % 3 else float(x),
        "last-differs": lambda: x if x < 199 else "end",
    }[kind]()
