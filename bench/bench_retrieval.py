"""Retrieval latency p50/p95 per query on the default index: flat FAISS, HNSW, a numpy
brute-force baseline (dense only), BM25, the query embedding (the app's query backend, and plain sentence-transformers as the
baseline), and the full hybrid path (query embedding + dense + BM25 + fusion).
Target: hybrid p50 < 30 ms on 2 cores.

    python bench/bench_retrieval.py [--index default] [--queries 200]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from common import percentile, save, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", default="default")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=50)
    args = ap.parse_args()
    from rag_app.config import shared_data_dir
    from rag_app.index import make_faiss
    from rag_app.pipeline import RagPipeline

    pipe = RagPipeline(args.index, build_if_missing=True)
    index, emb, retr = pipe.index, pipe.embedder, pipe.retriever
    qs = [json.loads(line)["question"] for line in
          open(shared_data_dir() / "pubmedqa" / "pqal_trainval.jsonl")][: args.queries]
    from rag_app.embed import SentenceTransformerEmbedder

    plain = SentenceTransformerEmbedder(index.meta["embedder"].get("ref", "default")).warm_up()
    qv = emb.encode(qs)
    all_vecs = index.vectors(list(range(len(index))))
    hnsw = make_faiss("hnsw", all_vecs.shape[1], len(index))
    _, build_s = timed(hnsw.add, all_vecs)
    lat: dict[str, list[float]] = {k: [] for k in
                                   ("numpy", "flat", "hnsw", "bm25", "embed_query_st",
                                            "embed_query", "hybrid")}
    # one method at a time over all queries: interleaving them let one library's idle
    # OpenMP/BLAS workers (numpy, FAISS) spin into the next method's time
    for q, v in zip(qs, qv):
        lat["numpy"].append(timed(lambda: np.argsort(-(all_vecs @ v))[: args.k])[1])
    for v in qv:
        lat["flat"].append(timed(index.faiss.search, v[None, :], args.k)[1])
    for v in qv:
        lat["hnsw"].append(timed(hnsw.search, v[None, :], args.k)[1])
    for q in qs:
        lat["bm25"].append(timed(retr.bm25_rows, [q], args.k)[1])
    for q in qs:
        lat["embed_query_st"].append(timed(plain.encode, [q])[1])
    for q in qs:
        lat["embed_query"].append(timed(emb.encode, [q])[1])
    for q in qs:
        lat["hybrid"].append(timed(retr.search, q, args.k, "hybrid")[1])
    flat_top = index.faiss.search(qv, 10)[1]
    hnsw_top = hnsw.search(qv, 10)[1]
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(flat_top, hnsw_top)]))
    print(f"index {args.index}: {len(index)} chunks, {len(qs)} queries, k={args.k}")
    res = {}
    for name, xs in lat.items():
        p50, p95 = percentile(xs, 50) * 1000, percentile(xs, 95) * 1000
        res[name] = {"p50_ms": p50, "p95_ms": p95}
        print(f"{name:12s} p50 {p50:8.2f} ms   p95 {p95:8.2f} ms")
    print(f"flat vs numpy p50 ratio : {res['numpy']['p50_ms'] / res['flat']['p50_ms']:.1f}x faster")
    print(f"hnsw vs numpy p50 ratio : {res['numpy']['p50_ms'] / res['hnsw']['p50_ms']:.1f}x faster"
          f"   (hnsw recall@10 vs flat {recall:.3f}, built in {build_s:.1f}s)")
    backend = f"{emb.backend}/{emb.precision}"
    speed = res["embed_query_st"]["p50_ms"] / res["embed_query"]["p50_ms"]
    print(f"query embedding ({backend}) vs plain sentence-transformers p50: {speed:.2f}x faster")
    print(f"hybrid p50 {res['hybrid']['p50_ms']:.1f} ms (target < 30 ms)")
    save("retrieval_latency", {"index": args.index, "chunks": len(index), "k": args.k,
                               "query_backend": backend, "query_embed_speedup": speed,
                               "latency": res, "hnsw_recall_at_10": recall})


if __name__ == "__main__":
    main()
