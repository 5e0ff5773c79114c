"""The states a task run passes through."""

import enum

__all__ = ["State", "StateType"]


class StateType(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"


_FINAL = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED})


class State:
    """A snapshot of a run's state: its `type`, `name` and `message`.

    A run that never started because an upstream did not complete is FAILED
    with the name "NotReady".
    """

    __slots__ = ("type", "name", "message")

    def __init__(self, type, name=None, message=None):
        self.type = StateType(type)
        self.name = name if name is not None else self.type.value.capitalize()
        self.message = message

    def is_pending(self):
        return self.type is StateType.PENDING

    def is_running(self):
        return self.type is StateType.RUNNING

    def is_completed(self):
        return self.type is StateType.COMPLETED

    def is_failed(self):
        return self.type is StateType.FAILED

    def is_cancelled(self):
        return self.type is StateType.CANCELLED

    def is_crashed(self):
        return self.type is StateType.CRASHED

    def is_final(self):
        return self.type in _FINAL

    def __eq__(self, other):
        if not isinstance(other, State):
            return NotImplemented
        return (self.type, self.name, self.message) == (other.type, other.name, other.message)

    def __hash__(self):
        return hash((self.type, self.name, self.message))

    def __repr__(self):
        if self.message is None:
            return f"{self.name}()"
        return f"{self.name}(message={self.message!r})"
