"""The `task` decorator."""

import functools
from typing import Any, Callable, Generic, Optional, TypeVar, overload

__all__ = ["Task", "task"]

R = TypeVar("R")


def _callable_name(fn):
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


class Task(Generic[R]):
    """A function marked as a task.  Calling it calls the function."""

    __slots__ = ("fn", "name", "__dict__")

    fn: Callable[..., R]
    name: str

    def __init__(self, fn: Callable[..., R], name: Optional[str] = None) -> None:
        if not callable(fn):
            raise TypeError(f"task() needs a callable, got {type(fn).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"task name must be a str, got {type(name).__name__}")
        self.fn = fn
        self.name = name if name is not None else _callable_name(fn)
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return f"<Task {self.name}>"

    def __reduce__(self):
        return Task, (self.fn, self.name)


@overload
def task(fn: Callable[..., R], *, name: Optional[str] = None) -> Task[R]: ...
@overload
def task(fn: None = None, *, name: Optional[str] = None) -> Callable[[Callable[..., R]], Task[R]]: ...
def task(fn=None, *, name=None):
    """Mark `fn` as a task: `@task`, `@task(name=...)` or `task(fn)`."""
    if fn is None:
        return functools.partial(Task, name=name)
    return Task(fn, name=name)
