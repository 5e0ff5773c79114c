"""Peers of the bench that must be started before they can run anything:
a dask `distributed.LocalCluster` and its client, a local Ray, Prefect's
API server.  Starting one takes seconds (Ray about 10, Prefect's server
about 15), which is no part of what the bench compares, so each is started
once, by a variant's untimed warm-up run, and reused by its timed samples;
`close_all()` stops them.

This module knows nothing of the workloads (taskrunner.bench passes the
functions to run), so that a worker process unpickling a job function
never imports the two modules in a cycle.
"""

import contextlib
import os
import tempfile

__all__ = ["dask_client", "ray_remote", "prefect_api", "close_all"]

_dask = {}          # (processes, n_workers, threads_per_worker) -> (cluster, client)
_ray = {}           # "cpus": the num_cpus of the running Ray; id(function) -> (function, remote)
_prefect = {}       # "stack": an ExitStack holding the server and its settings


def dask_client(processes, workers):
    """A `distributed.Client` on a LocalCluster of `workers` worker processes
    of one thread each (`processes`) or of one in-process worker with
    `workers` threads: the two shapes of the bench's process and thread
    rows."""
    key = (processes, workers if processes else 1, 1 if processes else workers)
    if key not in _dask:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=key[1], threads_per_worker=key[2], processes=processes,
                               dashboard_address=None)
        _dask[key] = (cluster, Client(cluster))
    return _dask[key][1]


def _close_dask():
    """Stop every LocalCluster (their worker processes hold memory the next
    workload may need)."""
    while _dask:
        cluster, client = _dask.popitem()[1]
        client.close()
        cluster.close()


def ray_remote(function, cpus):
    """`ray.remote(function)` on a local Ray of `cpus` CPUs, the same count as
    every other variant of the row; Ray is restarted if another row asked
    for another count."""
    import ray

    if _ray.get("cpus") != cpus:
        _close_ray()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        _ray["cpus"] = cpus
    if id(function) not in _ray:
        # The function itself is kept with its remote so that its id is not reused.
        _ray[id(function)] = (function, ray.remote(function))
    return _ray[id(function)][1]


def _close_ray():
    if _ray:
        import ray

        ray.shutdown()
        _ray.clear()


# Prefect reads these when it is first imported: its database and settings
# go to a directory of the bench's own (not ~/.prefect), and its server
# neither phones home (there is no network here) nor logs every task run.
PREFECT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}


def prefect_api():
    """Start Prefect's ephemeral API server once, with this process and the
    worker processes of Prefect's ProcessPoolTaskRunner pointed at it (left
    to themselves, each of those starts a server of its own, some seconds
    per worker, and they contend for one SQLite file)."""
    if "stack" in _prefect:
        return
    with contextlib.ExitStack() as stack:
        home = stack.enter_context(tempfile.TemporaryDirectory(prefix="taskrunner-bench-prefect-"))
        for name, value in {**PREFECT_ENV, "PREFECT_HOME": home}.items():
            stack.callback(_restore_env, name, os.environ.get(name))
            os.environ[name] = value
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_API_URL, temporary_settings

        server = SubprocessASGIServer()
        stack.callback(server.stop)
        # Its own default (20 s) is too short on 2 busy cores.
        server.start(timeout=PREFECT_START_TIMEOUT)
        stack.callback(_restore_env, "PREFECT_API_URL", os.environ.get("PREFECT_API_URL"))
        os.environ["PREFECT_API_URL"] = server.api_url
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))
        _prefect["stack"] = stack.pop_all()     # kept open until close_all()


PREFECT_START_TIMEOUT = 180


def _restore_env(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _close_prefect():
    stack = _prefect.pop("stack", None)
    if stack is not None:
        stack.close()


def close_all():
    _close_dask()
    _close_ray()
    _close_prefect()
