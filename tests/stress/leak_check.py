"""Leak checks for the stress tests: no thread, child process or file
descriptor may outlive the runners a test made.  (A module, not a
conftest.py: a second conftest here would shadow tests/conftest.py for the
modules that import it by name.)"""

import os
import threading

import psutil

import runner_tasks as rt


class Leaks:
    """What this process has open.  `baseline()` records it (after the test
    has warmed up whatever is started once per interpreter: the
    multiprocessing resource tracker, Dask's own thread pools); `check()`
    waits up to `timeout` seconds for anything newer to go, then fails
    naming what is left."""

    def __init__(self):
        self.threads = self.fds = self.children = None

    @staticmethod
    def _now():
        threads = {t for t in threading.enumerate() if t.is_alive()}
        fds = {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)}
        children = {p.pid for p in psutil.Process().children(recursive=True)}
        return threads, fds, children

    def baseline(self):
        self.threads, self.fds, self.children = self._now()

    def left(self):
        threads, fds, children = self._now()
        return threads - self.threads, fds - self.fds, children - self.children

    def check(self, timeout=30.0):
        assert self.threads is not None, "Leaks.baseline() was never called"
        rt.wait_until(lambda: not any(self.left()), timeout=timeout, interval=0.05)
        threads, fds, children = self.left()
        described = {fd: _fd_target(fd) for fd in fds}
        assert not threads, f"threads left behind: {sorted(t.name for t in threads)}"
        assert not children, f"child processes left behind: {sorted(children)}"
        assert not fds, f"file descriptors left behind: {described}"


def _is_open(fd):
    """False for listdir's own descriptor, closed by the time it is asked."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _fd_target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"
