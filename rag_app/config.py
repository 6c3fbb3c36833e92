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


DENSE_WEIGHT = 0.7


@dataclass(frozen=True)
class RetrievalConfig:
    mode: str = "hybrid"
    top_k: int = 5  # sources given to the generator
    candidates: int = 50  # per retriever, before fusion and reranking
    rrf_k: int = 60
    # share of the dense ranking in the fusion (0.5 = classic RRF). Chosen on the medquad-dev
    # split (training side, never an evaluation set): `rag eval retrieval --dataset
    # medquad-dev --dense-weight W` for W in 0.5..0.8
    dense_weight: float = DENSE_WEIGHT
    weak_threshold: float = 0.35  # best rerank score below this = weak evidence

    def __post_init__(self):
        _check(self.mode in RETRIEVAL_MODES, "retrieval mode", self.mode,
               f"choose one of {RETRIEVAL_MODES}")
        _check(1 <= self.top_k <= 50, "top_k", self.top_k, "use 1..50")
        _check(self.candidates >= self.top_k, "candidates", self.candidates, "use >= top_k")
        _check(self.rrf_k > 0, "rrf_k", self.rrf_k, "use a positive integer")
        _check(0.0 <= self.dense_weight <= 1.0, "dense_weight", self.dense_weight, "use 0..1")


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
