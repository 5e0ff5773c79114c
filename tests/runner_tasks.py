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
import ctypes
import enum
import logging
import os
import signal
import threading
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


def wait_until(predicate, timeout=10.0, interval=0.005):
    """Poll ``predicate`` until it is true (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


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


def logged_then_gated(x, log, gate):
    """Log x in ``log``, then wait for the gate; return x."""
    append_line(log, x)
    wait_path(gate)
    return x


def fail_if_multiple(x, of):
    """x, or ValueError naming x if x is a multiple of ``of``."""
    if x % of == 0:
        raise ValueError(f"item {x} is a multiple of {of}")
    return x


def waits_for_the_next_item(x):
    """Item 0 waits for item 1's result, found through OWN_RUNNER (a Dask
    cluster whose workers are threads here); every item returns x."""
    if x == 0:
        wait_until(lambda: "futures" in OWN_RUNNER, timeout=GATE_TIMEOUT)
        return OWN_RUNNER["futures"][1].result(timeout=GATE_TIMEOUT) - 1
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


# =================================================================
# ProcessPoolTaskRunner tests (tests/test_process_runner.py) -- issue 3.
# Module-level so that spawned workers can import them by reference.
# =================================================================



def write_pid(path):
    """Publish this process's pid in ``path`` whole (write, then rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def read_pid(path):
    with open(path) as f:
        return int(f.read())


def getpid():
    return os.getpid()


def rendezvous(me, others, timeout=15.0):
    """Mark ``me`` started, then wait until every path in ``others`` exists.

    n such runs complete only if n of them run at the same time, so this
    proves n workers serve at once.  Returns (pid, parent pid, INIT_STATE)
    of the worker."""
    touch(me)
    for path in others:
        wait_path(path, timeout)
    return (os.getpid(), os.getppid(), INIT_STATE)


def die(how, never=None):
    """End this process the way ``how`` says, without cleanup."""
    if how == "exit":
        os._exit(3)
    elif how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    elif how == "external":
        wait_path(never)     # the test kills this process from outside
    time.sleep(30)           # a signal may take a moment to land
    raise AssertionError(f"still alive after {how!r}")


def crash_on(x, bad, how, pidfile):
    """x * 10, except item ``bad``: publish the pid, then die by ``how``."""
    if x == bad:
        write_pid(pidfile)
        die(how, never=pidfile + ".never")
    return x * 10


class CountingPickles:
    """A callable that appends a line to ``path`` each time it is pickled
    (pickling happens in the process that sends it: the test process)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, x):
        return x * 2

    def __reduce__(self):
        append_line(self.path, "pickled")
        return (CountingPickles, (self.path,))


class LockHoldingError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class TwoArgumentError(Exception):
    """Pickles, but cannot be unpickled: the default reduce passes only the
    message back to __init__, which needs two arguments."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class LockHolder:
    """A result that cannot be pickled."""

    def __init__(self):
        self.lock = threading.Lock()


def _refuse_to_unpickle():
    raise RuntimeError("this object refuses to be unpickled")


class UnloadableResult:
    """Pickles fine, fails when unpickled."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ())


UNPICKLABLE_KINDS = {
    # kind: (what the run produces, the type name an error must name)
    "result-holding-a-lock": "LockHolder",
    "result-failing-to-unpickle": "UnloadableResult",
    "exception-holding-a-lock": "LockHoldingError",
    "exception-failing-to-unpickle": "TwoArgumentError",
}


def produce_unpicklable(kind):
    """Return or raise something that cannot make the trip back whole."""
    if kind == "result-holding-a-lock":
        return LockHolder()
    if kind == "result-failing-to-unpickle":
        return UnloadableResult()
    if kind == "exception-holding-a-lock":
        raise LockHoldingError("holds a lock")
    if kind == "exception-failing-to-unpickle":
        raise TwoArgumentError("needs two arguments", 7)
    raise ValueError(kind)


def unpicklable_on(x, bad, kind):
    """x, except item ``bad``: see produce_unpicklable."""
    if x == bad:
        return produce_unpicklable(kind)
    return x


def store(path, payload, x=None):
    """Record that the run happened; the long parameter name is the one
    errors must name."""
    append_line(path, repr(payload))
    return payload


# -- worker initializer and module state -------------------------------------

INIT_STATE = None     # set by init_worker in a worker
PARENT_MARK = None    # set at run time in the test process (fork inherits it)


def init_worker(path, value):
    """Initializer: log this worker's pid, set state tasks can read."""
    global INIT_STATE
    append_line(path, os.getpid())
    INIT_STATE = value


