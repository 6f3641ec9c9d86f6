"""`BENCH_ONLY=peer`: sentence-transformers as the judge of the product's dense retrieval.

The BEIR-format MS MARCO subset (5,000 passages, 43 judged queries, judgments made binary as the
evaluator reads them), documents kept whole
(``corpus.words=200``: the longest has 185 words), the bundled all-MiniLM-L6-v2 in fp32 with its
own conventions (``title + " " + text``, no prompt, mean pooling, normalised): the product's
evaluation job (Spark corpus stage, encode job, exact dense top-k) against sentence-transformers'
own ``InformationRetrievalEvaluator`` on the same documents and queries. Figures: both nDCG@10,
their difference, and the share of queries whose top-10 documents are the same set. Then, on
SQuAD dev part a, the top-20 cost of the input template and of a Matryoshka truncation to 256.
"""

from __future__ import annotations

import json
import os

import numpy as np
from common import QUICK, REPO, WORK, log

BEIR = os.path.join(os.path.dirname(REPO), "shared", "data", "beir", "msmarco")
OUT = os.path.join(WORK, "peer")
PEER_KEYS = frozenset({"encode.peer_ndcg10_diff", "encode.peer_top10_agreement", "encode.peer_ndcg10_ours",
                       "encode.peer_ndcg10_sentence_transformers", "encode.matryoshka_bytes_ratio",
                       "encode.matryoshka_top20_retention", "encode.template_top20_vs_pair"})
SQUAD_DEV = os.path.join(os.path.dirname(REPO), "shared", "data", "squad", "dev-v1.1-part-a.json")


def read_beir() -> tuple[dict, dict, dict]:
    corpus = {d["_id"]: d for d in map(json.loads, open(os.path.join(BEIR, "corpus.jsonl"), encoding="utf-8"))}
    queries = {d["_id"]: d["text"] for d in map(json.loads, open(os.path.join(BEIR, "queries.jsonl"), encoding="utf-8"))}
    qrels: dict[str, dict[str, int]] = {}
    for line in open(os.path.join(BEIR, "qrels", "test.tsv"), encoding="utf-8"):
        parts = line.split()
        if len(parts) == 3 and parts[2].lstrip("-").isdigit():
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return corpus, {q: t for q, t in queries.items() if q in qrels}, qrels


