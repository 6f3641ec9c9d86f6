"""Processes started together for the concurrency tests (spawned, so each has its own S3 client,
file descriptors and FAISS): racing for the nightly lock, trial after trial on a barrier, and
loading one index version into one shared cache at once."""

from __future__ import annotations

import multiprocessing as mp


def _worker(rank, root, opts, stale_s, trials, barrier, results):
    from dpr_lib.nightly import LockError, RunLock

    for trial in range(trials):
        lock = RunLock(root, stale_s, opts)
        barrier.wait()  # everyone tries at once
        try:
            lock.acquire()
            won = True
        except LockError:
            won = False
        results.put((trial, rank, won))
        barrier.wait()  # every attempt is over before the winner lets go
        if won:
            lock.release()
        barrier.wait()  # the next trial starts from a released lock (or the stale one, re-planted)


def race_lock(root: str, opts: dict | None, processes: int, trials: int, stale_s: float = 3600,
         before_trial=None) -> list[int]:
    """Winners per trial. ``before_trial()`` (in this process) runs while the workers wait, e.g. to
    plant a stale lock."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(r, root, opts, stale_s, trials, barrier, results), daemon=True)
               for r in range(processes)]
    for w in workers:
        w.start()
    winners = []
    try:
        for _ in range(trials):
            if before_trial:
                before_trial()
            barrier.wait(timeout=120)
            got = [results.get(timeout=120) for _ in range(processes)]
            winners.append(sum(won for _, _, won in got))
            barrier.wait(timeout=120)
            barrier.wait(timeout=120)
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    return winners


def _load(root, cache_dir, opts, queries, barrier, results):
    import numpy as np

    from dpr_lib.search import ShardedIndex

    barrier.wait()
    try:
        index = ShardedIndex(root, cache_dir=cache_dir, storage_options=opts)
        scores, pids = index.search(np.asarray(queries, dtype="float32"), 5)
        results.put(("ok", pids.tolist(), index.version))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(("error", f"{type(exc).__name__}: {exc}", None))


def load_together(root: str, cache_dir: str, opts: dict | None, queries, processes: int) -> list[tuple]:
    """What each of ``processes`` processes got when loading ``root`` into ``cache_dir`` at once."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    workers = [ctx.Process(target=_load, args=(root, cache_dir, opts, queries, barrier, results), daemon=True)
               for _ in range(processes)]
    for w in workers:
        w.start()
    try:
        return [results.get(timeout=300) for _ in range(processes)]
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
