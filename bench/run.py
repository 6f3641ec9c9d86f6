"""`make bench`: every stage against its baseline, measured side by side in one run on this machine.

Writes bench/results/latest.json (flat dotted keys, numbers; encode.config names a configuration), latest.md and ratios.png.
`bench/run.py --help` lists the options and the parts. `--quick` (BENCH_QUICK=1) shrinks every size for a smoke run
(CI) that only proves the harness works; `--only PART` (BENCH_ONLY=PART) runs one part and merges it into the last
results; `--out DIR` (BENCH_OUT) writes elsewhere. The parts: encode_bench, index_bench, nightly_bench,
serve_bench, scale, sparse_bench, peer_bench, choice_bench, soak_bench, cluster_bench (what they share: common).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time

PARTS = {
    "encode": "the encode job against sentence-transformers' setups, per CPU kind (~25 min)",
    "index": "the merge job against plain FAISS and autofaiss; the driver's memory",
    "serve": "the search service: throughput, latency, swaps under load",
    "nightly": "a nightly run against a full rebuild",
    "nightly_scale": "a 1% change to >= 1M passages (~35 min)",
    "nightly_changefeed": "the change-set runs alone, on what nightly_scale left",
    "scale": "the merge job at millions of vectors of d = 768 (~25 min)",
    "sparse": "BM25 pruned against exhaustive at 1.1M passages (~15 min; ~5 reusing its index)",
    "peer": "sentence-transformers as the judge of dense retrieval (~5 min)",
    "choice": "the served retriever's choice on a small validation set (~3 min)",
    "soak": "thirty nights in a row under load (~30 min)",
    "cluster": "the pipeline on a standalone cluster against local[2]",
}
"""What ``--only`` (BENCH_ONLY) accepts; a full run (no ``--only``) runs them all."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options, with the BENCH_* variables as their defaults; an unknown part is refused before
    anything runs. The chosen values are written back to the environment, which the parts read
    when they are imported (sizes depend on BENCH_QUICK, paths on BENCH_OUT)."""
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="parts (--only):\n" + "\n".join(f"  {k:<19} {v}" for k, v in PARTS.items()))
    parser.add_argument("--only", metavar="PART", default=os.environ.get("BENCH_ONLY", ""),
                        help="run one part and merge its figures into the last results (env BENCH_ONLY)")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                        help="smoke run: every size shrunk, figures not comparable (env BENCH_QUICK=1)")
    parser.add_argument("--out", metavar="DIR", default=os.environ.get("BENCH_OUT", ""),
                        help="where latest.json/.md and ratios.png go (env BENCH_OUT; default bench/results)")
    args = parser.parse_args(argv)
    if args.only and args.only not in PARTS:
        parser.error(f"unknown part {args.only!r} (--only or BENCH_ONLY): choose one of {', '.join(PARTS)}")
    os.environ["BENCH_ONLY"] = args.only
    os.environ["BENCH_QUICK"] = "1" if args.quick else "0"
    if args.out:
        os.environ["BENCH_OUT"] = os.path.abspath(args.out)
    return args


# ---------------------------------------------------------------- report

@functools.cache
def part_keys() -> dict[str, frozenset]:
    """Parts whose figures share another part's key prefix (``nightly.``, ``serve.``): the keys each one writes."""
    from choice_bench import CHOICE_KEYS
    from nightly_scale import NIGHTLY_CHANGEFEED_KEYS, NIGHTLY_SCALE_KEYS
    from peer_bench import PEER_KEYS
    from soak_bench import SOAK_KEYS
    from sparse_bench import SPARSE_KEYS

    return {"nightly_scale": NIGHTLY_SCALE_KEYS, "nightly_changefeed": NIGHTLY_CHANGEFEED_KEYS,
            "sparse": SPARSE_KEYS, "peer": PEER_KEYS, "choice": CHOICE_KEYS, "soak": SOAK_KEYS}


def owned_by(key: str, part: str) -> bool:
    """Whether a rerun of ``part`` replaces ``key``: its own keys, or its prefix's keys that no
    other part claims (a rerun of the nightly part keeps the nightly-at-scale figures)."""
    keys = part_keys()
    if part in keys:
        return key in keys[part]
    claimed = any(key in k for k in keys.values())
    return key.startswith(part + ".") and not claimed


PER_CPU_PREFIXES = ("encode.",)
"""Figures that depend on the CPU's kind (its vector and matrix extensions): kept per kind in
``by_cpu``, so a rerun on one kind does not erase another's; each entry is one run on one machine,
so its ratios compare sides measured together."""


