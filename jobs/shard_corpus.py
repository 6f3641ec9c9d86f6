"""spark-submit entry point: raw corpus -> Passages table (see dpr_lib.corpus)."""

import sys

from dpr_lib.cli import run_job


def main(cfg, args):
    from dpr_lib.corpus import shard_corpus
    from dpr_lib.spark import get_session

    return shard_corpus(get_session(cfg), cfg)


if __name__ == "__main__":
    sys.exit(run_job("Split a corpus into DPR passages (Parquet).", main))
