"""Regressions: wrong results, crashes and hangs found by trying the
runners as a new user would (issue 13), one section per point.

Each test failed on the code before its fix.  A failure that kills or hangs
the interpreter is run in a child process (harness.run_script) with a
timeout, so that it fails the test instead of the session.
"""

import pytest

from harness import run_script

pytestmark = pytest.mark.timeout(180)


# -- 2. a long NotReady chain -------------------------------------------------

NOT_READY_CHAIN = """
    import sys
    from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner, UpstreamTaskError

    def boom():
        raise ValueError("first")

    def inc(x):
        return x + 1

    if __name__ == "__main__":
        kind, n, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        runner = ThreadPoolTaskRunner(2) if kind == "thread" else ProcessPoolTaskRunner(2)
        with runner:
            last = runner.submit(boom)
            for _ in range(n):
                before, last = last, runner.submit(inc, {"x": last})
            last.wait(60)
            if how == "read":
                assert last.state.name == "NotReady", last.state
                assert str(before.task_run_id) in last.state.message
                assert repr(last) == "<TaskFuture inc NotReady>", repr(last)
                error = last.exception()
                assert isinstance(error, UpstreamTaskError)
                assert error.upstream is before
                assert str(before.task_run_id) in str(error)
                try:
                    last.result()
                except UpstreamTaskError as raised:
                    assert raised is error
                else:
                    raise AssertionError("result() did not raise")
            del before, last
        print("survived")
"""


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("n, how", [(50_000, "read"), (200_000, "drop")])
def test_a_long_not_ready_chain_neither_crashes_nor_recurses(kind, n, how):
    proc = run_script(NOT_READY_CHAIN, args=(kind, str(n), how))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "survived" in proc.stdout
