"""Running independent table jobs: in-process, on a local process pool, on Ray, or on any Executor.

Each job's result is handed to a callback as soon as it finishes (the tables write it to their disk
cache there), so an interrupted build loses only the jobs in flight and resumes from the cache. Data that
every job reads (``shared``) travels once per worker, not once per job: through a process pool's
initializer, or Ray's object store. Jobs are submitted a few per worker at a time, so only those in flight
hold their own data (on Ray, in the object store).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import multiprocessing
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...errors import ConfigError

__all__ = ["RayExecutor", "job_location", "run_jobs"]

EXECUTORS = ("process", "serial", "ray")
_IN_FLIGHT_PER_WORKER = 2
"""Jobs submitted per worker ahead of the results: enough to keep every worker busy."""


def job_location() -> str:
    """``"host:pid"`` of the process running this: jobs return it, so a table can say where they ran."""
    return f"{socket.gethostname()}:{os.getpid()}"


class RayExecutor(cf.Executor):
    """A ``concurrent.futures.Executor`` whose tasks run as Ray remote functions.

    Uses the Ray cluster this process is connected to; if none, ``ray.init(**init_kwargs)`` starts a local one.
    """

    def __init__(self, **init_kwargs: Any) -> None:
        try:
            import ray
        except ImportError as err:
            raise ConfigError("executor='ray' needs Ray: pip install 'ray>=2.9' (or pass another executor)") from err
        if not ray.is_initialized():
            ray.init(**init_kwargs)
        self._ray = ray
        self._remote: dict[Callable[..., Any], Any] = {}

    @property
    def workers(self) -> int:
        """The cluster's CPUs: how many (single-CPU) tasks run at once."""
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def put(self, value: Any) -> Any:
        """Store ``value`` in the object store once; returns its ``ObjectRef``."""
        return self._ray.put(value)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(fn)  # exported to the cluster once, not per task
        return self._remote[fn].remote(*args, **kwargs).future()


_worker_shared: Any = None
"""In a process-pool worker: the jobs' shared data, set once by the pool's initializer."""
_ray_shared: dict[str, Any] = {}
"""In a Ray worker: the shared data of the jobs it last ran, by ObjectRef, read from the store once."""


def _init_worker(shared: Any, threads: int) -> None:
    global _worker_shared
    _worker_shared = shared
    torch.set_num_threads(threads)


def _call_with_shared(fn: Callable[..., Any], *job: Any) -> Any:
    return fn(_worker_shared, *job)


def _call_on_ray(fn: Callable[..., Any], box: list[Any] | None, threads: int, *job: Any) -> Any:
    """Run a job in a Ray worker; ``box`` holds the shared data's ObjectRef (in a list, so that Ray does not
    fetch and unpickle it for every task)."""
    torch.set_num_threads(threads)
    if box is None:
        return fn(*job)
    key = box[0].hex()
    if key not in _ray_shared:
        import ray

        _ray_shared.clear()
        _ray_shared[key] = ray.get(box[0])
    return fn(_ray_shared[key], *job)


def _resolve(executor: Any, jobs: int, threads_per_job: int, shared: Any) -> tuple[cf.Executor | None, bool]:
    """(executor or None for in-process, whether we own it and must shut it down)."""
    if isinstance(executor, cf.Executor):
        return executor, False
    if executor in (None, "process"):
        # Half the cores: concurrent timings share caches and memory bandwidth, and each disturbs the others
        # less when cores are left idle. Forked workers (where available) need no `if __name__ == "__main__"`.
        workers = min(jobs, max(1, (os.cpu_count() or 1) // (2 * max(1, threads_per_job))))
        if workers < 2 or jobs < 4:
            return None, False  # starting workers costs more than it saves
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        # A forked child runs torch single-threaded, as DataLoader workers do: GNU OpenMP deadlocks in a child
        # forked from a parent that had started its thread pool.
        threads = 1 if method == "fork" else threads_per_job
        return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                      initializer=_init_worker, initargs=(shared, threads)), True
    if executor == "serial":
        return None, False
    if executor == "ray":
        return RayExecutor(), False
    raise ConfigError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)} or a "
                      "concurrent.futures.Executor")


def _workers(pool: cf.Executor) -> int:
    if isinstance(pool, RayExecutor):
        return pool.workers
    # ProcessPoolExecutor and ThreadPoolExecutor keep their size there; other executors: assume the cores.
    return int(getattr(pool, "_max_workers", 0) or os.cpu_count() or 1)


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], on_result: Callable[[int, Any], None], *,
             shared: Any = None, executor: Any = None, threads_per_job: int = 1, progress: bool = False,
             desc: str = "jobs") -> str:
    """Run ``fn(*job)`` (``fn(shared, *job)`` if ``shared`` is given) for every job and call
    ``on_result(index, result)`` as each one completes.

    ``fn`` must be a module-level function, and the jobs and ``shared`` picklable, when they run in other
    processes; in this process ``shared`` is passed as it is. Ray workers run ``threads_per_job`` torch
    threads, and so do the process pool's unless forked (one thread: see :func:`_resolve`); a forking
    executor you pass should do the same in its initializer if this process ran torch multi-threaded.

    Returns:
        Where the jobs ran: ``"serial"`` (in this process), ``"process"``, ``"ray"``, or the given
        executor's class name.
    """
    pool, owned = _resolve(executor, len(jobs), threads_per_job, shared) if jobs else (None, False)
    name = "serial" if pool is None else "process" if owned else "ray" if isinstance(pool, RayExecutor) \
        else type(pool).__name__
    if not jobs:
        return name
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress, leave=False)
    try:
        if pool is None:
            for i, job in enumerate(jobs):
                on_result(i, fn(*job) if shared is None else fn(shared, *job))
                bar.update(1)
            return name
        submit = _submitter(pool, owned, fn, shared, threads_per_job)
        queue = iter(enumerate(jobs))
        futures = {submit(job): i for i, job in itertools.islice(queue, _IN_FLIGHT_PER_WORKER * _workers(pool))}
        try:
            while futures:
                done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    on_result(futures.pop(future), future.result())
                    bar.update(1)
                    futures.update({submit(job): i for i, job in itertools.islice(queue, 1)})
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return name
    finally:
        bar.close()
        if owned and pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _submitter(pool: cf.Executor, owned: bool, fn: Callable[..., Any], shared: Any, threads: int
               ) -> Callable[[tuple[Any, ...]], cf.Future[Any]]:
    """How one job is submitted to ``pool``: ``shared`` goes once per worker where the pool allows it."""
    if isinstance(pool, RayExecutor):
        box = None if shared is None else [pool.put(shared)]
        return lambda job: pool.submit(_call_on_ray, fn, box, threads, *job)
    if shared is None:
        return lambda job: pool.submit(fn, *job)
    if owned:  # our process pool: its initializer gave every worker the shared data
        return lambda job: pool.submit(_call_with_shared, fn, *job)
    return lambda job: pool.submit(fn, shared, *job)
