"""Running independent table jobs: in-process, on a local process pool, on Ray, or on any Executor.

Each job's result is handed to a callback as soon as it finishes (the tables write it to their disk
cache there), so an interrupted build loses only the jobs in flight and resumes from the cache.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any

from ...errors import ConfigError

__all__ = ["RayExecutor", "run_jobs"]

EXECUTORS = ("process", "serial", "ray")


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

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        remote = self._ray.remote(fn)
        return remote.remote(*args, **kwargs).future()


def _resolve(executor: Any, jobs: int, threads_per_job: int) -> tuple[cf.Executor | None, bool]:
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
        return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)), True
    if executor == "serial":
        return None, False
    if executor == "ray":
        return RayExecutor(), False
    raise ConfigError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)} or a "
                      "concurrent.futures.Executor")


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], on_result: Callable[[int, Any], None], *,
             executor: Any = None, threads_per_job: int = 1, progress: bool = False, desc: str = "jobs") -> None:
    """Run ``fn(*job)`` for every job and call ``on_result(index, result)`` as each one completes.

    ``fn`` must be a module-level function and the jobs plain data when they run in other processes.
    """
    if not jobs:
        return
    from tqdm.auto import tqdm

    pool, owned = _resolve(executor, len(jobs), threads_per_job)
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress, leave=False)
    try:
        if pool is None:
            for i, job in enumerate(jobs):
                on_result(i, fn(*job))
                bar.update(1)
            return
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        try:
            for future in cf.as_completed(futures):
                on_result(futures[future], future.result())
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    finally:
        bar.close()
        if owned and pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