def by_cpu_kind(previous: str, results: dict, details: dict, mach: dict, date: str, opts) -> dict:
    """``by_cpu`` of latest.json: the previous entries, this run's per-CPU figures under this
    machine's kind. The first time, the flat figures of the previous file seed the kind of the
    machine that measured them (its recorded features, else: no native bf16 = avx2)."""
    old = json.load(open(previous)) if os.path.exists(previous) else {}
    kinds = dict(old.get("by_cpu") or {})
    if not kinds and any(k.startswith(PER_CPU_PREFIXES) for k in old):
        m = old.get("machine", {})
        kind = m.get("cpu_kind", {}).get("kind") or ("avx2" if not m.get("native_bf16") else "unknown")
        kinds[kind] = {"machine": m, "date": old.get("date"),
                       "figures": {k: v for k, v in old.items() if k.startswith(PER_CPU_PREFIXES)},
                       "configs": old.get("details", {}).get("encode_configs")}
    mine = {k: v for k, v in results.items() if k.startswith(PER_CPU_PREFIXES)}
    if mine and not opts.quick:
        kind = mach["cpu_kind"]["kind"]
        if opts.only and opts.only != "encode" and kind in kinds:  # a part owning a few encode.* keys adds to the entry
            kinds[kind] = {**kinds[kind], "figures": {**kinds[kind]["figures"], **mine}}
        else:
            kinds[kind] = {"machine": mach, "date": date, "figures": mine, "configs": details.get("encode_configs")}
    return kinds


