"""DaskTaskRunner: runs tasks on a Dask cluster through `distributed`.

A backend of the remote-runner protocol (taskrunner.remote): the dependency
graph stays in this process, in the engine, and a run goes to the cluster
only once its upstreams have completed, so NotReady, allow_failure,
wait_for, the map rules and cancellation work as for the other runners.
Results stay on the cluster: a completed run's future holds a handle (its
`distributed.Future`), a downstream run names that handle as a dependency,
so Dask moves the data worker to worker, and the client fetches a value
only when result() is called.  When the runner exits, the values of the
futures still held anywhere are gathered in one call, so that result()
still works after the client has closed.

The parts (taskrunner._dask): the backend, the client side (backend.py);
what runs on the workers, and how recalled runs are held back there
(worker.py); calls pickled with their upstream results left out
(calls.py); results kept on the cluster (results.py).  `distributed` is
imported only when a runner is made.
"""

import importlib
import os
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

from taskrunner import _logging as _logs
from taskrunner._dask import distributed as _distributed
from taskrunner.base import checked_limits, checked_trace
from taskrunner.remote import RemoteTaskRunner

__all__ = ["DaskTaskRunner", "ClusterClassNotFound"]


class DaskTaskRunner(RemoteTaskRunner):
    """Runs tasks on a Dask cluster.

    With `address=None`, entering starts `cluster_class(**cluster_kwargs)`
    (`distributed.LocalCluster` by default; a class, or its qualified name
    as a string) and exiting closes it.  With `address` ("tcp://host:8786"),
    entering connects to that running scheduler and exiting closes only the
    client.  `client_kwargs` go to `distributed.Client`.

    Task functions and their arguments travel with pickle (cloudpickle for
    lambdas, closures and `__main__`); the workers must be able to import
    `taskrunner` and the modules the tasks come from.

    `trace` (a file path): when the runner exits, a Chrome trace-event file
    of the runs is written there, a track per thread of each Dask worker
    (see the README, "Run trace").
    """

    def __init__(self, address: Optional[str] = None,
                 cluster_class: Union[str, Callable[..., Any], None] = None,
                 cluster_kwargs: Optional[Mapping[str, Any]] = None,
                 client_kwargs: Optional[Mapping[str, Any]] = None, *,
                 limits: Optional[Mapping[str, int]] = None,
                 trace: Union[str, "os.PathLike[str]", None] = None) -> None:
        if address is not None and not isinstance(address, str):
            raise TypeError(
                f"address must be a scheduler address string such as 'tcp://host:8786', "
                f"or None, not {type(address).__name__}")
        cluster_kwargs = _mapping_arg(cluster_kwargs, "cluster_kwargs")
        client_kwargs = _mapping_arg(client_kwargs, "client_kwargs")
        if address is not None and (cluster_class is not None or cluster_kwargs):
            raise ValueError(
                "give either address (connect to a running scheduler) or "
                "cluster_class/cluster_kwargs (start a cluster), not both")
        if client_kwargs.get("asynchronous"):
            raise ValueError("client_kwargs: asynchronous=True is not supported; "
                             "the runner drives a synchronous client")
        self._trace_path = checked_trace(trace)
        _distributed()
        if address is not None:
            _check_address(address)
        self._address = address
        self._cluster_class = _resolve_class(cluster_class)
        self._cluster_kwargs = cluster_kwargs
        self._client_kwargs = client_kwargs
        self._limits = checked_limits(limits)

    # -- settings --------------------------------------------------------------

    @property
    def name(self):
        return "dask"

    @property
    def address(self):
        """The scheduler address given, or None (a cluster is started)."""
        return self._address

    @property
    def cluster_class(self):
        """The class of the cluster started on entering, or None (LocalCluster)."""
        return self._cluster_class

    @property
    def cluster_kwargs(self):
        return dict(self._cluster_kwargs)

    @property
    def client_kwargs(self):
        return dict(self._client_kwargs)

    @property
    def client(self):
        """The `distributed.Client` while entered, else None."""
        backend = self._active
        return backend.client if backend is not None else None

    @property
    def cluster(self):
        """The cluster this runner started, while entered; None if it
        connected to an address, or is not entered."""
        backend = self._active
        return backend.cluster if backend is not None else None

    def duplicate(self):
        return type(self)(address=self._address, cluster_class=self._cluster_class,
                          cluster_kwargs=self.cluster_kwargs, client_kwargs=self.client_kwargs,
                          limits=self._limits, trace=self._trace_path)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._settings() == other._settings()

    def __hash__(self):
        return hash((type(self), self._address, self._cluster_class))

    def _settings(self):
        return (self._address, self._cluster_class, self._cluster_kwargs, self._client_kwargs,
                self._limits, self._trace_path)

    def __repr__(self):
        if self._address is not None:
            return f"DaskTaskRunner(address={self._address!r})"
        cls = self._cluster_class.__name__ if self._cluster_class else "LocalCluster"
        return f"DaskTaskRunner(cluster_class={cls}, cluster_kwargs={self._cluster_kwargs!r})"

    # -- entering and exiting ----------------------------------------------------------

    def _backend(self):
        from taskrunner._dask.backend import DaskBackend, close_quietly

        distributed = _distributed()
        client_kwargs = {"set_as_default": False, **self._client_kwargs}
        cluster = client = None
        try:
            if self._address is None:
                cluster_class = self._cluster_class or distributed.LocalCluster
                cluster = cluster_class(**self._cluster_kwargs)
                client = distributed.Client(cluster, **client_kwargs)
            else:
                client = distributed.Client(self._address, **client_kwargs)
            _logs.cluster_connected(_address_of(client), cluster is not None)
            return DaskBackend(client, cluster, traced=self._trace_path is not None)
        except BaseException:
            close_quietly(client, cluster)
            raise

    def _max_out(self, backend):
        return backend.window

    def _abandon(self):
        """A second Ctrl-C stopped the exit's wait: cancel the runs on the
        cluster (their watcher ends them CRASHED: Dask cancelled them)."""
        backend = self._active
        if backend is None:
            return
        with backend.lock:
            futures = {id(s.dask_future): s.dask_future for s in backend.placed.values()
                       if s.dask_future is not None}
        if not futures:
            return
        try:
            backend.client.cancel(list(futures.values()), force=True)
        except Exception:
            return
        # The watcher ends them as it sees the cancellations: let it, before
        # the exit stops it (a bounded wait: the cluster may be gone).
        engine = self._engine
        deadline = time.monotonic() + 5.0
        while engine is not None and engine.unfinished and time.monotonic() < deadline:
            time.sleep(0.01)

    def _parallelism(self):
        backend = self._active
        return backend.threads if backend is not None else 1


