"""spark-submit entry point: train DPR question/passage encoders (in-batch + hard negatives).

    python jobs/train_encoder.py --data work/train/data/data --out work/train/model
"""

import sys

from dpr_lib.cli import run_job


def main(cfg, args):
    from dpr_lib.spark import get_session
    from dpr_lib.train import train_encoder

    result = train_encoder(get_session(cfg), cfg, args.data, args.out, args.resume)
    result.pop("losses", None)
    return result


def extra(parser):
    parser.add_argument("--data", required=True, help="biencoder records: JSON Lines dir/file, or DPR's JSON list")
    parser.add_argument("--out", required=True, help="checkpoint root (local path or fsspec URL)")
    parser.add_argument("--resume", default=None, help="a checkpoint URL, or 'auto' for the newest under --out")


if __name__ == "__main__":
    sys.exit(run_job("Train DPR encoders with in-batch and hard negatives (TorchDistributor).", main, extra))