def failing_init(message):
    raise RuntimeError(message)


def read_init_state(x=None):
    return (os.getpid(), INIT_STATE)


def process_facts():
    """(pid, parent pid, PARENT_MARK) as seen by the worker."""
    return (os.getpid(), os.getppid(), PARENT_MARK)


def gated_pid(gate, started):
    """Log this worker's pid in ``started``, wait on the gate, return the pid."""
    append_line(started, os.getpid())
    wait_path(gate)
    return os.getpid()


def first_waits(x, gate, started, log):
    """Item 0 marks ``started`` and waits on the gate; every item then logs
    itself in ``log`` and returns x."""
    if x == 0:
        touch(started)
        wait_path(gate)
    append_line(log, x)
    return x


# ============================================================
# Lazy maps (tests/test_mapped.py).
# ============================================================

MAPPED_ERRORS = {"value": ValueError, "key": KeyError, "task": TaskError}


def raise_for(x, kinds):
    """x * 10, except an x in ``kinds`` (a dict: x -> "value", "key" or
    "task") raises that kind of exception, naming the item."""
    if x in kinds:
        raise MAPPED_ERRORS[kinds[x]](f"item {x}")
    return x * 10


def first_waits_then_raise_for(x, kinds, gate, started):
    """raise_for(x, kinds), except that item 0 first marks ``started`` and
    waits for the gate."""
    if x == 0:
        touch(started)
        wait_path(gate)
    return raise_for(x, kinds)


def show(x):
    """What a task received, as something every runner can send back: the
    value, or for an exception its type name and message."""
    if isinstance(x, BaseException):
        return ("error", type(x).__name__, str(x))
    return ("value", x)


def type_name(x):
    return type(x).__name__


# The runner a task submits to when it runs in this very process (a Dask
# cluster whose workers are threads here): set by the test.
OWN_RUNNER = {}


def submit_to_own_runner_and_wait(x):
    runner = OWN_RUNNER["runner"]
    return runner.submit(inc, {"x": x}).result(timeout=60) * 10


def lock_if_bad(x, bad):
    """A result that cannot be pickled (a lock) for the items in `bad`."""
    return threading.Lock() if x in bad else x


class SlowToUnpickle:
    """A small value that takes `seconds` to unpickle."""

    def __init__(self, value, seconds):
        self.value = value
        self.seconds = seconds

    def __reduce__(self):
        return _load_slowly, (self.value, self.seconds)


def _load_slowly(value, seconds):
    time.sleep(seconds)
    return SlowToUnpickle.__new__(SlowToUnpickle)._init(value, seconds)


def _init_slow(self, value, seconds):
    self.value = value
    self.seconds = seconds
    return self


SlowToUnpickle._init = _init_slow


def value_attr(x):
    return x.value


def size_of(b, i=None):
    return len(b)


def unloadable_if(x, bad):
    """x, except item ``bad``: a result that pickles but cannot be unpickled."""
    return UnloadableResult() if x == bad else x


def big_bytes(n):
    return b"b" * n


