"""Small validated configuration dataclasses and the project's paths."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def indexes_dir() -> Path:
    return Path(os.environ.get("RAG_INDEXES_DIR", REPO_ROOT / "indexes"))


def models_dir() -> Path:
    return Path(os.environ.get("RAG_MODELS_DIR", REPO_ROOT / "models"))


def shared_data_dir() -> Path:
    return Path(os.environ.get("RAG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _check(cond: bool, name: str, value, fix: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: {fix}")


@dataclass(frozen=True)
class ChunkConfig:
    size: int = 256  # word pieces per chunk, special tokens included (the embedder's window)
    overlap: int = 32

    def __post_init__(self):
        _check(self.size >= 16, "chunk size", self.size, "use at least 16 tokens")
        _check(0 <= self.overlap < self.size // 2, "chunk overlap", self.overlap,
               f"use 0 <= overlap < size/2 (= {self.size // 2})")


INDEX_TYPES = ("flat", "hnsw", "ivf")
RETRIEVAL_MODES = ("hybrid", "dense", "bm25")


FUSIONS = ("cc", "rrf")
# the dense share of each fusion, chosen on the medquad-dev split (training side, never an
# evaluation set): `rag eval retrieval --dataset medquad-dev --fusion F --dense-weight W`.
# nDCG@10 there: dense 0.665, bm25 0.606; rrf 0.675/0.679/0.686/0.687 at w=0.5/0.6/0.7/0.8
# (0.7 kept: recall@100 0.960 vs 0.923 at 0.8); cc 0.711/0.716/0.715/0.704 at w=0.4/0.5/0.6/0.7
FUSION_WEIGHTS = {"cc": 0.5, "rrf": 0.7}
DENSE_WEIGHT = FUSION_WEIGHTS["cc"]


@dataclass(frozen=True)
class RetrievalConfig:
    mode: str = "hybrid"
    top_k: int = 5  # sources given to the generator
    candidates: int = 50  # per retriever, before fusion and reranking
    # "cc": convex combination of the min-max normalised dense and BM25 scores of each
    # query's candidates (Bruch et al. 2023, "An analysis of fusion functions for hybrid
    # retrieval"); "rrf": weighted reciprocal rank fusion (weight 0.5 = classic RRF)
    fusion: str = "cc"
    rrf_k: int = 60
    dense_weight: float | None = None  # None: FUSION_WEIGHTS[fusion]
    weak_threshold: float = 0.35  # best rerank score below this = weak evidence

    def __post_init__(self):
        _check(self.mode in RETRIEVAL_MODES, "retrieval mode", self.mode,
               f"choose one of {RETRIEVAL_MODES}")
        _check(1 <= self.top_k <= 50, "top_k", self.top_k, "use 1..50")
        _check(self.candidates >= self.top_k, "candidates", self.candidates, "use >= top_k")
        _check(self.rrf_k > 0, "rrf_k", self.rrf_k, "use a positive integer")
        _check(self.fusion in FUSIONS, "fusion", self.fusion, f"choose one of {FUSIONS}")
        _check(self.dense_weight is None or 0.0 <= self.dense_weight <= 1.0, "dense_weight",
               self.dense_weight, "use 0..1")

    @property
    def weight(self) -> float:
        """The dense share used by the fusion."""
        return FUSION_WEIGHTS[self.fusion] if self.dense_weight is None else self.dense_weight


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 160
    max_prompt_tokens: int = 1536
    temperature: float = 0.0  # 0 = greedy
    repetition_penalty: float = 1.0  # > 1 also penalises copying the sources' words
    max_question_chars: int = 2000

    def __post_init__(self):
        _check(1 <= self.max_new_tokens <= 2048, "max_new_tokens", self.max_new_tokens,
               "use 1..2048")
        _check(self.temperature >= 0, "temperature", self.temperature, "use >= 0")
        _check(self.max_question_chars >= 10, "max_question_chars", self.max_question_chars,
               "use >= 10")