def write_report(results: dict, details: dict, mach: dict, seconds: float, opts) -> None:
    from common import OUT, QUICK, REPO, log

    ONLY = opts.only
    os.makedirs(OUT, exist_ok=True)
    previous = os.path.join(OUT, "latest.json")
    measured = dict(results)  # this run's own figures (a partial run merges older ones in below)
    if ONLY and os.path.exists(previous):
        old = json.load(open(previous))
        keep = {k: v for k, v in old.items() if "." in k and not owned_by(k, ONLY)}
        results = {**keep, **results}
        full_date = old.get("details", {}).get("full_run_date") or old.get("date")
        # every part measured since the full run, with its date (older files: read off their note)
        parts = old.get("details", {}).get("partial_runs") or dict(
            re.findall(r"(\w+)\.\* measured (\S+?);", old.get("details", {}).get("partial_run", "")))
        parts = {**parts, ONLY: time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
        # which CPU each part ran on (`machine` is the last run's only; recorded since 2026-12-05)
        kind = (mach.get("cpu_kind") or {}).get("kind", "?")
        cpus = {**old.get("details", {}).get("partial_run_cpus", {}), ONLY: f"{mach['cpu']}, {kind}"}
        details = {**old.get("details", {}), **details, "full_run_date": full_date, "partial_runs": parts,
                   "partial_run_cpus": cpus, "last_part": ONLY,
                   "partial_run": "; ".join(f"{p}.* measured {d}" for p, d in sorted(parts.items()))
                                  + f"; other figures from the full run of {full_date}"}
    doc = {**results, "machine": mach, "details": details, "quick": QUICK, "seconds": round(seconds, 1),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    doc["by_cpu"] = by_cpu_kind(previous, measured, details, mach, doc["date"], opts)
    with open(os.path.join(OUT, "latest.json"), "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
    lines = [f"# Benchmark results ({'quick' if QUICK else 'full'} run, {doc['date']})", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, fp32 matmul {mach['fp32_gflops']} GFLOP/s, "
             f"bf16 matmul {mach['bf16_gflops']} GFLOP/s (native bf16: {mach['native_bf16']}).", "",
             "| figure | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in sorted(results.items())]
    kinds = doc["by_cpu"]
    keys = sorted({k for e in kinds.values() for k in e["figures"]})
    if kinds:
        lines += ["", "## Per CPU kind (each column one run on one machine)", "",
                  "| figure | " + " | ".join(f"{kind} ({e['machine'].get('cpu', '?')}, {e['date']})"
                                             for kind, e in sorted(kinds.items())) + " |",
                  "|---|" + "---|" * len(kinds)]
        lines += [f"| `{k}` | " + " | ".join(str(e["figures"].get(k, "")) for _, e in sorted(kinds.items())) + " |"
                  for k in keys]
    with open(os.path.join(OUT, "latest.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    if os.path.abspath(OUT) == os.path.join(REPO, "bench", "results"):  # the committed results: the docs follow
        from dpr_lib.docgen import write_results_page

        log(f"wrote {write_results_page(os.path.join(OUT, 'latest.json'))}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = {k: v for k, v in results.items() if "ratio" in k}
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.5 * len(ratios)))
    ax.barh(list(ratios), list(ratios.values()), color="#4477aa")
    ax.axvline(1.0, color="grey", lw=1)
    ax.set_xlabel("ratio (this product ÷ baseline, same run)")
    ax.set_title(f"dpr_lib benchmark ratios — {mach['cpu']}, {mach['cores']} cores")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "ratios.png"), dpi=100)


def main(opts: argparse.Namespace) -> int:
    # the parts read BENCH_QUICK / BENCH_OUT when imported: parse_args has set them
    from choice_bench import bench_choice
    from cluster_bench import bench_cluster
    from common import OUT, QUICK, REPO, SQUAD, log, machine
    from encode_bench import bench_encode
    from index_bench import bench_driver_rss, bench_index, bench_search_single
    from nightly_bench import bench_nightly
    from nightly_scale import bench_nightly_changefeed, bench_nightly_scale
    from peer_bench import bench_peer
    from scale import bench_scale
    from serve_bench import bench_serve
    from soak_bench import bench_soak
    from sparse_bench import bench_sparse

    from dpr_lib.cli import setup_logging
    from dpr_lib.config import load_config
    from dpr_lib.index import build_index
    from dpr_lib.spark import get_session

    ONLY = opts.only
    if not os.path.isdir(SQUAD):
        print(f"bench needs the SQuAD files under {SQUAD}", file=sys.stderr)
        return 2
    setup_logging(False)
    t0 = time.time()
    results: dict = {}
    details: dict = {}
    mach = machine()
    log(f"machine: {mach}")
    if ONLY == "cluster":
        bench_cluster(results, details)
        write_report(results, details, mach, time.time() - t0, opts)
        print(open(os.path.join(OUT, "latest.md")).read())
        return 0
    spark = get_session(load_config(os.path.join(REPO, "conf", "local.yaml"),
                                    ["spark.conf={spark.ui.enabled: 'false', spark.driver.memory: 6g}"]))
    # parts that need nothing from encode
    standalone = {"scale": bench_scale, "nightly": bench_nightly, "nightly_scale": bench_nightly_scale,
                  "nightly_changefeed": bench_nightly_changefeed, "sparse": bench_sparse, "peer": bench_peer,
                  "choice": bench_choice, "soak": bench_soak}
    if ONLY in standalone:
        standalone[ONLY](spark, results, details)
        spark.stop()
        write_report(results, details, mach, time.time() - t0, opts)
        print(open(os.path.join(OUT, "latest.md")).read())
        return 0
    enc_cfg, emb = bench_encode(spark, results, details, mach)
    if ONLY:
        results = {k: v for k, v in results.items() if k.startswith(ONLY + ".")}
        details.pop("encode", None)
    if not ONLY:
        build_index(spark, enc_cfg)  # the SQuAD index for single-question latency
        bench_search_single(enc_cfg, results)
        bench_index(spark, enc_cfg, emb, results, details)
        bench_nightly(spark, results, details)
        if not QUICK:  # ~25 min: 1.08M Wikipedia passages, twice over
            bench_nightly_scale(spark, results, details)
            bench_sparse(spark, results, details)  # ~15 min: BM25 over 1.08M and 270k passages
            bench_peer(spark, results, details)  # ~5 min: sentence-transformers as the judge, msmarco
            bench_choice(spark, results, details)  # ~3 min: the served retriever's choice on 43 queries
            bench_soak(spark, results, details)  # ~30 min: 30 nights on 100k passages under load
        bench_scale(spark, results, details)
    if ONLY == "index":
        bench_index(spark, enc_cfg, emb, results, details)
    if ONLY in ("", "serve"):
        bench_serve(spark, enc_cfg, emb, results, details)
    spark.stop()
    if ONLY in ("", "index"):
        bench_driver_rss(emb, results, details)
    if not ONLY and not QUICK:
        bench_cluster(results, details)
    write_report(results, details, mach, time.time() - t0, opts)
    log(f"done in {time.time() - t0:.0f}s -> {OUT}/latest.json")
    print(open(os.path.join(OUT, "latest.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
