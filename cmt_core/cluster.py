"""The dask cluster that sharded work runs on (teacher rollouts, data set encoding): ``Cluster(cfg)``, a context
manager giving a ``distributed.Client``."""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import os

TASK_RETRIES = 3  # a shard's task is retried when it fails or its worker dies


class Cluster:
    """A client on ``cfg.address`` (a ``ClusterConfig``), or on a LocalCluster started for the run and closed after
    it; ``preload``: the modules whose functions the tasks run.

    Local workers fork from a forkserver that imports torch, zarr and ``preload`` once per driver process:
    importing torch takes seconds, which spawned workers would pay at every cluster start. Dask's default
    ``MALLOC_TRIM_THRESHOLD_`` for workers is dropped: it turns off glibc's adaptive mmap threshold, so
    every large tensor is mmap-ed and freed again, and torch ran rollouts 2x slower in the workers.
    The nanny writes the workers' variables (OMP_NUM_THREADS=1, ...) into this process's environment;
    they are restored on exit so that later subprocesses (torchrun, ...) do not inherit them. The workers' own logs
    are silenced: a task's failure reaches the driver as its exception (and its traceback, which the run's log file
    keeps), not as worker lines on the terminal.
    """

    def __init__(self, cfg, preload: tuple[str, ...] = ()):
        self.cfg, self.preload = cfg, tuple(preload)
        self.cluster, self.config, self.environ = None, None, None

    def __enter__(self):
        import dask
        from distributed import Client, LocalCluster
        from distributed.utils import get_mp_context

        if self.cfg.address:
            self.client = Client(self.cfg.address)
        else:
            settings = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
            forkserver = "forkserver" in multiprocessing.get_all_start_methods()
            if forkserver:
                settings["distributed.worker.multiprocessing-method"] = "forkserver"
            self.config = dask.config.set(settings)
            if forkserver:
                get_mp_context().set_forkserver_preload(["distributed", "torch", "zarr", *self.preload])
            self.environ = dict(os.environ)
            try:
                self.cluster = LocalCluster(n_workers=self.cfg.workers, threads_per_worker=self.cfg.threads_per_worker,
                                            processes=True, dashboard_address=None, silence_logs=logging.CRITICAL,
                                            resources={"GPU": 1} if self.cfg.gpu_resource else None)
            except BaseException:
                self._restore()
                raise
            self.client = Client(self.cluster)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self._restore()

    def _restore(self) -> None:
        if self.config is not None:
            self.config.__exit__(None, None, None)
        if self.environ is not None:
            for key in set(os.environ) - set(self.environ):
                del os.environ[key]
            os.environ.update(self.environ)


def dask_available() -> bool:
    """Whether the ``dask`` extra (``distributed``) is installed."""
    return importlib.util.find_spec("distributed") is not None


def run_shards(cfg, task, todo: list[int], name: str, advance, resources: dict | None = None, **kwargs) -> None:
    """``task(k, **kwargs)`` for every shard ``k`` of ``todo`` on the cluster of ``cfg`` (a ``ClusterConfig``),
    each a task retried ``TASK_RETRIES`` times (a failed task, a dead worker); ``advance(result)`` as each ends.
    A failure cancels the others and is raised. ``task``'s module is preloaded into the workers."""
    import uuid

    from distributed import as_completed

    with Cluster(cfg, preload=(task.__module__,)) as client:
        token = uuid.uuid4().hex[:8]
        futures = [client.submit(task, k, key=f"{name}-{token}-shard-{k}", retries=TASK_RETRIES,
                                 resources=resources, **kwargs) for k in todo]
        try:
            for future in as_completed(futures):
                advance(future.result())
        except BaseException:
            client.cancel(futures)
            raise
