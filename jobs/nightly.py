"""spark-submit entry point for scheduled runs: incremental reindexing (see dpr_lib.nightly).

Exit code 0 only when a version was published; non-zero with the reason otherwise.
"""

import sys

from dpr_lib.cli import run_job


def main(cfg, args):
    from dpr_lib.nightly import run_nightly
    from dpr_lib.spark import get_session

    report = run_nightly(get_session(cfg), cfg, force=args.force, compact=args.compact,
                         changes=args.changes)
    print(report["summary"], flush=True)
    return report


def extra(parser):
    parser.add_argument("--force", action="store_true", help="publish even if the snapshot shrank past nightly.max_shrink or the quality gate "
                        "found a regression")
    parser.add_argument("--compact", action="store_true", help="publish a fresh full version (re-shard every vector) "
                        "instead of a delta segment, whatever nightly.compact_ratio says")
    parser.add_argument("--changes", metavar="URL", default=None,
                        help="apply this change set (JSON Lines / Parquet rows: op = upsert | delete, id, title, text; "
                        "or table:<name>) to the previous run instead of reading the whole corpus.input snapshot")


if __name__ == "__main__":
    sys.exit(run_job("Incremental nightly reindexing: re-encode only changed passages, publish atomically.", main, extra))