def _address_of(client):
    try:
        return client.scheduler.address
    except Exception:   # only for a log line
        return None


def _check_address(address):
    """ValueError naming `address` unless it reads as a scheduler address
    ("tcp://host:port", "host:port", or another of Dask's schemes)."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    example = "such as 'tcp://10.0.0.5:8786'"
    if not address:
        raise ValueError("address must not be empty; use None to start a local cluster")
    if address != address.strip() or any(c.isspace() for c in address):
        raise ValueError(f"address {address!r} is not a Dask scheduler address {example}")
    try:
        scheme, location = parse_address(address)
        registry.get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            host, _ = parse_host_port(location, default_port=8786)
            if not host:
                raise ValueError("no host")
    except Exception as error:
        raise ValueError(f"address {address!r} is not a Dask scheduler address {example} "
                         f"({error})") from None


def _mapping_arg(value, what):
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{what} must be a mapping of keyword arguments, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be strings, not {type(key).__name__}")
    return dict(value)


def _resolve_class(cluster_class):
    """A cluster class from a class, a callable or a "module.Class" string."""
    if cluster_class is None:
        return None
    if isinstance(cluster_class, str):
        module_name, _, attribute = cluster_class.rpartition(".")
        if not module_name:
            raise ValueError(
                f"cluster_class {cluster_class!r} must be a qualified name, such as "
                f"'distributed.LocalCluster'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ClusterClassNotFound(
                f"cluster_class {cluster_class!r}: cannot import module {module_name!r} "
                f"({error})", name=module_name) from error
        try:
            cluster_class = getattr(module, attribute)
        except AttributeError:
            raise ValueError(f"cluster_class {cluster_class!r}: module {module_name!r} "
                             f"has no attribute {attribute!r}") from None
    if not callable(cluster_class):
        raise TypeError(f"cluster_class must be a class, a callable or a 'module.Class' "
                        f"string, not {type(cluster_class).__name__}")
    return cluster_class


class ClusterClassNotFound(ModuleNotFoundError, ValueError):
    """cluster_class names a module that cannot be imported: a bad setting
    (ValueError) as much as a missing module."""
