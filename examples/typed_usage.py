"""The public API as a user types it: checked by mypy in CI (.ci/run)."""

from typing import Any, Iterator, List

from taskrunner import (
    FutureList,
    ProcessPoolTaskRunner,
    TaskFuture,
    ThreadPoolTaskRunner,
    as_completed,
    task,
    unmapped,
    wait,
)


@task
def inc(x: int) -> int:
    return x + 1


@task(name="scale")
def scale(x: int, factor: float) -> float:
    return x * factor


def pipeline(numbers: List[int]) -> float:
    with ThreadPoolTaskRunner(max_workers=4) as runner:
        first: TaskFuture[int] = runner.submit(inc, {"x": 1})
        incremented: FutureList[int] = runner.map(inc, {"x": numbers})
        scaled = runner.map(scale, {"x": incremented, "factor": unmapped(0.5)},
                            wait_for=[first])
        done, not_done = wait(list(scaled), timeout=10)
        assert not not_done
        for future in as_completed(incremented):
            value: int = future.result()
            assert value > 0
        results: List[float] = scaled.result()
        shown: List[int] = incremented.result(progress=True)     # a bar, on a terminal
        assert len(shown) == len(numbers)
        maybe = first.result(raise_on_failure=False)
        if isinstance(maybe, BaseException):
            raise maybe
        return sum(results) + maybe


@task(retries=2, retry_delay_seconds=[0.01, 0.1], retry_jitter_factor=0.5,
      retry_condition_fn=lambda exc: isinstance(exc, OSError), timeout_seconds=30,
      tags=["db"])
def load(key: str) -> str:
    return key.upper()


def with_options() -> List[str]:
    quick = load.with_options(timeout_seconds=5, retries=0)
    with ThreadPoolTaskRunner(max_workers=4, limits={"db": 2}) as runner:
        future: TaskFuture[str] = runner.submit(quick, {"key": "a"})
        attempts: int = future.attempt
        assert attempts >= 1
        return runner.map(load, {"key": ["b", "c"]}).result() + [future.result()]


def in_processes() -> List[int]:
    with ProcessPoolTaskRunner(max_workers=2, mp_context="spawn") as runner:
        streamed: Iterator[Any] = runner.imap(inc, {"x": iter(range(10))}, buffer=4)
        assert sum(streamed) == 55
        return runner.map(inc, {"x": range(10)}).result()


if __name__ == "__main__":
    print(pipeline([1, 2, 3]), with_options(), in_processes())
