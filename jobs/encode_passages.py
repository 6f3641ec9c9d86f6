"""spark-submit entry point: Passages -> Embeddings through the passage encoder (see dpr_lib.encode)."""

import sys

from dpr_lib.cli import run_job


def main(cfg, args):
    from dpr_lib.encode import encode_passages
    from dpr_lib.spark import get_session

    stats = encode_passages(get_session(cfg), cfg)
    stats.pop("tasks", None)
    return stats


if __name__ == "__main__":
    sys.exit(run_job("Encode the Passages table into the Embeddings table.", main))
