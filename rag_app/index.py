"""FAISS + BM25 index on disk: build / add / save / load.

Layout of indexes/NAME/: index.faiss, chunks.jsonl, bm25/, meta.json. Every write goes to a
temporary sibling folder that is renamed into place, so an interrupted build or add leaves the
previous index intact and loadable.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from .config import INDEX_TYPES, ChunkConfig, indexes_dir
from .types import Chunk, Document

FORMAT_VERSION = 1


class IndexProblem(ValueError):
    """A missing, corrupt or mismatched index (a ValueError: it is the user's input)."""


def index_path(name: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"index name {name!r} is invalid: use letters, digits, - and _")
    return indexes_dir() / name


def corpus_fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode())
        h.update(hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()[:16]


def make_faiss(kind: str, dim: int, n: int) -> faiss.Index:
    if kind not in INDEX_TYPES:
        raise ValueError(f"index type {kind!r} is invalid: choose one of {INDEX_TYPES}")
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
        return index
    if kind == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(max(n, 1))), max(n // 39, 1)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = max(1, nlist // 8)
        return index
    return faiss.IndexFlatIP(dim)


def _bm25_tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class ChunkIndex:
    """Chunks + their dense vectors (FAISS) + a BM25 index, and the metadata that built them."""

    def __init__(self, chunks: list[Chunk], faiss_index: faiss.Index, bm25, meta: dict,
                 path: Path | None = None):
        self.chunks = chunks
        self.faiss = faiss_index
        self.bm25 = bm25
        self.meta = meta
        self.path = path

    def __len__(self) -> int:
        return len(self.chunks)

    # ---------- building ----------
    @classmethod
    def build(cls, chunks: list[Chunk], vectors: np.ndarray, embedder_meta: dict,
              chunking: ChunkConfig, docs: list[Document], kind: str = "flat",
              sources: list[str] | None = None) -> "ChunkIndex":
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        if not chunks:
            raise ValueError("no chunks to index: every input was empty or skipped")
        index = make_faiss(kind, vectors.shape[1], len(chunks))
        if kind == "ivf":
            index.train(vectors)
        index.add(vectors)
        meta = {
            "format_version": FORMAT_VERSION,
            "embedder": embedder_meta,
            "chunking": asdict(chunking),
            "index_type": kind,
            "corpus_fingerprint": corpus_fingerprint(docs),
            "n_documents": len({c.doc_id for c in chunks}),
            "n_chunks": len(chunks),
            "sources": sources or [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return cls(chunks, index, cls._make_bm25(chunks), meta)

    @classmethod
    def keyword_only(cls, chunks: list[Chunk], docs: list[Document],
                     embedder_meta: dict | None = None) -> "ChunkIndex":
        """A provisional in-memory index with BM25 and no dense vectors: what the app answers
        from on its first run while the dense index is still being embedded. Never saved."""
        if not chunks:
            raise ValueError("no chunks to index: every input was empty or skipped")
        meta = {"keyword_only": True, "embedder": embedder_meta or {},
                "n_chunks": len(chunks), "n_documents": len({c.doc_id for c in chunks}),
                "corpus_fingerprint": corpus_fingerprint(docs)}
        return cls(chunks, None, cls._make_bm25(chunks), meta)

    @property
    def keyword_only_index(self) -> bool:
        return self.faiss is None

    @staticmethod
    def _make_bm25(chunks: list[Chunk]):
        import bm25s

        bm25 = bm25s.BM25()
        bm25.index(_bm25_tokens([f"{c.title}\n{c.text}" for c in chunks]), show_progress=False)
        return bm25

    def add(self, chunks: list[Chunk], vectors: np.ndarray, docs: list[Document],
            sources: list[str] | None = None) -> int:
        """Append chunks whose documents are not in the index yet; returns how many."""
        known = {c.doc_id for c in self.chunks}
        keep = [i for i, c in enumerate(chunks) if c.doc_id not in known]
        if keep:
            self.faiss.add(np.ascontiguousarray(vectors[keep]))
            self.chunks.extend(chunks[i] for i in keep)
            self.bm25 = self._make_bm25(self.chunks)
        old = self.meta["corpus_fingerprint"]
        self.meta["corpus_fingerprint"] = hashlib.sha256(
            (old + corpus_fingerprint(docs)).encode()).hexdigest()[:16]
        self.meta["n_chunks"] = len(self.chunks)
        self.meta["n_documents"] = len({c.doc_id for c in self.chunks})
        self.meta["sources"] = list(self.meta.get("sources", [])) + list(sources or [])
        self.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return len(keep)

    def row_of(self, chunk_id: str) -> int:
        if getattr(self, "_rows", None) is None or len(self._rows) != len(self.chunks):
            self._rows = {c.id: i for i, c in enumerate(self.chunks)}
        return self._rows[chunk_id]

    def vectors(self, ids: list[int]) -> np.ndarray:
        """The stored (normalised) vectors of the given rows."""
        if self.faiss is None:
            raise ValueError("this index has no dense vectors yet (keyword-only)")
        if isinstance(self.faiss, faiss.IndexIVF):
            self.faiss.make_direct_map()
        return np.vstack([self.faiss.reconstruct(int(i)) for i in ids]) if ids else \
            np.zeros((0, self.faiss.d), dtype=np.float32)

    # ---------- disk ----------
    def save(self, path: Path) -> Path:
        """Write to a temporary sibling, then swap it into place."""
        if self.faiss is None:
            raise ValueError("a keyword-only (provisional) index is never saved")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            faiss.write_index(self.faiss, str(tmp / "index.faiss"))
            with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
                for c in self.chunks:
                    f.write(json.dumps({"id": c.id, "doc_id": c.doc_id, "title": c.title,
                                        "start": c.start, "end": c.end, "text": c.text},
                                       ensure_ascii=False) + "\n")
            self.bm25.save(str(tmp / "bm25"), show_progress=False)
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2))
            _swap_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = path
        return path

    @classmethod
    def load(cls, path: Path, embedder_meta: dict | None = None) -> "ChunkIndex":
        path = Path(path)
        _recover(path)
        name = path.name
        if not (path / "meta.json").exists():
            raise IndexProblem(f"no index at {path}: build it with `rag index build --name {name}`"
                              + (" (without --source it builds the default medical corpus)"
                                 if name == "default" else " --source FILES"))
        try:
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("format_version") != FORMAT_VERSION:
                raise IndexProblem(f"index {path} has format {meta.get('format_version')}, this "
                                  f"version reads {FORMAT_VERSION}: rebuild it with "
                                  f"`rag index build --name {name}`")
            if embedder_meta is not None:
                check_embedder(meta, embedder_meta, name)
            import bm25s

            index = faiss.read_index(str(path / "index.faiss"))
            with open(path / "chunks.jsonl", encoding="utf-8") as f:
                chunks = [Chunk(r["id"], r["doc_id"], r["text"], r["title"], r["start"], r["end"])
                          for r in map(json.loads, f)]
            bm25 = bm25s.BM25.load(str(path / "bm25"), show_progress=False)
        except IndexProblem:
            raise
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise IndexProblem(f"index {path} is damaged ({type(e).__name__}): rebuild it with "
                              f"`rag index build --name {name}`") from None
        if index.ntotal != len(chunks):
            raise IndexProblem(f"index {path} is inconsistent ({index.ntotal} vectors, "
                              f"{len(chunks)} chunks): rebuild it")
        return cls(chunks, index, bm25, meta, path)


def check_embedder(meta: dict, embedder_meta: dict, name: str) -> None:
    """Refuse an embedder whose weights, backend or precision differ from the build's; torch
    and OpenVINO in fp32 count as the same (their vectors agree to cosine >= 0.99999)."""
    built = meta.get("embedder", {})
    fp32 = built.get("precision", "fp32") == embedder_meta.get("precision") == "fp32"
    for key in ("hash", "precision") if fp32 else ("hash", "backend", "precision"):
        if built.get(key) != embedder_meta.get(key):
            raise IndexProblem(
                f"index '{name}' was built with embedder {built.get('name')} "
                f"(hash {built.get('hash')}, {built.get('backend')}/{built.get('precision')}) but "
                f"the current embedder is {embedder_meta.get('name')} (hash "
                f"{embedder_meta.get('hash')}, {embedder_meta.get('backend')}/"
                f"{embedder_meta.get('precision')}): rebuild it with `rag index build --name "
                f"{name} --embedder {embedder_meta.get('ref', embedder_meta.get('name'))}`, "
                f"or use the embedder it was built with (--embedder {built.get('ref')})")


def _swap_into_place(tmp: Path, path: Path) -> None:
    old = path.parent / f".old-{path.name}"
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _recover(path: Path) -> None:
    """If a swap was interrupted between its two renames, put the previous index back."""
    old = path.parent / f".old-{path.name}"
    if not path.exists() and (old / "meta.json").exists():
        os.replace(old, path)


def list_indexes() -> list[dict]:
    root = indexes_dir()
    out = []
    for p in sorted(root.glob("*/meta.json")) if root.exists() else []:
        if p.parent.name.startswith("."):
            continue
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            out.append({"name": p.parent.name, "error": "unreadable meta.json"})
            continue
        out.append({"name": p.parent.name, "n_chunks": m.get("n_chunks"),
                    "n_documents": m.get("n_documents"), "index_type": m.get("index_type"),
                    "embedder": m.get("embedder", {}).get("name"), "created": m.get("created")})
    return out
