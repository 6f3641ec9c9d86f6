"""spark-submit entry point: DPR training records (positive + BM25 hard negatives) from a QA dataset.

    python jobs/build_training_data.py --dataset train-v1.1.json --format squad --out work/train/data
"""

import sys

from dpr_lib.cli import run_job


def main(cfg, args):
    from dpr_lib.spark import get_session
    from dpr_lib.train_data import build_training_data

    return build_training_data(lambda: get_session(cfg), cfg, args.dataset, args.format, args.out, args.passages,
                               args.passages_table)


def extra(parser):
    parser.add_argument("--dataset", required=True, help="SQuAD JSON, or DPR retriever JSON / .qa.csv")
    parser.add_argument("--format", required=True, choices=["squad", "dpr"])
    parser.add_argument("--out", required=True, help="output directory or URL: data/ (JSON Lines), no_positive/, "
                                                     "stats.json, work/")
    parser.add_argument("--passages", default=None, help="corpus file for the dataset (DPR TSV or JSONL)")
    parser.add_argument("--passages-table", default=None, help="an existing Passages table (Parquet) to mine")


if __name__ == "__main__":
    sys.exit(run_job("Build DPR training data (BM25 hard negatives) from a QA dataset.", main, extra))
