"""Reranking slot: the trained relevance classifier (cross-encoder) when one is registered
reorders the candidates. Without one the fused hybrid order is KEPT and each chunk is scored by
the bi-encoder cosine between the question and its stored vector (the weak-evidence gate and
the score shown): reordering by that cosine measured 5 nDCG@10 points below the hybrid order on
medquad-dev (0.666 vs 0.716, `rag eval ranking --datasets medquad-dev --limit 0`), the
training-side split used for such choices. `reorder=True` reranks by cosine anyway.

With a classifier, the order is a convex combination of its min-max normalised scores and the
hybrid scores of the same candidates (`weight` = the classifier's share; 1.0 = the classifier
alone). The first-stage evidence is not thrown away: a classifier trained mostly on one kind of
question cannot undo a hybrid order that is already right for another kind. The score kept on
each chunk (the weak-evidence gate, the score shown) is still the classifier's."""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .index import ChunkIndex
from .retrieve import minmax
from .types import Chunk

# A score below these means the best evidence is weak: cosine for the bi-encoder (off-topic
# questions score ~0.1-0.2 on the medical corpus; `rag eval retrieval` prints the share of real
# questions that fall below it), probability for the classifier.
COSINE_WEAK = 0.35
CLASSIFIER_WEAK = 0.5
# The classifier's share when its scores are fused with the hybrid scores, chosen on the
# training side's validation questions, never on the held-out splits: the best mean nDCG@10 of
# medquad-val and pubmedqa-val with neither more than 1 point below the hybrid order, applied by
# `rag eval choose-weight results/rerank_weight_val_c.json` (a sweep of `rag eval ranking
# --datasets medquad-val,pubmedqa-val --limit 100 --model NAME --weights 0.2,0.3,...,1`). For
# the default recipe's classifier (2,400 queries, 600 steps; relevance_c_manifest.json) 0.3 is
# the pick: 0.4 drops pubmedqa-val 1.1 points. Earlier, 600-query classifiers (v2, v5) gave the
# same joint pick (results/rerank_weight_choice.json). Alone (weight 1) a classifier loses
# about 15 points on pubmedqa-val.
RERANK_WEIGHT = 0.3


def fuse_scores(classifier: np.ndarray, hybrid: np.ndarray, weight: float) -> np.ndarray:
    """weight * minmax(classifier) + (1 - weight) * minmax(hybrid) over one query's candidates
    (a constant list normalises to 1, as in the hybrid's own cc fusion)."""
    return weight * minmax(classifier) + (1.0 - weight) * minmax(hybrid)


class Reranker:
    def __init__(self, index: ChunkIndex, embedder, model: str | None = None,
                 weak_threshold: float | None = None, reorder: bool | None = None,
                 weight: float | None = None):
        self.index = index
        self.embedder = embedder
        self.model_ref = model
        self._cross = None
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.cache_size = 4096  # (question, chunk id) -> classifier score
        self.reorder = bool(model) if reorder is None else reorder
        self.weight = RERANK_WEIGHT if weight is None else float(weight)
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"rerank weight={self.weight} is invalid: use 0..1 (the "
                             "classifier's share; 1 = classifier alone)")
        self.kind = "cross-encoder" if model else ("bi-encoder" if self.reorder
                                                   else "hybrid order")
        self.weak_threshold = weak_threshold if weak_threshold is not None else (
            CLASSIFIER_WEAK if model else COSINE_WEAK)

    @property
    def cross_encoder(self):
        if self._cross is None:
            from sentence_transformers import CrossEncoder

            try:
                self._cross = CrossEncoder(self.model_ref, device="cpu")
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load relevance classifier {self.model_ref!r} ({e}): "
                                 "pass a valid cross-encoder folder, or unset it to rerank "
                                 "with the bi-encoder") from None
        return self._cross

    def score(self, question: str, chunks: list[Chunk],
              query_vec: np.ndarray | None = None) -> np.ndarray:
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        if self.model_ref:
            return self._cross_scores(question, chunks)
        if query_vec is None:
            query_vec = self.embedder.encode([question])[0]
        if self.index.faiss is None:  # provisional keyword-only index: embed the candidates
            vecs = self.embedder.encode([c.text for c in chunks])
        else:
            vecs = self.index.vectors([self.index.row_of(c.id) for c in chunks])
        return vecs @ np.asarray(query_vec, dtype=np.float32)

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def _cross_scores(self, question: str, chunks: list[Chunk]) -> np.ndarray:
        """Classifier scores, cached per (question, chunk): asking again, or answering the same
        question with another generator (base vs tuned, QA evaluation), scores nothing twice."""
        with self._cache_lock:
            known = {c.id: self._cache[(question, c.id)] for c in chunks
                     if (question, c.id) in self._cache}
        todo = [c for c in chunks if c.id not in known]
        if todo:
            pairs = [(question, f"{c.title}\n{c.text}") for c in todo]
            new = np.asarray(self.cross_encoder.predict(pairs, show_progress_bar=False),
                             dtype=np.float32).reshape(-1)
            with self._cache_lock:
                for c, v in zip(todo, new):
                    known[c.id] = float(v)
                    self._cache[(question, c.id)] = float(v)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return np.array([known[c.id] for c in chunks], dtype=np.float32)

    def rerank(self, question: str, chunks: list[Chunk], top_k: int,
               query_vec: np.ndarray | None = None) -> list[Chunk]:
        if not self.reorder:  # keep the given (fused) order; score only what is returned
            chunks = chunks[:top_k]
        scores = self.score(question, chunks, query_vec)
        order = self.order(scores, chunks)[:top_k] if self.reorder else range(len(chunks))
        return [chunks[i].with_score(float(scores[i]), "rerank") for i in order]

    def order(self, scores: np.ndarray, chunks: list[Chunk],
              weight: float | None = None) -> np.ndarray:
        """Candidate positions, best first: by the classifier fused with the hybrid scores (a
        trained model), or by the scores alone (bi-encoder cosine)."""
        w = self.weight if weight is None else weight
        if self.model_ref and w < 1.0 and chunks:
            scores = fuse_scores(scores, np.array([c.score for c in chunks]), w)
        return np.argsort(-np.asarray(scores), kind="stable")
