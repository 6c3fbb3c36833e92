"""Reranking latency: the trained cross-encoder vs bi-encoder-only reranking (cosine against
stored vectors), for 20 and 50 candidates. Prints p50/p95 per setting and the median ratio.
The cross-encoder is timed cold (its per-(question, chunk) score cache emptied before each
call) and, apart, warm: the second answer of the side-by-side view, served from that cache.

    .venv/bin/python bench/bench_rerank.py [--index eval] [--model tuned|NAME|PATH]
        [--queries 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

from common import median, percentile, save

from rag_app.datasets import pubmedqa_heldout_pmids, pubmedqa_records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", default="eval")
    ap.add_argument("--model", default="tuned", help="cross-encoder: tuned | name | path")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from rag_app.config import RetrievalConfig
    from rag_app.pipeline import RagPipeline
    from rag_app.rerank import Reranker
    from training.cli import resolve_model

    path = resolve_model(a.model)
    pipe = RagPipeline(a.index, retrieval=RetrievalConfig(candidates=50), reranker=None,
                       build_if_missing=False)
    held = pubmedqa_heldout_pmids()
    qs = sorted((r["pmid"], r["question"]) for r in pubmedqa_records() if r["pmid"] in held)
    qs = [q for _, q in qs[:a.queries]]
    bi = Reranker(pipe.index, pipe.embedder, None, reorder=True)
    ce = Reranker(pipe.index, pipe.embedder, path)
    ce.score(qs[0], pipe.retriever.search(qs[0], 5))  # load + warm up
    result = {"index": a.index, "model": path, "queries": len(qs), "repeats": a.repeats,
              "settings": {}}
    for n in (20, 50):
        times: dict[str, list[float]] = {"bi-encoder": [], "cross-encoder": [],
                                         "cross-encoder cached": []}
        for q in qs:
            cands = pipe.retriever.search(q, n)
            for _ in range(a.repeats):
                ce.clear_cache()
                for name, r in (("bi-encoder", bi), ("cross-encoder", ce),
                                ("cross-encoder cached", ce)):
                    t = time.perf_counter()
                    r.rerank(q, cands, 5)  # bi-encoder includes embedding the question
                    times[name].append((time.perf_counter() - t) * 1000)
        row = {k: {"p50_ms": round(median(v), 2), "p95_ms": round(percentile(v, 95), 2)}
               for k, v in times.items()}
        row["ratio_p50"] = round(row["cross-encoder"]["p50_ms"] / row["bi-encoder"]["p50_ms"], 1)
        result["settings"][str(n)] = row
        print(f"{n} candidates: bi-encoder p50 {row['bi-encoder']['p50_ms']:.1f} ms "
              f"p95 {row['bi-encoder']['p95_ms']:.1f} | cross-encoder p50 "
              f"{row['cross-encoder']['p50_ms']:.1f} ms p95 {row['cross-encoder']['p95_ms']:.1f}"
              f" | ratio {row['ratio_p50']}x | cached p50 "
              f"{row['cross-encoder cached']['p50_ms']:.1f} ms")
    save("rerank", result)


if __name__ == "__main__":
    main()
