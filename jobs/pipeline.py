"""spark-submit entry point: the whole pipeline (corpus -> encode -> index -> publish -> sample search)."""

import sys

from dpr_lib.cli import run_job


def main(cfg, args):
    from dpr_lib.pipeline import run_pipeline
    from dpr_lib.spark import get_session

    questions = args.question or None
    return run_pipeline(get_session(cfg), cfg, questions)


def extra(parser):
    parser.add_argument("--question", action="append", default=[], help="question to ask at the end (repeatable)")


if __name__ == "__main__":
    sys.exit(run_job("Run every stage on the configured corpus and publish an index version.", main, extra))
