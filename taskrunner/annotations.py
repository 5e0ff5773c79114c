"""Wrappers that change how a runner treats a parameter value."""

__all__ = ["unmapped", "allow_failure", "quote"]


class _Annotation:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def unwrap(self):
        return self.value

    def __eq__(self, other):
        if type(self) is not type(other):
            return NotImplemented
        return self.value == other.value

    def __hash__(self):
        return hash((type(self), id(self.value)))

    def __repr__(self):
        return f"{type(self).__name__}({self.value!r})"


class unmapped(_Annotation):
    """Pass `value` whole to every call of a `map`, even if it is iterable."""

    __slots__ = ()


class allow_failure(_Annotation):
    """Run the downstream task even if the futures inside `value` fail.

    As a parameter, a failed upstream is replaced by its exception (for an
    upstream that never ran, its UpstreamTaskError); in `wait_for`, the
    downstream simply stops waiting for it.
    """

    __slots__ = ()


class quote(_Annotation):
    """Pass `value` to the task exactly as it is: no search for futures
    inside it, no resolution."""

    __slots__ = ()
