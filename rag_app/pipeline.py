"""RagPipeline: build an index, then answer(question) -> Answer. Read top to bottom."""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterator

from .config import ChunkConfig, GenerationConfig, RetrievalConfig
from .chunk import chunk_documents
from .embed import DEFAULT_EMBEDDER, SentenceTransformerEmbedder, make_embedder
from .index import ChunkIndex, index_path
from .ingest import IngestReport, default_corpus, load_paths
from .rerank import Reranker
from .retrieve import Retriever
from .types import Answer, Chunk, Source

log = logging.getLogger(__name__)
StageFn = Callable[[str, int, int], None]  # (stage, done, total)

WEAK_EVIDENCE_TEXT = ("I could not find sources that clearly answer this question, so I will "
                      "not guess. Try rephrasing it, or add documents that cover it to the index.")


def _ingest(sources: list[str] | None) -> IngestReport:
    if not sources:
        return IngestReport(documents=default_corpus())
    return load_paths(sources)


def _embed_chunks(docs, embedder, chunking: ChunkConfig, progress: bool,
                  callback: StageFn | None, on_chunks=None):
    if chunking.size > embedder.max_seq_length:
        raise ValueError(f"chunk size {chunking.size} exceeds the embedder's window "
                         f"({embedder.max_seq_length} tokens): use --chunk-size <= "
                         f"{embedder.max_seq_length}")
    chunks = chunk_documents(docs, embedder.tokenizer, chunking, progress=progress)
    if on_chunks is not None:
        on_chunks(chunks)
    cb = (lambda done, total: callback("embedding", done, total)) if callback else None
    vectors = embedder.encode([c.text for c in chunks], progress=progress, callback=cb)
    return chunks, vectors


def build_index(name: str = "default", sources: list[str] | None = None, kind: str = "flat",
                embedder: str | SentenceTransformerEmbedder = DEFAULT_EMBEDDER,
                chunking: ChunkConfig = ChunkConfig(), progress: bool = True,
                callback: StageFn | None = None,
                on_chunks=None) -> tuple[ChunkIndex, IngestReport]:
    """Ingest -> chunk -> embed -> FAISS + BM25 -> indexes/NAME (swapped in atomically).
    `on_chunks(chunks, documents)` is called once chunking is done, before embedding."""
    path = index_path(name)
    emb = embedder if not isinstance(embedder, str) else SentenceTransformerEmbedder(embedder)
    report = _ingest(sources)
    for where, why in report.skipped:
        log.warning("skipped %s: %s", where, why)
    if not report.documents:
        raise ValueError("no readable documents in " + ", ".join(map(str, sources or [])) +
                         f" ({len(report.skipped)} skipped)")
    hook = (lambda chunks: on_chunks(chunks, report.documents)) if on_chunks else None
    chunks, vectors = _embed_chunks(report.documents, emb, chunking, progress, callback, hook)
    index = ChunkIndex.build(chunks, vectors, emb.describe(), chunking, report.documents, kind,
                             [str(s) for s in sources] if sources else ["default-medical"])
    index.save(path)
    return index, report


def add_to_index(name: str, sources: list[str], progress: bool = True,
                 callback: StageFn | None = None) -> tuple[ChunkIndex, IngestReport, int]:
    """Append new documents to an existing index with the embedder that built it."""
    path = index_path(name)
    index = ChunkIndex.load(path)
    emb = embedder_for(index.meta)
    from .index import check_embedder

    check_embedder(index.meta, emb.describe(), name)
    report = load_paths(sources)
    if not report.documents:
        raise ValueError("no readable documents in " + ", ".join(map(str, sources)))
    chunks, vectors = _embed_chunks(report.documents, emb,
                                    ChunkConfig(**index.meta["chunking"]), progress, callback)
    added = index.add(chunks, vectors, report.documents, [str(s) for s in sources])
    index.save(path)
    return index, report, added


def embedder_for(meta: dict):
    """The embedder that built an index (same model, backend and precision)."""
    e = meta["embedder"]
    return make_embedder(e.get("ref", DEFAULT_EMBEDDER), e.get("backend", "torch"),
                         e.get("precision", "fp32"))


