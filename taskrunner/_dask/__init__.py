"""The parts of DaskTaskRunner's backend (see taskrunner.dask): the
backend itself, the client side (backend.py); what runs on the workers
(worker.py); how a call is pickled with its upstream results left out, to
travel as Dask dependencies (calls.py); results kept on the cluster and
fetched from it (results.py)."""

INSTALL_HINT = "pip install 'taskrunner[dask]'"


def distributed():
    """The `distributed` module, or an ImportError saying how to get it.
    Imported only when a runner is made: taskrunner does not need it."""
    try:
        import distributed
    except ImportError as error:
        raise ImportError(
            f"DaskTaskRunner needs the 'distributed' package, an optional extra of "
            f"taskrunner: {INSTALL_HINT}") from error
    return distributed