def late_after(tickets, count, gate):
    """Initializer: the first `count` workers to start go on; each later
    one waits for the gate first (a worker that comes up late).  Tickets
    are files made with O_EXCL in the directory `tickets`."""
    number = 0
    while True:
        try:
            os.close(os.open(os.path.join(tickets, str(number)), os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            number += 1
    if number >= count:
        wait_path(gate, timeout=120)


def first_then_gated(x, log, gate):
    """Item 0 returns at once; any other logs itself, then waits for the gate."""
    if x == 0:
        return 0
    append_line(log, x)
    wait_path(gate)
    return x


def square(x):
    return x * x


def record_unless(path, x, bad):
    """Log x and return it; item ``bad`` raises TaskError naming it."""
    if x == bad:
        raise TaskError(f"item {x} is bad")
    append_line(path, x)
    return x


def getpid_of(x):
    return os.getpid()


def fail_at_then_gated(x, bad, log, gate):
    """x for the items before ``bad``; item ``bad`` raises TaskError naming
    it; a later item logs itself, then waits for the gate."""
    if x < bad:
        return x
    if x == bad:
        raise TaskError(f"item {x} is bad")
    append_line(log, x)
    wait_path(gate)
    return x


def gated_then_fail_at(x, gates, bad):
    """Wait for the gate file ``gates[x]`` (if it has one), then return x;
    item ``bad`` raises TaskError naming it instead."""
    if gates.get(x) is not None:
        wait_path(gates[x])
    if x == bad:
        raise TaskError(f"item {x} is bad")
    return x


def tick(x, log, seconds):
    """Log ``x`` (the run started), sleep ``seconds``, return ``x``."""
    append_line(log, x)
    time.sleep(seconds)
    return x


def started_then_gated(x, log, gate, timeout=GATE_TIMEOUT):
    """Log ``x`` (the run started), block until the gate opens, return ``x``."""
    append_line(log, x)
    wait_path(gate, timeout)
    return x


def count_call(path, x=None):
    """Log one line per call (a counter of calls across processes); return ``x``."""
    append_line(path, x)
    return x


def slow_square(x, seconds):
    time.sleep(seconds)
    return x * x


def stamped(i, size):
    """``size`` bytes that say which item made them (checked whole)."""
    return i.to_bytes(4, "little") * (size // 4)


def big_result_after_pid(pidfile, size):
    """Publish this worker's pid and bytes written so far (/proc/self/io
    wchar), then return ``size`` bytes: the test kills the worker while
    they are being written to the result pipe."""
    with open("/proc/self/io") as f:
        wchar = next(int(line.split()[1]) for line in f if line.startswith("wchar"))
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {wchar}")
    os.rename(tmp, pidfile)
    return b"x" * size


def logged_node(i, xs, log):
    """A DAG node (``node``) that logs ``i`` as it runs."""
    append_line(log, i)
    return i + sum(xs)


def square_marking_pid(x, marks, seconds):
    """x * x after ``seconds``; the first run on each worker process
    leaves a file named after its pid in ``marks`` (it serves runs)."""
    mark = os.path.join(marks, str(os.getpid()))
    if not os.path.exists(mark):
        touch(mark)
    time.sleep(seconds)
    return x * x


# -- logging (test_logging.py) -----------------------------------------------


def log_then(x, name, level, message):
    """Log ``message % x`` on logger ``name`` at ``level``; return x."""
    logging.getLogger(name).log(level, message, x)
    return x


def log_awkward(x, name):
    """Records that do not pickle as they are: an unpicklable argument and
    extra field, and a caught exception's traceback."""
    logger = logging.getLogger(name)
    lock = threading.Lock()
    logger.warning("item %s holds %s", x, lock, extra={"thing": lock})
    try:
        raise KeyError(x)
    except KeyError:
        logger.exception("caught item %s", x)
    return x


# -- task options (retries, timeouts) -----------------------------------------


def attempts_made(path):
    """How many attempts a task recorded in `path` (one line each)."""
    return len(read_lines(path)) if os.path.exists(path) else 0


def fail_until(path, succeed_on, value, exc_type=TaskError):
    """Record an attempt (its start time) in `path`; raise `exc_type` until
    attempt `succeed_on`, which returns `value`."""
    append_line(path, repr(time.monotonic()))
    made = attempts_made(path)
    if made < succeed_on:
        raise exc_type(f"attempt {made} of {path}")
    return value


def item_fails_until(x, directory, succeed_on):
    """fail_until() for mapped item `x`, with a file per item in `directory`."""
    return fail_until(os.path.join(directory, f"item-{x}"), succeed_on, x * 10)


def crash_until(path, succeed_on, value):
    """Record an attempt in `path`; kill this worker process until attempt
    `succeed_on`, which returns `value`."""
    append_line(path, repr(time.monotonic()))
    if attempts_made(path) < succeed_on:
        os._exit(17)
    return value


def raise_by_attempt(path, kinds):
    """Record an attempt; raise the exception class kinds[attempt - 1]."""
    append_line(path, repr(time.monotonic()))
    raise kinds[attempts_made(path) - 1]("attempt %d" % attempts_made(path))


def is_value_error(exc):
    return isinstance(exc, ValueError)


def hang_until(path, succeed_on, value, gate):
    """Record an attempt in `path`; until attempt `succeed_on`, block until
    `gate` opens (past any timeout); that attempt returns `value`."""
    append_line(path, repr(time.monotonic()))
    if attempts_made(path) < succeed_on:
        wait_path(gate)
    return value


def hang_noting_the_end(gate, note):
    """Block until `gate` opens; note in `note` how the call ended."""
    try:
        wait_path(gate)
    except BaseException as exc:
        append_line(note, f"interrupted {type(exc).__name__}")
        raise
    append_line(note, "returned")


async def async_hang_noting_cancel(note):
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        append_line(note, "cancelled")
        raise


def hang_if(x, bad, gate, pidfile):
    """Item `bad` writes its worker's pid to `pidfile` and blocks on `gate`."""
    if x == bad:
        write_pid(pidfile)
        wait_path(gate)
    return x * 2


def note_running(path, x, seconds=0.05):
    """Append "<monotonic> start|end <x>" lines around a short sleep: the
    intervals in which runs ran, comparable across processes."""
    append_line(path, f"{time.monotonic()!r} start {x}")
    time.sleep(seconds)
    append_line(path, f"{time.monotonic()!r} end {x}")
    return x


def most_at_once(path):
    """The largest number of note_running() intervals in `path` that overlap."""
    events = sorted((float(t), kind == "start") for t, kind, _ in
                    (line.split() for line in read_lines(path)))
    at_once = most = 0
    for _, starts in events:
        at_once += 1 if starts else -1
        most = max(most, at_once)
    return most


def meet(x, folder, count):
    """x, once ``count`` workers (threads or processes) have each run a
    meet in ``folder``: so that that many workers surely run tasks."""
    touch(os.path.join(folder, f"{os.getpid()}-{threading.get_ident()}"))
    if not wait_until(lambda: len(os.listdir(folder)) >= count, timeout=GATE_TIMEOUT):
        raise TimeoutError(f"only {len(os.listdir(folder))} of {count} workers met")
    return x


def hold_dask_starts(gate, entered):
    """On a Dask worker (through Client.run): each of taskrunner's Dask
    tasks there, a run alone or a pack, writes `entered` and waits for
    `gate` before its first look at the recall marks, as a thread slow to
    start would.  Its Dask task is executing meanwhile."""
    from taskrunner._dask import worker

    run, claim = worker.run, worker._Pack.claim

    def slow_run(*args, **kwargs):
        append_line(entered, "run")
        wait_path(gate)
        return run(*args, **kwargs)

    def slow_claim(pack):
        if pack.next == 0:
            append_line(entered, "pack")
            wait_path(gate)
        return claim(pack)

    worker.run = slow_run
    worker._Pack.claim = slow_claim
