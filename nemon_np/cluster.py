"""Dask for independent work: one client for the sweeps' trainings and the exact verifier's images.

:func:`dask_client` connects to a running Dask scheduler (``tcp://HOST:PORT``: ``dask scheduler`` and
``dask worker ADDRESS``, dask-jobqueue on SLURM/PBS, Kubernetes) or starts a local cluster of processes
here and closes it afterwards. :func:`map_unordered` submits one task per item and yields the results as
they finish, with a progress bar, so that a caller can keep each one (a cache, a run folder) before the
next arrives: an interruption loses only the tasks still running.
"""
import contextlib
import os

from ._threads import ONE_THREAD_ENV

__all__ = ["local_cluster", "dask_client", "map_unordered"]


def local_cluster(workers):
    """A ``distributed.LocalCluster`` of ``workers`` processes, one thread and one BLAS (and numba) thread each."""
    import dask
    from distributed import LocalCluster
    # One BLAS thread a worker (Dask's pre-spawn default too): the products here are small and the
    # workers fill the cores. Dask also sets MALLOC_TRIM_THRESHOLD_ = 65536 in its workers, which
    # turns off glibc's adaptive mmap threshold: every large temporary is then mapped and unmapped
    # again, and a dense training ran 1.3x slower in a worker (6x the system time) than in a shell.
    # A value the user exported is kept (Dask lets the environment override its configuration).
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                            env=dict(ONE_THREAD_ENV))


@contextlib.contextmanager
def dask_client(scheduler=None, workers=None, cluster=None):
    """A ``distributed.Client`` of ``cluster``, else of the scheduler at address ``scheduler``, else of a
    new local cluster of ``workers`` processes (default: the cores), closed on exit."""
    from distributed import Client
    own = None
    if cluster is None and scheduler is None:
        own = cluster = local_cluster(workers or os.cpu_count() or 1)
    try:
        with Client(scheduler if scheduler is not None else cluster) as client:
            yield client
    finally:
        if own is not None:
            own.close()


def map_unordered(client, function, items, *, key, desc, unit, progress=True, shared=None):
    """Yield (item, result) of ``function(item)`` or ``function(item, shared)`` for each of ``items`` as
    the tasks finish on ``client``; ``key(item)`` names each task, ``shared`` is sent to the workers
    once (scattered), not once a task; the progress bar says ``desc`` and counts ``unit``."""
    from distributed import as_completed
    from tqdm.auto import tqdm
    extra = [] if shared is None else [client.scatter(shared, broadcast=True)]
    futures = {client.submit(function, item, *extra, key=key(item), pure=False): item for item in items}
    bar = tqdm(total=len(futures), desc=desc, unit=unit, disable=None if progress else True)
    try:
        for future, result in as_completed(futures, with_results=True):
            bar.update()
            yield futures[future], result
    finally:
        bar.close()
