"""spark-submit entry point: retrieval accuracy of the pipeline on a QA dataset vs BM25 and a hybrid.

    python jobs/evaluate.py --dataset dev-v1.1.json --format squad --out work/eval
"""

import sys

from dpr_lib.cli import run_job


def main(cfg, args):
    from dpr_lib.evaluate import evaluate, report_markdown
    from dpr_lib.spark import get_session

    report = evaluate(lambda: get_session(cfg), cfg, args.dataset, args.format, args.out, args.passages, args.qrels,
                      args.fusion, args.rrf_k, args.alpha, args.k, args.tune_fraction)
    print(report_markdown(report))
    print(f"report: {args.out}/report.json, {args.out}/report.md, {args.out}/topk.png")


def extra(parser):
    parser.add_argument("--dataset", required=True, help="SQuAD JSON, DPR retriever JSON / .qa.csv, or a BEIR dir")
    parser.add_argument("--format", required=True, choices=["squad", "dpr", "beir"])
    parser.add_argument("--out", required=True, help="output directory (report files; its work/ holds the stages)")
    parser.add_argument("--passages", default=None, help="dpr: passages file (DPR TSV id/text/title, or JSONL)")
    parser.add_argument("--qrels", default=None, help="beir: qrels TSV (default <dataset>/qrels/test.tsv)")
    parser.add_argument("--fusion", default="rrf", choices=["rrf", "linear"], help="hybrid fusion (default rrf)")
    parser.add_argument("--rrf-k", type=int, default=60, help="RRF constant (default 60)")
    parser.add_argument("--alpha", type=float, default=0.5, help="linear fusion: weight of the dense score")
    parser.add_argument("-k", type=int, default=100, help="depth of every ranked list (default 100)")
    parser.add_argument("--tune-fraction", type=float, default=0.0,
                        help="choose what to serve (dense, bm25, RRF k, linear alpha) on this random fraction of "
                             "the questions (seeded by index.seed) and score every retriever on the rest only; "
                             "adds 'recommended' to the report (default 0: no tuning, every question scored)")


if __name__ == "__main__":
    sys.exit(run_job("Evaluate retrieval accuracy (dense exact / IVF, BM25, hybrid) on a QA dataset.", main, extra))
