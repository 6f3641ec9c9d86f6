"""Processes that race for the nightly lock, for the lock tests: started once (spawned, so each
has its own S3 client and file descriptors) and synchronised on a barrier for every trial."""

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


def race(root: str, opts: dict | None, processes: int, trials: int, stale_s: float = 3600,
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
