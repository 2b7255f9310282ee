"""Where per-case work runs: in this process, on a LocalCluster that medseg starts, or on an
existing Dask cluster (`compute.scheduler`).

- `sync` (the default): in this process, one case after another.
- `local:N`: a `dask.distributed.LocalCluster` of N worker processes with one thread each,
  started when the first per-case step has work and stopped when the run ends.
- `tcp://host:8786`: the scheduler of a cluster that is already running. Its workers must
  import the same medseg and reach the data layers (a shared folder, or an fsspec store such
  as `s3://`).

Only per-case work is mapped: validation, canonicalization, preprocessing, and the inverse
geometry and writing of predicted masks. Kedro's runner stays sequential, so one `kedro run`
stays one MLflow run (kedro-mlflow splits runs under parallel runners). A worker has one
thread and works through its cases one at a time (a task is a short run of cases), and a task
returns only what the driver needs (fingerprint rows, nothing for a written file), so a worker
holds one case in memory.

The executor of the current run is module state, as a Dask `Client` is the process's default
client once made: the project hook (`medseg.runs.hooks.ComputeHook`) opens it before the pipeline
and closes it after, and the steps that map over cases ask for it with :func:`current`.
No Kedro or MLflow import here.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from medseg.casework import map_in_order
from medseg.parameters import SYNC, check_scheduler  # the grammar lives with the schema
from medseg.errors import ConfigurationError, MedsegError
from medseg.casework.progress import CaseProgress

logger = logging.getLogger(__name__)

_LOCAL = re.compile(r"^local:(\d+)$")
CONNECT_TIMEOUT_S = 10
# Imported once by the fork server that LocalCluster workers are forked from (no TensorFlow:
# the network never runs on a worker).
WORKER_PRELOAD = ("distributed", "numpy", "scipy.ndimage", "nibabel", "pandas", "medseg.pipelines.data.nodes")


class ComputeError(MedsegError):
    """A Dask worker died or the cluster went away while working on a case."""


class SyncExecutor:
    """Runs each case in this process, in order (the default, `sync`)."""

    scheduler = SYNC
    n_workers = 1

    def map(
        self,
        func: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        task: str,
        case_ids: Sequence[str] | None = None,
        prepare: Callable[[Any], Any] | None = None,
    ) -> list[Any]:
        """`[func(prepare(item)) for item in items]`, logging "task: case i of N".

        Args:
            func: the per-case work (a worker runs it under a Dask scheduler: it must pickle).
            items: one per case.
            task: the start of each progress line.
            case_ids: names of the cases in the progress lines (default `str(item)`).
            prepare: work that must stay in this process (the network of a segmenter), run
                on each item just before `func`; its result is what `func` receives.

        Returns:
            The results, in the order of `items`. The first exception is raised as is.
        """
        start = time.perf_counter()
        results = map_in_order(func, items, task=task, case_ids=case_ids, prepare=prepare, logger=logger)
        _log_step_time(task, len(items), start)
        return results

    def close(self) -> None:
        pass


class DaskExecutor:
    """Maps cases over a `dask.distributed` cluster: a LocalCluster of N processes that it
    starts (and stops in `close`), or a running scheduler at `address`.

    The cluster starts on the first `map` call, so a run whose cases are all up to date
    starts no process.
    """

    def __init__(self, scheduler: str):
        self.scheduler = check_scheduler(scheduler)
        self._client = None
        self._cluster = None

    @property
    def client(self):
        if self._client is None:
            self._client = self._connect()
        return self._client

    @property
    def n_workers(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def _connect(self):
        import dask
        from distributed import Client, LocalCluster
        from distributed.utils import get_mp_context

        match = _LOCAL.match(self.scheduler)
        if match:
            n = int(match.group(1))
            logger.info("compute.scheduler=%s: starting a Dask LocalCluster of %d worker processes.", self.scheduler, n)
            # One thread per worker: one case in memory per worker, and numpy/scipy inside a
            # task do not compete with the other workers for the cores. Workers are forked from
            # a fork server that imported the per-case code once: Dask's default, a fresh
            # interpreter per worker, spends seconds importing it again in every worker (5.7 s
            # against 2.6 s to a first result on 2 cores), and a plain fork would copy a driver
            # that may be running TensorFlow's threads.
            # Nor does a worker take Dask's MALLOC_TRIM_THRESHOLD_: a fixed trim threshold turns
            # off glibc's adaptive mmap threshold, so every volume-sized array is mapped afresh
            # and page-faulted in; resampling and writing a phantom took 1.5x as long on a
            # worker as in this process. Memory stays bounded by the case a worker holds.
            settings = {
                "distributed.worker.multiprocessing-method": "forkserver",
                "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
            }
            with dask.config.set(settings):
                get_mp_context().set_forkserver_preload(list(WORKER_PRELOAD))
                self._cluster = LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                    silence_logs=logging.WARNING,
                    # The fork server keeps the environment of the moment it started; the
                    # workers take this process's own now (a store's endpoint, credentials).
                    env={k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"},
                )
            return Client(self._cluster, set_as_default=False)
        try:
            client = Client(self.scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ConfigurationError(
                f"compute.scheduler={self.scheduler}: no Dask scheduler answers there ({type(exc).__name__}: {exc}). "
                "Start one (`dask scheduler`, then `dask worker <address>` on each machine), or set "
                "compute.scheduler to sync or local:N."
            ) from exc
        logger.info("compute.scheduler=%s: %d Dask workers.", self.scheduler, len(client.scheduler_info().get("workers", {})))
        return client

    def map(
        self,
        func: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        task: str,
        case_ids: Sequence[str] | None = None,
        prepare: Callable[[Any], Any] | None = None,
    ) -> list[Any]:
        """As :meth:`SyncExecutor.map`, the calls of `func` made on the workers.

        Without `prepare`, the cases go in contiguous chunks, four per worker, one task per
        chunk, all submitted at once: with a task per case, each phantom's preprocessing took
        1.5-1.9x as long on a worker as in this process; in chunks, about as long. A worker still holds one case at a time, and a chunk
        sends back only what `func` returns. With `prepare`, each case is its own task and at
        most two per worker are in flight, so `prepare`'s results (a network's probabilities,
        held here until a worker takes them) stay bounded. On the first failure the other
        tasks are cancelled and the task's own exception (a `MedsegError` naming the file) is
        raised here, as `sync` raises it.
        """
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        if not items:
            return []
        names = list(case_ids) if case_ids is not None else [str(item) for item in items]
        client = self.client
        progress = CaseProgress(task, len(items), logger=logger)
        if prepare is None:
            groups = _chunks(len(items), 4 * self.n_workers)
            limit = len(groups)
        else:
            groups = [[index] for index in range(len(items))]
            limit = 2 * self.n_workers
        pending = iter(range(len(groups)))
        results: list[Any] = [None] * len(items)
        group_of: dict[Any, list[int]] = {}

        def submit_next(queue) -> None:
            number = next(pending, None)
            if number is None:
                return
            group = groups[number]
            if prepare is None:
                future = client.submit(
                    _run_chunk, func, [items[i] for i in group], pure=False, key=f"{_key(task)}-chunk{number}"
                )
            else:
                index = group[0]
                future = client.submit(func, prepare(items[index]), pure=False, key=f"{_key(task)}-{index}-{_key(names[index])}")
            group_of[future.key] = group
            queue.add(future)

        start = time.perf_counter()
        queue = as_completed(loop=client.loop, with_results=True, raise_errors=False)
        for _ in range(limit):
            submit_next(queue)
        try:
            for future, result in queue:
                group = group_of[future.key]
                if future.status == "error":
                    try:
                        future.result()  # raises the task's own exception, with its traceback
                    except KilledWorker as exc:
                        cases = ", ".join(names[i] for i in group)
                        raise ComputeError(
                            f"{task}: the Dask worker died while working on case(s) {cases} ({exc}). It may have "
                            "run out of memory: give the workers more memory, fewer threads, or use "
                            "compute.scheduler=sync to see the case's own error."
                        ) from exc
                for index, value in zip(group, result if prepare is None else [result]):
                    results[index] = value
                    progress.advance(names[index])
                future.release()
                submit_next(queue)
        except BaseException:
            for future in list(queue.futures):
                future.cancel()
            raise
        _log_step_time(task, len(items), start)
        return results

    def close(self) -> None:
        if self._client is not None:
            try:
                peaks = self._client.run(_peak_rss_mib)
                logger.info(
                    "compute.scheduler=%s: the Dask workers' peak memory was %s MiB.", self.scheduler,
                    ", ".join(f"{peak:.0f}" for peak in sorted(peaks.values())),
                )
            except Exception:  # a report, never a reason to fail a finished run
                pass
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


def _log_step_time(task: str, n_cases: int, start: float) -> None:
    """"<task>: N cases in S s", the step's own time (benchmarks/scale_out.py sums these)."""
    logger.info("%s: %d cases in %.2f s.", task, n_cases, time.perf_counter() - start)


