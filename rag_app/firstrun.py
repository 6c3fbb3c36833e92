"""Progressive first run: the app is usable before the dense index exists.

On a fresh install the default index is missing and embedding ~31k chunks takes minutes on two
cores. `BackgroundBuild` chunks the corpus and builds BM25 at once (seconds), hands that
keyword-only index to the app, then embeds in a background thread and saves the full index
atomically (the usual temp-folder swap). The app answers from BM25 meanwhile, shows the
progress, and switches to hybrid retrieval when the build is done.
"""
from __future__ import annotations

import threading
import time

from .config import ChunkConfig
from .embed import DEFAULT_EMBEDDER, SentenceTransformerEmbedder
from .index import ChunkIndex


class BackgroundBuild:
    def __init__(self, name: str = "default", sources: list[str] | None = None,
                 embedder=DEFAULT_EMBEDDER, chunking: ChunkConfig = ChunkConfig()):
        self.name = name
        self.sources = sources
        self.embedder = (SentenceTransformerEmbedder(embedder) if isinstance(embedder, str)
                         else embedder)
        self.chunking = chunking
        self.provisional: ChunkIndex | None = None
        self.stage, self.done, self.total = "reading the corpus", 0, 0
        self.error: str | None = None
        self.ready = threading.Event()     # the keyword-only index can answer (or it failed)
        self.finished = threading.Event()  # the full index is on disk (or it failed)
        self._t_embed: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"build-{name}", daemon=True)

    def start(self) -> "BackgroundBuild":
        self._thread.start()
        return self

    def _on_chunks(self, chunks, docs) -> None:
        self.stage = "keyword index"
        self.provisional = ChunkIndex.keyword_only(chunks, docs, self.embedder.describe())
        self.stage, self.total, self._t_embed = "embedding", len(chunks), time.perf_counter()
        self.ready.set()

    def _progress(self, stage: str, done: int, total: int) -> None:
        if stage == "embedding":
            self.done, self.total = done, total

    def _run(self) -> None:
        from .pipeline import build_index

        try:
            build_index(self.name, self.sources, embedder=self.embedder,
                        chunking=self.chunking, progress=False, callback=self._progress,
                        on_chunks=self._on_chunks)
            self.stage = "done"
        except Exception as e:  # shown in the app; the previous index (if any) is untouched
            self.error = f"{type(e).__name__}: {e}"
            self.stage = "failed"
        finally:
            self.ready.set()
            self.finished.set()

    @property
    def succeeded(self) -> bool:
        return self.finished.is_set() and self.error is None

    def eta_s(self) -> float | None:
        if self._t_embed is None or not self.done:
            return None
        rate = self.done / max(time.perf_counter() - self._t_embed, 1e-6)
        return (self.total - self.done) / rate

    def status_text(self) -> str:
        if self.error:
            return (f"Building the index failed ({self.error}); answers use keyword search. "
                    f"Rebuild it in the Index tab or with `rag index build --name {self.name}`.")
        if self.finished.is_set():
            return "The semantic index is ready: answers use hybrid retrieval."
        if self.stage != "embedding":
            return f"First run: {self.stage}…"
        eta = self.eta_s()
        left = f", about {eta / 60:.0f} min left" if eta is not None else ""
        pct = 100 * self.done / max(self.total, 1)
        return (f"First run: building the semantic index in the background, "
                f"{self.done:,}/{self.total:,} chunks ({pct:.0f}%{left}). Until it is ready "
                f"answers use keyword search (BM25) only.")
