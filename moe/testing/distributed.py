"""A pool of spawned gloo ranks that runs many checks on one process group.

Spawning ranks costs seconds on a small CPU machine, so tests share one pool::

    with RankPool(4) as pool:
        results = pool.run(check_fn, arg)   # check_fn(rank, world_size, arg) on every rank

``check_fn`` must be importable by name (a module-level function). ``run`` returns the
per-rank results in rank order, or raises ``RankFailed`` with every failing rank's
traceback. A rank that fails while the others wait in a collective makes them fail on
the gloo timeout; the pool is then restarted for the next ``run``.
"""

from __future__ import annotations

import os
import queue
import signal
import tempfile
import traceback
from typing import Any, Callable, Dict, List

import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """At least one rank raised; the message holds every rank's traceback."""


def _worker(rank: int, world_size: int, init_file: str, backend: str, timeout_s: float,
            tasks, results) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from moe_a2a.launcher import die_with_parent

    die_with_parent(os.getppid())  # a killed test session takes its pool with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the session closes the pool
    torch.set_num_threads(1)
    dist.init_process_group(backend=backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            value = fn(rank, world_size, *args, **kwargs)
            results.put((task_id, rank, True, value))
        except BaseException:  # report everything, keep serving
            results.put((task_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, backend: str = "gloo", collective_timeout_s: float = 60.0,
                 failure_grace_s: float = 10.0):
        self.world_size = world_size
        self.failure_grace_s = failure_grace_s
        self.backend = backend
        self.collective_timeout_s = collective_timeout_s
        self._procs: List[Any] = []
        self._task_id = 0

    def start(self) -> "RankPool":
        ctx = mp.get_context("spawn")
        fd, self._init_file = tempfile.mkstemp(prefix="moe_a2a_pool_")
        os.close(fd)
        os.unlink(self._init_file)  # the file store creates it
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(target=_worker, daemon=True,
                        args=(r, self.world_size, self._init_file, self.backend,
                              self.collective_timeout_s, self._tasks[r], self._results))
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        return self

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 300.0, **kwargs: Any) -> List[Any]:
        if not self._procs:
            self.start()
        self._task_id += 1
        task_id = self._task_id
        for q in self._tasks:
            q.put((task_id, fn, args, kwargs))
        values: List[Any] = [None] * self.world_size
        errors: Dict[int, str] = {}
        pending = set(range(self.world_size))
        while pending:
            # once a rank failed, the others are likely stuck in a collective: wait briefly
            wait = min(timeout_s, self.failure_grace_s) if errors else timeout_s
            try:
                tid, rank, ok, value = self._results.get(timeout=wait)
            except queue.Empty:
                if errors:
                    break
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                self.close()
                raise RankFailed(
                    f"{fn.__name__}: ranks {sorted(pending)} gave no result within {timeout_s}s "
                    f"(dead ranks: {dead}); errors so far: {errors}"
                )
            if tid != task_id:
                continue  # a late answer from an earlier, failed task
            pending.discard(rank)
            if ok:
                values[rank] = value
            else:
                errors[rank] = value
        if errors:
            self.close()  # surviving ranks may be out of step; start fresh next time
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            stuck = f"; ranks {sorted(pending)} were still waiting" if pending else ""
            raise RankFailed(f"{fn.__name__} failed on ranks {sorted(errors)}{stuck}:\n{text}")
        return values

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs = []
        init_file = getattr(self, "_init_file", None)
        if init_file and os.path.exists(init_file):
            os.unlink(init_file)

    def __enter__(self) -> "RankPool":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