QUERY_BACKENDS = ("auto", "torch", "openvino")


def query_embedder_for(meta: dict, backend: str | None = None):
    """The embedder for an index's queries. An fp32 index gets the same vectors from torch and
    from OpenVINO fp32 (cosine >= 0.99999, tests/test_embed_openvino.py), and OpenVINO embeds
    one query ~2.5x faster on 2 cores (8 vs 21 ms: bench/bench_retrieval.py), so "auto" (the
    default; env RAG_QUERY_BACKEND) uses OpenVINO fp32 there and falls back to the build's own
    backend when it cannot load. Other precisions always use exactly the build's backend."""
    backend = backend or os.environ.get("RAG_QUERY_BACKEND", "auto")
    if backend not in QUERY_BACKENDS:
        raise ValueError(f"query backend {backend!r} is invalid: choose one of {QUERY_BACKENDS}")
    e = meta["embedder"]
    built = embedder_for(meta)
    want = "torch" if backend == "torch" else "openvino"
    if e.get("precision", "fp32") != "fp32" or built.backend == want:
        return built
    try:
        emb = make_embedder(e.get("ref", DEFAULT_EMBEDDER), want, "fp32").warm_up()
    except Exception as err:  # noqa: BLE001 - any failure: the build's backend still works
        if backend != "auto":
            raise
        log.warning("query embedding falls back to %s: the %s backend did not load (%s)",
                    built.backend, want, err)
        return built
    return emb


def to_sources(chunks: list[Chunk]) -> list[Source]:
    return [Source(i, c.id, c.doc_id, c.title, c.text, c.score)
            for i, c in enumerate(chunks, start=1)]