def _chunks(n_items: int, n_chunks: int) -> list[list[int]]:
    """`range(n_items)` in at most `n_chunks` contiguous runs of near-equal length."""
    n_chunks = max(1, min(n_items, n_chunks))
    bounds = [round(i * n_items / n_chunks) for i in range(n_chunks + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(n_chunks)]


def _run_chunk(func: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    """One task's cases, one after another on the worker (one case in memory at a time)."""
    return [func(item) for item in chunk]


def _peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (run on each worker)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(text))[:60]


def make_executor(scheduler: str) -> SyncExecutor | DaskExecutor:
    spec = check_scheduler(scheduler)
    return SyncExecutor() if spec == SYNC else DaskExecutor(spec)


# The one process-wide handle that a hook sets and nodes read, on purpose: a Dask client (and
# the LocalCluster medseg may start) belongs to the process, not to a dataset, and opening one
# per node would cost seconds each time. ComputeHook opens it before the pipeline and closes it
# after; outside a run it is `sync`. Everything else a node needs comes as an input.
_current: SyncExecutor | DaskExecutor = SyncExecutor()


def current() -> SyncExecutor | DaskExecutor:
    """The executor of the running pipeline (`sync` outside a run)."""
    return _current


def open_scheduler(scheduler: str) -> SyncExecutor | DaskExecutor:
    """Make `scheduler`'s executor the current one (closing any previous one)."""
    global _current
    close_scheduler()
    _current = make_executor(scheduler)
    return _current


def close_scheduler() -> None:
    """Stop the current executor's cluster (if medseg started one) and go back to `sync`."""
    global _current
    executor, _current = _current, SyncExecutor()
    executor.close()


@contextmanager
def using_scheduler(scheduler: str) -> Iterator[SyncExecutor | DaskExecutor]:
    """`with using_scheduler("local:2"):` maps cases on two worker processes inside the block."""
    executor = open_scheduler(scheduler)
    try:
        yield executor
    finally:
        close_scheduler()
