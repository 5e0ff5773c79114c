# Type stubs for the compiled taskrunner._mapped (csrc/taskrunner/_mapped.pyx).
import uuid
from typing import Iterable, List, Literal, Optional, Tuple, TypeVar, Union, overload

from taskrunner._futures import TaskFuture

R = TypeVar("R")

class FutureList(List[TaskFuture[R]]):
    """The futures of a map(), in input order."""

    def wait(self, timeout: Optional[float] = None,
             progress: Union[bool, Literal["always"]] = False) -> None: ...
    @overload
    def result(self, timeout: Optional[float] = None,
               raise_on_failure: Literal[True] = True,
               progress: Union[bool, Literal["always"]] = False) -> List[R]: ...
    @overload
    def result(self, timeout: Optional[float] = None, *,
               raise_on_failure: Literal[False],
               progress: Union[bool, Literal["always"]] = False) -> List[Union[R, BaseException]]: ...

class RunList:
    def __len__(self) -> int: ...
    def run_ids(self) -> List[int]: ...
    def run_facts(self, i: int) -> Tuple[str, uuid.UUID, int]: ...
    def position_of(self, run: int) -> int: ...
    def view(self, start: int, stop: int) -> RunList: ...

def join_runs(parts: Iterable[RunList]) -> RunList: ...
