"""spark-submit entry point, the merge job: Embeddings -> a published, sharded FAISS index version."""

import sys

from dpr_lib.cli import run_job


def main(cfg, args):
    from dpr_lib.index import build_index
    from dpr_lib.spark import get_session

    manifest = build_index(get_session(cfg), cfg, force=args.force)
    return {k: getattr(manifest, k) for k in ("version", "factory", "nprobe", "recall", "validation", "gate",
                                              "totals", "timings")}


if __name__ == "__main__":
    sys.exit(run_job("Train FAISS IVF, build shards on executors, publish a version with a manifest.", main,
                     lambda p: p.add_argument("--force", action="store_true",
                                              help="publish even if the quality gate finds a regression")))
