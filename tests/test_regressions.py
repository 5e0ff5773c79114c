"""Regressions: wrong results, crashes and hangs found by trying the
runners as a new user would (issue 13), one section per point.

Each test failed on the code before its fix.  A failure that kills or hangs
the interpreter is run in a child process (harness.run_script) with a
timeout, so that it fails the test instead of the session.
"""

import os

import pytest

import runner_tasks as rt
from harness import run_script
from taskrunner import quote, unmapped

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


# -- 11. a future the runner cannot replace, sent to another process ----------

class Box:
    """An object the runners do not look into."""

    def __init__(self, content):
        self.content = content


@pytest.mark.parametrize("wrap", [quote, Box], ids=["quote", "opaque-object"])
def test_a_hidden_future_is_a_type_error_at_submit(remote_runner_factory, make_path, wrap):
    ran = make_path()
    with remote_runner_factory() as r:
        up = r.submit(rt.inc, {"x": 1})
        with pytest.raises(TypeError, match=r"parameter 'x'.*future"):
            r.submit(rt.record, {"path": ran, "x": wrap(up)})
        with pytest.raises(TypeError, match=r"item 1 of parameter 'x'.*future"):
            r.map(rt.record, {"path": unmapped(ran), "x": [1, wrap(up)]})
        with pytest.raises(TypeError, match=r"parameter 'x'.*future"):
            r.map(rt.record, {"path": ran, "x": unmapped(wrap(up))})
        # Where the engine replaces it, the same future goes as its result.
        assert r.submit(rt.identity, {"x": [{"k": (up,)}]}).result(timeout=30) == [{"k": (2,)}]
        assert up.result(timeout=30) == 2
    assert not os.path.exists(ran)
