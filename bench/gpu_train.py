"""Training recipes on a GPU machine (no Spark there): train with dpr_lib.train on mined SQuAD data,
then dense exact top-k on SQuAD dev part a through dpr_lib's own encoder and answer matching.
Writes <out>/<recipe>.json (metrics, timings) and <out>/<recipe>.npz (top-100 scores and pids, so
the hybrid with BM25 can be computed where bm25s is installed).

    python bench/gpu_train.py --data D --model M --passages P --dev dev.json --out OUT recipe=k=v,k=v ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--passages", required=True, help="Passages table (Parquet) of the dev corpus")
    parser.add_argument("--dev", required=True, help="SQuAD dev JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("recipes", nargs="+", help="name=key=value,key=value (train.* keys without the prefix)")
    args = parser.parse_args()

    import shutil
    import tempfile

    import torch

    from dpr_lib import encoder
    from dpr_lib.bm25 import Passages
    from dpr_lib.cli import setup_logging
    from dpr_lib.config import load_config
    from dpr_lib.datasets import load_squad
    from dpr_lib.encoder import get_encoder, resolve_spec
    from dpr_lib.metrics import qa_metrics
    from dpr_lib.train import train_encoder

    setup_logging()
    os.makedirs(args.out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="gpu_train_")        # models and work dirs stay off <out>
    ds = load_squad(args.dev, os.path.join(scratch, "dev"))
    table = Passages(args.passages)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu'}; {len(ds.questions)} dev questions, "
          f"{len(table)} passages", flush=True)
    for recipe in args.recipes:
        name, _, spec = recipe.partition("=")
        sets = [f"train.{kv}" for kv in spec.split(",") if kv]
        cfg = load_config(None, [f"encoder.model={args.model}", f"paths.work_dir={scratch}/w-{name}",
                                 f"paths.cache_dir={scratch}/cache", f"train.device={dev}", *sets])
        t0 = time.time()
        result = train_encoder(None, cfg, args.data, os.path.join(scratch, f"model-{name}"))
        train_s = time.time() - t0
        ecfg = load_config(None, [f"encoder.model={result['model']}", f"encoder.question_model={result['question_model']}",
                                  f"encoder.device={dev}", "encoder.dtype=fp32"])
        penc = get_encoder(resolve_spec(ecfg.encoder, f"{scratch}/cache", role="passage"))
        qenc = get_encoder(resolve_spec(ecfg.encoder, f"{scratch}/cache", role="question"))
        pv = penc.encode(table.titles, table.texts)
        qv = qenc.encode(None, [q.text for q in ds.questions])
        scores = torch.from_numpy(qv).to(dev) @ torch.from_numpy(pv).to(dev).T
        top_s, top_i = scores.topk(100, dim=1)
        pids = table.pids[top_i.cpu().numpy()]
        metrics = qa_metrics(table, ds.questions, pids, 100)["metrics"]
        rep = {"recipe": name, "sets": sets, "train_seconds": round(train_s, 1), "steps": result["steps"],
               "validation": result["validation"], "dense_exact": {k: round(v, 4) for k, v in metrics.items()
                                                                     if k.startswith("top")}}
        print(json.dumps(rep), flush=True)
        with open(os.path.join(args.out, f"{name}.json"), "w") as fh:
            json.dump(rep, fh, indent=2)
        np.savez_compressed(os.path.join(args.out, f"{name}.npz"), scores=top_s.cpu().numpy(), pids=pids)
        shutil.rmtree(os.path.join(scratch, f"model-{name}"), ignore_errors=True)

        encoder.clear_cache()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
