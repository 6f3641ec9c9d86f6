"""Load on a running dpr-serve over loopback: ``clients`` concurrent clients, each sending one
request at a time of ``batch`` questions, for ``seconds``. Prints one JSON line: questions/s,
requests, failures and latency percentiles (ms). Run as its own process (asyncio, one event loop)
so that client threads do not share the service's interpreter.

    python bench/loadgen.py --url http://127.0.0.1:8080 --clients 16 --seconds 10 --questions q.txt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import numpy as np


async def run(url: str, questions: list[str], clients: int, seconds: float, batch: int, k: int,
              mode: str = "", pause: float = 0.0, stop_file: str = "") -> dict:
    """``pause``: seconds each client waits between requests (0: closed loop, as fast as served);
    ``stop_file``: stop early once this file exists (a steady load for as long as a soak runs)."""
    import os

    lat: list[float] = []
    failed = 0
    extra = {"mode": mode} if mode else {}
    stop = time.perf_counter() + seconds

    async def client(i: int, c: httpx.AsyncClient) -> None:
        nonlocal failed
        n = i
        while time.perf_counter() < stop and not (stop_file and os.path.exists(stop_file)):
            qs = [questions[(n + j) % len(questions)] for j in range(batch)]
            n += batch * clients
            t = time.perf_counter()
            try:
                r = await c.post("/search", json={"questions": qs, "k": k, **extra})
                ok = r.status_code == 200 and len(r.json()["results"]) == batch
            except httpx.HTTPError:
                ok = False
            lat.append((time.perf_counter() - t) * 1000)
            failed += not ok
            if pause:
                await asyncio.sleep(pause)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        await c.post("/search", json={"questions": questions[:1], "k": k, **extra})  # connections up, version warm
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, c) for i in range(clients)))
        secs = time.perf_counter() - t0
    return {"clients": clients, "batch": batch, "mode": mode or "(service default)", "requests": len(lat), "failed": failed, "seconds": round(secs, 2),
            "qps": round(len(lat) * batch / secs, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--questions", required=True, help="a text file, one question per line")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--mode", default="", help="dense, bm25 or hybrid (default: the service's)")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between a client's requests (0: closed loop)")
    ap.add_argument("--stop-file", default="", help="stop once this file exists")
    args = ap.parse_args()
    questions = [q.strip() for q in open(args.questions, encoding="utf-8") if q.strip()]
    print(json.dumps(asyncio.run(run(args.url, questions, args.clients, args.seconds, args.batch, args.k, args.mode,
                                     args.pause, args.stop_file))))


if __name__ == "__main__":
    main()