def binary_copy(dest: str) -> str:
    """The subset with its judgments made binary (relevance > 0 -> 1): corpus and queries linked."""
    os.makedirs(os.path.join(dest, "qrels"), exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not os.path.exists(os.path.join(dest, name)):
            os.symlink(os.path.join(BEIR, name), os.path.join(dest, name))
    with open(os.path.join(dest, "qrels", "test.tsv"), "w", encoding="utf-8") as fh:
        for line in open(os.path.join(BEIR, "qrels", "test.tsv"), encoding="utf-8"):
            q, d, r = line.split()
            if int(r) > 0:
                fh.write(f"{q}\t{d}\t1\n")
    return dest


def trec_top10(path: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in open(path, encoding="utf-8"):
        qid, _, doc, rank, _, _ = line.split()
        out.setdefault(qid, []).append(doc)
    return out


def msmarco_config(out: str):
    """conf/local.yaml with the bundled model in torch fp32 and whole documents (the longest subset
    document has 185 words): the setup of every bench on the MS MARCO subset."""
    from dpr_lib.config import load_config

    return load_config(os.path.join(REPO, "conf", "local.yaml"), [
        "encoder.backend=torch", "encoder.dtype=fp32", "corpus.words=200", f"paths.cache_dir={out}/cache"])


def bench_peer(spark, results: dict, details: dict) -> None:
    if not os.path.isdir(BEIR):
        log(f"peer: {BEIR} not found; skipped")
        return
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from dpr_lib.encoder import default_model_dir
    from dpr_lib.evaluate import evaluate

    cfg = msmarco_config(OUT)
    # sentence-transformers' evaluator judges by sets of relevant documents: both sides get the
    # subset's graded judgments (1-3) as binary ones, so the two nDCG@10 measure the same thing
    report = evaluate(spark, cfg, binary_copy(os.path.join(OUT, "msmarco-binary")), "beir", os.path.join(OUT, "eval"),
                      k_max=10)
    ours = trec_top10(os.path.join(OUT, "eval", "runs", "dense_exact.trec"))
    corpus, queries, qrels = read_beir()
    st = SentenceTransformer(default_model_dir(), device="cpu")
    docs = {i: (d.get("title", "") + " " + d["text"]).strip() for i, d in corpus.items()}
    evaluator = InformationRetrievalEvaluator(queries, docs, {q: {d for d, r in rel.items() if r > 0}
                                                             for q, rel in qrels.items()},
                                              ndcg_at_k=[10], mrr_at_k=[10], accuracy_at_k=[10],
                                              precision_recall_at_k=[10], map_at_k=[10], show_progress_bar=False,
                                              batch_size=64, name="msmarco")
    scores = evaluator(st)
    st_ndcg = float(next(v for key, v in scores.items() if key.endswith("cosine_ndcg@10")))
    # sentence-transformers' top-10 of each query, exactly as its evaluator ranks (cosine, exact)
    ids = list(docs)
    dvec = st.encode([docs[i] for i in ids], batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    qids = list(queries)
    qvec = st.encode([queries[q] for q in qids], normalize_embeddings=True, convert_to_numpy=True)
    top = np.argsort(-(qvec @ dvec.T), axis=1)[:, :10]
    same = [set(ours.get(q, [])) == {ids[j] for j in top[n]} for n, q in enumerate(qids)]
    our_ndcg = report["retrievers"]["dense_exact"]["ndcg@10"]
    results.update({"encode.peer_ndcg10_ours": our_ndcg, "encode.peer_ndcg10_sentence_transformers": round(st_ndcg, 4),
                    "encode.peer_ndcg10_diff": round(abs(our_ndcg - st_ndcg), 4),
                    "encode.peer_top10_agreement": round(float(np.mean(same)), 4)})
    details["peer"] = {"queries": len(qids), "documents": len(docs), "encoding": report.get("encoding"),
                       "st_scores": {k: round(float(v), 4) for k, v in scores.items()}, "quick": QUICK,
                       "disagreeing_queries": [q for q, s in zip(qids, same) if not s][:20]}
    log(f"peer: nDCG@10 ours {our_ndcg} vs sentence-transformers {st_ndcg:.4f}; same top-10 for "
        f"{results['encode.peer_top10_agreement']:.3f} of {len(qids)} queries")
    bench_settings(spark, results, details)


def bench_settings(spark, results: dict, details: dict) -> None:
    """What the new encoder settings cost on SQuAD dev part a with the bundled model: the input
    template (the sentence-transformers convention, now auto's pick, against DPR's pair) and a
    Matryoshka truncation to 256 of 384 dimensions (all-MiniLM-L6-v2 was not trained for it)."""
    from dpr_lib.config import load_config
    from dpr_lib.evaluate import evaluate

    if not os.path.exists(SQUAD_DEV):
        return
    runs = {"pair": ["encoder.input_template=pair"], "template": [], "template_256": ["encoder.dimensions=256"]}
    top20, dims = {}, {}
    for name, sets in runs.items():
        cfg = load_config(os.path.join(REPO, "conf", "local.yaml"), [
            "encoder.backend=torch", "encoder.dtype=fp32", f"paths.cache_dir={OUT}/cache", *sets])
        report = evaluate(spark, cfg, SQUAD_DEV, "squad", os.path.join(OUT, f"squad-{name}"), k_max=100)
        top20[name] = report["retrievers"]["dense_exact"]["top20"]
        dims[name] = report["encoding"]["dim"]
    results.update({"encode.matryoshka_bytes_ratio": round(dims["template_256"] / dims["template"], 4),
                    "encode.matryoshka_top20_retention": round(top20["template_256"] / top20["template"], 4),
                    "encode.template_top20_vs_pair": round(top20["template"] / top20["pair"], 4)})
    details["encoder_settings"] = {"squad_dev_top20": top20, "dims": dims}
    log(f"peer: SQuAD dev top-20 pair {top20['pair']}, title+text {top20['template']}, truncated to 256 "
        f"{top20['template_256']}")
