"""Progressive first run: BM25 answers while the dense index builds, then hybrid."""
import threading

from conftest import DATA
from rag_app.config import GenerationConfig
from rag_app.feedback import FeedbackStore
from rag_app.index import ChunkIndex, index_path
from rag_app.ui_logic import AppState


class GatedEmbedder:
    """The real embedder; encoding the corpus (many texts) waits until the gate opens."""

    def __init__(self, inner, gate: threading.Event):
        self.inner, self.gate, self.corpus_calls = inner, gate, 0

    def encode(self, texts, progress=False, callback=None):
        if len(texts) > 50:
            self.corpus_calls += 1
            assert self.gate.wait(120)
        return self.inner.encode(texts, progress=progress, callback=callback)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def answer(state, q="What are the symptoms of gout?"):
    *_, last = state.ask(q, 3)
    return last


def test_app_answers_from_bm25_while_the_dense_index_builds(embedder, tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_INDEXES_DIR", str(tmp_path / "indexes"))
    gate = threading.Event()
    emb = GatedEmbedder(embedder, gate)
    state = AppState("default", generation=GenerationConfig(max_new_tokens=8),
                     feedback=FeedbackStore(tmp_path / "fb.sqlite"),
                     first_run_sources=[str(DATA / "corpus.jsonl")], first_run_embedder=emb)
    fr = state.first_run
    assert fr is not None and fr.ready.wait(120)
    assert "keyword search" in state.first_run_text()
    status, sources, base, _, iid = answer(state)
    assert 'id="first-run"' in status and "keyword search (BM25)" in status
    assert state.base.keyword_only and "gout" in sources.lower() and iid is not None
    assert not (index_path("default") / "meta.json").exists()  # nothing half-written
    gate.set()
    assert fr.finished.wait(180) and fr.succeeded, fr.error
    status, sources, *_ = answer(state)
    assert 'id="first-run"' not in status and state.first_run is None
    assert not state.base.keyword_only and state.base.index.faiss.ntotal == len(fr.provisional)
    assert state.first_run_text() == ""
    assert len(ChunkIndex.load(index_path("default"))) == len(fr.provisional)


def test_a_failed_first_build_keeps_answering_from_bm25(embedder, tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_INDEXES_DIR", str(tmp_path / "indexes"))

    class Broken(GatedEmbedder):
        def encode(self, texts, progress=False, callback=None):
            if len(texts) > 50:
                raise RuntimeError("out of memory")
            return self.inner.encode(texts)

    state = AppState("default", generation=GenerationConfig(max_new_tokens=4),
                     feedback=FeedbackStore(tmp_path / "fb.sqlite"),
                     first_run_sources=[str(DATA / "corpus.jsonl")],
                     first_run_embedder=Broken(embedder, threading.Event()))
    assert state.first_run.finished.wait(120)
    status, sources, *_ = answer(state)
    assert "failed (RuntimeError: out of memory)" in status and "gout" in sources.lower()
    assert not index_path("default").exists()
