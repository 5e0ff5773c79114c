"""A real Dask cluster for the tests: `dask scheduler` and `dask worker`
processes on 127.0.0.1, on free ports, started and stopped here.

The processes import this checkout's ``taskrunner`` and the test modules
(``PYTHONPATH``), so tasks defined in tests pickle by reference.  The
scheduler allows one worker death per task (``allowed-failures`` 1): a task
is run again once after its worker dies, and ends with KilledWorker the
second time.  Each process dies with the test process (``PR_SET_PDEATHSIG``
on Linux), so a crashed test session leaves nothing behind.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
START_TIMEOUT = 60.0


def _die_with_parent():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except OSError:
        pass


class DaskCluster:
    """A scheduler and one worker process per entry of `threads` (its
    thread count), each `dask worker` with its nanny."""

    def __init__(self, threads=(2, 2)):
        self.threads = tuple(threads)
        self.address = None
        self.scheduler = None
        self.workers = []
        self._dir = None

    @property
    def nthreads(self):
        return sum(self.threads)

    def _env(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT, TESTS] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "1"
        return env

    def _spawn(self, *args):
        log = open(os.path.join(self._dir.name, f"{args[0]}-{len(self.workers)}.log"), "wb")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "dask", *args], env=self._env(), cwd=self._dir.name,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()

    def start(self):
        self._dir = tempfile.TemporaryDirectory(prefix="taskrunner-dask-")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self):
        scheduler_file = os.path.join(self._dir.name, "scheduler.json")
        self.scheduler = self._spawn(
            "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
            "--dashboard-address", "127.0.0.1:0", "--scheduler-file", scheduler_file)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(scheduler_file):
            self._check_alive(self.scheduler, "scheduler")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dask scheduler did not start:\n{self.logs()}")
            time.sleep(0.05)
        time.sleep(0.05)        # the file is written in one go, but be sure
        with open(scheduler_file) as f:
            self.address = json.load(f)["address"]
        for i, n in enumerate(self.threads):
            self.workers.append(self._spawn(
                "worker", self.address, "--host", "127.0.0.1", "--nthreads", str(n),
                "--no-dashboard", "--name", f"w{i}", "--death-timeout", "60"))
        self.wait_for_workers(deadline)

    def wait_for_workers(self, deadline=None):
        """Block until every worker is connected, with its threads."""
        from distributed import Client

        deadline = deadline or time.monotonic() + START_TIMEOUT
        with Client(self.address, set_as_default=False, timeout=START_TIMEOUT) as client:
            while not self._complete(client):
                for process in [self.scheduler, *self.workers]:
                    self._check_alive(process, "process")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the dask workers did not connect:\n{self.logs()}")
                time.sleep(0.05)

    def _complete(self, client):
        """Every worker is registered with its threads and answers (a
        killed one may still be registered for a moment)."""
        if sorted(client.nthreads().values()) != sorted(self.threads):
            return False
        answers = client.run(os.getpid, on_error="return")
        return len(answers) == len(self.threads) and all(
            isinstance(pid, int) for pid in answers.values())

    def worker_pids(self, client):
        """{worker address: pid} of the worker processes (not the nannies)."""
        return client.run(os.getpid)

    def _check_alive(self, process, what):
        if process.poll() is not None:
            raise RuntimeError(f"the dask {what} exited with {process.returncode}:\n{self.logs()}")

    def logs(self):
        if self._dir is None:
            return ""
        out = []
        for name in sorted(os.listdir(self._dir.name)):
            if name.endswith(".log"):
                with open(os.path.join(self._dir.name, name), errors="replace") as f:
                    out.append(f"--- {name}\n{f.read()[-4000:]}")
        return "\n".join(out)

    def process_ids(self):
        """Every process of the cluster now: the ones started here and their
        children (the workers under their nannies)."""
        import psutil

        pids = set()
        for process in [self.scheduler, *self.workers]:
            if process is None:
                continue
            pids.add(process.pid)
            try:
                pids.update(p.pid for p in psutil.Process(process.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return pids

    def stop(self):
        """Stop every process (each runs in its own process group), the
        workers first; SIGKILL what is still there after a grace period,
        and wait until every process of the cluster has gone."""
        processes = [p for p in [*self.workers, self.scheduler] if p is not None]
        every = self.process_ids()
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)      # and any child left
            process.wait()
        _wait_gone(every, time.monotonic() + 10)
        self.workers = []
        self.scheduler = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _running(pid):
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids, deadline):
    """Wait for `pids` to exit (a grandchild may outlive its killed parent
    for a moment), killing any still there at the deadline."""
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        if _running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _signal_group(process, sig):
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def layout(max_workers):
    """The worker threads of a cluster on which `max_workers` tasks run at
    once: two workers, but a single one for one thread."""
    if max_workers is None:
        max_workers = 4
    if max_workers == 1:
        return (1,)
    return ((max_workers + 1) // 2, max_workers // 2)


class ClusterPool:
    """Clusters shared by a test session, one per thread layout, started on
    first use and stopped together."""

    def __init__(self):
        self.clusters = {}

    def get(self, max_workers=None):
        threads = layout(max_workers)
        cluster = self.clusters.get(threads)
        if cluster is None:
            cluster = self.clusters[threads] = DaskCluster(threads).start()
        return cluster

    def stop_all(self):
        clusters, self.clusters = list(self.clusters.values()), {}
        for cluster in clusters:
            cluster.stop()
