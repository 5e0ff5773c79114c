"""Test helpers shared by the runner test modules (not tasks: those live in
runner_tasks.py, which worker processes import)."""

import contextlib
import sys
import threading

import pytest


@contextlib.contextmanager
def running(runner, exit_timeout=20.0):
    """Enter `runner` like `with`, but if its exit does not return within
    `exit_timeout` (a run lost by a bug would make it wait forever), fail
    the test and abandon the runner rather than hang the session."""
    runner.__enter__()
    exc_info = (None, None, None)
    try:
        yield runner
    except BaseException:
        exc_info = sys.exc_info()
        raise
    finally:
        exiting = threading.Thread(target=runner.__exit__, args=exc_info, daemon=True)
        exiting.start()
        exiting.join(exit_timeout)
        if exiting.is_alive() and exc_info[0] is None:
            pytest.fail(f"the runner's exit did not return within {exit_timeout} s "
                        f"(a run never reached a final state); runner abandoned")


def run_script(source, timeout=120, args=(), env=None):
    """Run `source` (dedented) in a fresh interpreter that imports what this
    one does; for failures that kill or hang the process they happen in.
    Returns the CompletedProcess; raises subprocess.TimeoutExpired after
    `timeout` seconds (the child is killed)."""
    import os
    import subprocess
    import textwrap

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        capture_output=True, text=True, timeout=timeout,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
    )
