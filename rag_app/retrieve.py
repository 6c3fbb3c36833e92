"""Dense (FAISS) and BM25 retrieval, fused (convex combination of normalised scores, or
reciprocal rank fusion) -> scored Chunks."""
from __future__ import annotations

import os

import faiss
import numpy as np

from .config import RETRIEVAL_MODES, RetrievalConfig
from .index import ChunkIndex, _bm25_tokens
from .types import Chunk

_CPUS = os.cpu_count() or 1


def rrf_fuse(rankings: list[list[int]], k: int = 60,
             weights: list[float] | None = None) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: sum over rankings of weight / (k + rank), rank starting at 1
    (equal weights: the classic RRF)."""
    weights = weights or [1.0] * len(rankings)
    scores: dict[int, float] = {}
    for ranking, w in zip(rankings, weights):
        for rank, row in enumerate(ranking, start=1):
            scores[row] = scores.get(row, 0.0) + w / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def minmax(values) -> np.ndarray:
    """Scores min-max normalised to [0, 1] (best 1); a constant list normalises to 1."""
    x = np.asarray(values, dtype=np.float64)
    span = x.max() - x.min() if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.ones_like(x)


def cc_fuse(scored: list[list[tuple[int, float]]],
            weights: list[float] | None = None) -> list[tuple[int, float]]:
    """Convex combination fusion: each list's scores are min-max normalised over that list
    (best 1, worst 0), then summed with the weights; a row missing from a list gets 0 there."""
    weights = weights or [1.0 / len(scored)] * len(scored)
    fused: dict[int, float] = {}
    for rows, w in zip(scored, weights):
        if not rows:
            continue
        for (row, _), norm in zip(rows, minmax([s for _, s in rows])):
            fused[row] = fused.get(row, 0.0) + w * float(norm)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


class Retriever:
    def __init__(self, index: ChunkIndex, embedder, config: RetrievalConfig = RetrievalConfig()):
        self.index = index
        self.embedder = embedder
        self.config = config

    def dense_rows(self, queries: list[str], k: int,
                   query_vecs: np.ndarray | None = None) -> list[list[tuple[int, float]]]:
        vecs = self.embedder.encode(queries) if query_vecs is None else query_vecs
        k = min(k, len(self.index))
        # a few queries: one FAISS thread. Its OpenMP workers would otherwise spin after the
        # search and slow the next query embedding (torch's own pool) on a 2-core machine
        faiss.omp_set_num_threads(1 if len(vecs) <= 8 else _CPUS)
        scores, rows = self.index.faiss.search(np.ascontiguousarray(vecs, dtype=np.float32), k)
        return [[(int(r), float(s)) for r, s in zip(rr, ss) if r >= 0]
                for rr, ss in zip(rows, scores)]

    def bm25_rows(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        k = min(k, len(self.index))
        out = []
        for toks in _bm25_tokens(queries):
            toks = [t for t in toks if t in self.index.bm25.vocab_dict]
            if not toks:
                out.append([])
                continue
            rows, scores = self.index.bm25.retrieve([toks], k=k, show_progress=False,
                                                    n_threads=1)
            out.append([(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if s > 0])
        return out

    def search_batch(self, queries: list[str], k: int | None = None, mode: str | None = None,
                     query_vecs: np.ndarray | None = None) -> list[list[Chunk]]:
        """Top-k chunks per query. Each chunk's `scores` holds what each retriever gave it."""
        mode = mode or self.config.mode
        if mode not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval mode {mode!r} is invalid: choose one of "
                             f"{RETRIEVAL_MODES}")
        k = k or self.config.top_k
        n_cand = max(k, self.config.candidates)
        dense = self.dense_rows(queries, n_cand, query_vecs) if mode != "bm25" else None
        sparse = self.bm25_rows(queries, n_cand) if mode != "dense" else None
        results = []
        for qi in range(len(queries)):
            d = dict(dense[qi]) if dense is not None else {}
            b = dict(sparse[qi]) if sparse is not None else {}
            if mode == "dense":
                ranked = dense[qi]
            elif mode == "bm25":
                ranked = sparse[qi]
            else:
                w = self.config.weight
                if self.config.fusion == "cc":
                    ranked = cc_fuse([dense[qi], sparse[qi]], [w, 1.0 - w])
                else:
                    ranked = rrf_fuse([[r for r, _ in dense[qi]], [r for r, _ in sparse[qi]]],
                                      self.config.rrf_k, [w, 1.0 - w])
            chunks = []
            for row, score in ranked[:k]:
                c = self.index.chunks[row].with_score(score, mode)
                if row in d:
                    c.scores["dense"] = d[row]
                if row in b:
                    c.scores["bm25"] = b[row]
                chunks.append(c)
            results.append(chunks)
        return results

    def search(self, query: str, k: int | None = None, mode: str | None = None) -> list[Chunk]:
        return self.search_batch([query], k, mode)[0]
