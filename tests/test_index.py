import json
import shutil

import numpy as np
import pytest

from rag_app.index import ChunkIndex, IndexProblem, index_path, list_indexes
from rag_app.pipeline import add_to_index, build_index

from conftest import DATA


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_every_index_type_finds_a_passage_by_its_own_vector(small_index, kind):
    from rag_app.index import make_faiss

    n = len(small_index)
    vecs = small_index.vectors(list(range(n)))
    index = make_faiss(kind, vecs.shape[1], n)
    if kind == "ivf":
        index.train(vecs)
    index.add(vecs)
    _, rows = index.search(vecs[:20], 1)
    assert (rows[:, 0] == np.arange(20)).mean() >= 0.9


def test_saved_index_reloads_with_its_metadata(small_index, embedder):
    path = index_path("small")
    meta = json.loads((path / "meta.json").read_text())
    for key in ("format_version", "embedder", "chunking", "corpus_fingerprint", "index_type"):
        assert key in meta
    assert meta["embedder"]["hash"] == embedder.fingerprint
    assert meta["embedder"]["dim"] == 384
    loaded = ChunkIndex.load(path, embedder.describe())
    assert len(loaded) == len(small_index) == loaded.faiss.ntotal
    assert loaded.chunks[5].text == small_index.chunks[5].text
    assert "small" in [r["name"] for r in list_indexes()]


def test_mismatched_embedder_is_refused_with_the_rebuild_command(small_index, embedder):
    other = dict(embedder.describe(), hash="0123456789abcdef", name="other-model", ref="other")
    with pytest.raises(IndexProblem, match=r"rag index build --name small --embedder other"):
        ChunkIndex.load(index_path("small"), other)


def test_missing_and_damaged_indexes_give_clear_errors(small_index, tmp_path):
    with pytest.raises(IndexProblem, match="rag index build --name nope"):
        ChunkIndex.load(index_path("nope"))
    broken = index_path("broken")
    shutil.copytree(index_path("small"), broken)
    (broken / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexProblem, match="damaged"):
        ChunkIndex.load(broken)
    with pytest.raises(ValueError, match="index name"):
        index_path("../etc")


def test_interrupted_build_leaves_the_previous_index_intact(small_index, embedder, monkeypatch):
    import rag_app.index as idx

    before = (index_path("small") / "meta.json").read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt  # the user pressed Ctrl-C while files were being written

    monkeypatch.setattr(idx.faiss, "write_index", boom)
    with pytest.raises(KeyboardInterrupt):
        build_index("small", [str(DATA / "corpus.jsonl")], embedder=embedder, progress=False)
    monkeypatch.undo()
    assert (index_path("small") / "meta.json").read_text() == before
    assert len(ChunkIndex.load(index_path("small"))) == len(small_index)
    assert not [p for p in index_path("small").parent.iterdir() if p.name.startswith(".tmp")]


def test_half_done_swap_is_recovered(small_index, tmp_path):
    src = index_path("small")
    shutil.copytree(src, src.parent / "swapme")
    (src.parent / "swapme").rename(src.parent / ".old-swapme")  # crash between the renames
    assert len(ChunkIndex.load(index_path("swapme"))) == len(small_index)


def test_add_appends_only_new_documents(embedder, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Gout is a form of arthritis caused by uric acid crystals.")
    index, _ = build_index("grow", [str(docs)], embedder=embedder, progress=False)
    assert len(index) == 1
    (docs / "b.txt").write_text("Shingles is a painful rash caused by the chickenpox virus.")
    index, rep, added = add_to_index("grow", [str(docs)], progress=False)
    assert added == 1 and len(index) == 2
    reloaded = ChunkIndex.load(index_path("grow"))
    assert {c.doc_id for c in reloaded.chunks} == {"a.txt", "b.txt"}
    from rag_app.retrieve import Retriever

    hits = Retriever(reloaded, embedder).search("chickenpox rash", 1, mode="bm25")
    assert hits[0].doc_id == "b.txt"


def test_building_from_nothing_readable_fails_clearly(embedder, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="no readable documents"):
        build_index("empty", [str(tmp_path)], embedder=embedder, progress=False)
    assert not index_path("empty").exists()