class RagPipeline:
    """Cheap to construct; the index and the models load on first use (or `warm_up()`)."""

    def __init__(self, index: str = "default", model: str = "base",
                 retrieval: RetrievalConfig = RetrievalConfig(),
                 generation: GenerationConfig = GenerationConfig(),
                 reranker: str | None = "auto", embedder: str | None = None,
                 build_if_missing: bool = True):
        index_path(index)  # validates the name
        self.index_name = index
        self.model_ref = model
        self.retrieval = retrieval
        self.generation = generation
        self.reranker_ref = reranker
        self.embedder_ref = embedder
        self.build_if_missing = build_if_missing
        self._index = self._embedder = self._retriever = self._reranker = self._generator = None

    @classmethod
    def load(cls, index: str = "default", model: str = "base", **kw) -> "RagPipeline":
        return cls(index=index, model=model, **kw).warm_up(generator=False)

    # ---------- lazy parts ----------
    @property
    def index(self) -> ChunkIndex:
        if self._index is None:
            path = index_path(self.index_name)
            if not (path / "meta.json").exists() and self.index_name == "default" \
                    and self.build_if_missing:
                log.warning("building the default medical index (first use)")
                build_index("default", embedder=self.embedder_ref or DEFAULT_EMBEDDER)
            index = ChunkIndex.load(path)
            self._embedder = (query_embedder_for(index.meta) if self.embedder_ref is None
                              else SentenceTransformerEmbedder(self.embedder_ref))
            from .index import check_embedder

            check_embedder(index.meta, self._embedder.describe(), self.index_name)
            self._index = index
        return self._index

    @property
    def embedder(self) -> SentenceTransformerEmbedder:
        _ = self.index
        return self._embedder

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            self._retriever = Retriever(self.index, self.embedder, self.retrieval)
        return self._retriever

    @property
    def reranker(self) -> Reranker:
        if self._reranker is None:
            ref = self.reranker_ref
            if ref == "auto":
                from .models import ModelRegistry

                active = ModelRegistry().active("relevance")
                ref = active["path"] if active else None
            self._reranker = Reranker(self.index, self.embedder, ref)
        return self._reranker

    @property
    def generator(self):
        if self._generator is None:
            from .generate import HFGenerator
            from .models import ModelRegistry

            base, adapter, name = ModelRegistry().resolve_generator(self.model_ref)
            self._generator = HFGenerator(base, adapter=adapter, config=self.generation,
                                          name=name)
        return self._generator

    def reset(self, index: bool = False, reranker: bool = True, generator: bool = True) -> None:
        """Drop cached parts so the next use reloads them (an index rebuilt on disk, a newly
        promoted model in the registry)."""
        if index:
            self._index = self._embedder = self._retriever = None
            reranker = True
        if reranker:
            self._reranker = None
        if generator:
            self._generator = None

    def share_retrieval_from(self, other: "RagPipeline") -> None:
        """Use another pipeline's index, embedder, retriever and reranker (no second copy)."""
        self._index, self._embedder = other.index, other.embedder
        self._retriever, self._reranker = other.retriever, other.reranker

    def use_index(self, index: ChunkIndex, embedder) -> None:
        """Answer from an index held in memory (the first run's keyword-only index)."""
        self._index, self._embedder = index, embedder
        self._retriever = self._reranker = None

    @property
    def keyword_only(self) -> bool:
        return self._index is not None and self._index.faiss is None

    def warm_up(self, generator: bool = True) -> "RagPipeline":
        _ = self.retriever, self.reranker
        if generator:
            self.generator.warm_up()
        return self

    # ---------- answering ----------
    def check_question(self, question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty: type a medical question")
        q = " ".join(question.split())
        limit = self.generation.max_question_chars
        if len(q) > limit:
            raise ValueError(f"the question is {len(q):,} characters long; the limit is "
                             f"{limit:,}: shorten it to the question itself")
        return q

    def retrieve(self, question: str, k: int | None = None,
                 timings: dict | None = None) -> list[Chunk]:
        """Hybrid (or dense/bm25) candidates, reranked; the top k."""
        q = self.check_question(question)
        k = k or self.retrieval.top_k
        t0 = time.perf_counter()
        qvec = self.embedder.encode([q])
        if self.keyword_only:  # first run, dense index still building: BM25, fewer candidates
            cands = self.retriever.search_batch([q], min(self.retrieval.candidates, 2 * k),
                                                mode="bm25")[0]
        else:
            cands = self.retriever.search_batch([q], self.retrieval.candidates,
                                                query_vecs=qvec)[0]
        t1 = time.perf_counter()
        top = self.reranker.rerank(q, cands, k, query_vec=qvec[0])
        if timings is not None:
            timings["retrieve"] = (t1 - t0) * 1000
            timings["rerank"] = (time.perf_counter() - t1) * 1000
        return top

    def is_weak(self, chunks: list[Chunk]) -> bool:
        return not chunks or max(c.score for c in chunks) < self.reranker.weak_threshold

    def answer(self, question: str, k: int | None = None) -> Answer:
        final = None
        for final in self.stream(question, k):
            pass
        return final

    def stream(self, question: str, k: int | None = None,
               chunks: list[Chunk] | None = None) -> Iterator[Answer]:
        """Yields partial Answers as the text grows; the last one is parsed and final.
        Pass `chunks` to answer from already retrieved sources (side-by-side comparison)."""
        from .cite import attribute
        from .prompts import parse_answer, trim_generation

        q = self.check_question(question)
        t0 = time.perf_counter()
        timings: dict = {}
        if chunks is None:
            chunks = self.retrieve(q, k, timings)
        sources = to_sources(chunks)
        name = self.generator.name
        if self.is_weak(chunks):
            timings["total"] = (time.perf_counter() - t0) * 1000
            yield Answer(q, WEAK_EVIDENCE_TEXT, sources, [], name, True, "", [], timings)
            return
        tg = time.perf_counter()
        raw = ""
        for raw in self.generator.stream(q, sources):
            if "first_token" not in timings:
                timings["first_token"] = (time.perf_counter() - tg) * 1000
            yield Answer(q, raw, sources, [], name, False, raw, [], dict(timings))
        timings["generate"] = (time.perf_counter() - tg) * 1000
        timings["total"] = (time.perf_counter() - t0) * 1000
        text, cited, dropped = parse_answer(trim_generation(raw), sources)
        how = "model" if cited else "none"
        text, more, unsupported = attribute(text, sources)
        if more and not cited:
            how = "attributed"
        cited += [c for c in more if c not in cited]
        yield Answer(q, text, sources, cited, name, False, raw, dropped, timings, how,
                     unsupported)
