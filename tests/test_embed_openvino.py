"""The OpenVINO embedder against the torch one, with the packaged MiniLM and real passages.

Conversions go to a temporary RAG_MODELS_DIR shared by this module (fp32 ~15 s, int8 ~1-2 min
of NNCF calibration on a busy 2-core machine).
"""
import json
import os

import numpy as np
import pytest

from conftest import DATA

pytest.importorskip("openvino")

pytestmark = pytest.mark.slow

QUERIES = ["What are the symptoms of asthma?", "How is gout treated?",
           "What causes shingles?", "Who is at risk for type 2 diabetes?",
           "How is glaucoma diagnosed?", "What is high blood pressure?",
           "Can diet lower uric acid?", "What are the complications of diabetes?",
           "How is an asthma attack treated?", "Is glaucoma inherited?"]


def _records():
    with open(DATA / "corpus.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def passages():
    return [r["text"] for r in _records()][:50]


@pytest.fixture(scope="module")
def ov_models_dir(tmp_path_factory):
    old = os.environ.get("RAG_MODELS_DIR")
    path = tmp_path_factory.mktemp("ov-models")
    os.environ["RAG_MODELS_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("RAG_MODELS_DIR", None)
    else:
        os.environ["RAG_MODELS_DIR"] = old


@pytest.fixture(scope="module")
def ov_fp32(ov_models_dir):
    from rag_app.embed_openvino import OpenVINOEmbedder

    return OpenVINOEmbedder(precision="fp32").warm_up()


@pytest.fixture(scope="module")
def torch_vectors(embedder, passages):
    return embedder.encode(passages), embedder.encode(QUERIES)


def _topk(q, p, k):
    return np.argsort(-(q @ p.T), axis=1)[:, :k]


def _overlap(a, b):
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


@pytest.mark.parametrize("precision,min_cos,min_overlap", [
    ("fp32", 0.999, 0.95), ("bf16", 0.99, 0.9), ("int8", 0.98, 0.8)])
def test_matches_torch(precision, min_cos, min_overlap, ov_models_dir, embedder, passages,
                       torch_vectors):
    from rag_app.embed_openvino import OpenVINOEmbedder

    ov = OpenVINOEmbedder(precision=precision)
    vp, vq = ov.encode(passages), ov.encode(QUERIES)
    tp, tq = torch_vectors
    assert vp.dtype == np.float32 and vp.shape == tp.shape == (50, 384)
    np.testing.assert_allclose(np.linalg.norm(vp, axis=1), 1.0, atol=1e-4)
    cos = np.concatenate([(vp * tp).sum(1), (vq * tq).sum(1)])
    assert cos.min() >= min_cos, (precision, cos.min(), cos.mean())
    assert _overlap(_topk(vq, vp, 5), _topk(tq, tp, 5)) >= min_overlap
    d = ov.describe()
    assert d["backend"] == "openvino" and d["precision"] == precision
    assert d["hash"] == embedder.fingerprint == ov.fingerprint
    assert set(d) == set(embedder.describe())
    assert (ov.cache_dir / "model.xml").exists() and (ov.cache_dir / "meta.json").exists()


def test_order_and_dynamic_shapes(ov_fp32, passages):
    texts = ["gout", passages[3], "", "What is asthma?", passages[10][:40], passages[0]] * 3
    one_by_one = np.vstack([ov_fp32.encode([t]) for t in texts[:6]])
    seen = []
    ov_fp32.batch_size = 4
    try:
        v = ov_fp32.encode(texts, block=5, callback=lambda d, n: seen.append((d, n)))
    finally:
        ov_fp32.batch_size = 16
    np.testing.assert_allclose(v[:6], one_by_one, atol=1e-4)
    np.testing.assert_allclose(v[6:12], one_by_one, atol=1e-4)
    assert seen[-1] == (len(texts), len(texts)) and len(seen) == 4
    assert ov_fp32.encode([]).shape == (0, 384)
    long = " ".join(passages[:5])  # > 256 tokens: truncated like torch
    assert ov_fp32.encode([long]).shape == (1, 384)


def test_cache_is_reused(ov_fp32, ov_models_dir, passages):
    from rag_app.embed_openvino import OpenVINOEmbedder

    again = OpenVINOEmbedder(precision="fp32").warm_up()
    assert not again.converted and again.cache_dir == ov_fp32.cache_dir
    assert again.cache_dir.parent.parent == ov_models_dir
    np.testing.assert_allclose(again.encode(passages[:5]), ov_fp32.encode(passages[:5]),
                               atol=1e-6)
    assert not [p for p in again.cache_dir.parent.iterdir() if p.name.startswith(".")]
    meta = json.loads((again.cache_dir / "meta.json").read_text())
    assert meta["fingerprint"] == again.fingerprint and meta["precision"] == "fp32"


def test_index_records_backend(ov_fp32, embedder):
    from rag_app.embed_openvino import OpenVINOEmbedder
    from rag_app.index import ChunkIndex, IndexProblem, check_embedder, index_path
    from rag_app.pipeline import build_index, embedder_for

    index, _ = build_index("ov_small", [str(DATA / "corpus.jsonl")], embedder=ov_fp32,
                           progress=False)
    meta = ChunkIndex.load(index_path("ov_small")).meta
    assert meta["embedder"]["backend"] == "openvino"
    assert meta["embedder"]["precision"] == "fp32"
    assert meta["embedder"]["hash"] == embedder.fingerprint
    # torch and OpenVINO in fp32 give the same vectors: either may embed the queries; another
    # precision, or other weights, are refused
    check_embedder(meta, embedder.describe(), "ov_small")
    with pytest.raises(IndexProblem, match="rebuild"):
        check_embedder(meta, {**embedder.describe(), "precision": "int8"}, "ov_small")
    with pytest.raises(IndexProblem):
        check_embedder(meta, {**embedder.describe(), "hash": "0" * 16}, "ov_small")
    again = embedder_for(meta)
    assert isinstance(again, OpenVINOEmbedder) and again.precision == "fp32"
    check_embedder(meta, again.describe(), "ov_small")
    q = again.encode(["What are the symptoms of asthma?"])
    _, ids = index.faiss.search(q, 3)
    assert any("sthma" in index.chunks[i].title for i in ids[0])


def test_precision_choice_and_errors(monkeypatch):
    import importlib.util

    from rag_app import embed_openvino as eo
    from rag_app.embed import make_embedder

    assert eo.resolve_precision("auto", {"avx2", "avx512_bf16"}) == "bf16"
    assert eo.resolve_precision("auto", {"avx2", "amx_bf16", "amx_tile"}) == "bf16"
    assert eo.resolve_precision("auto", {"avx2", "avx512_vnni"}) == "int8"
    assert eo.resolve_precision("auto", {"avx2"}) == "fp32"
    assert eo.OpenVINOEmbedder(precision="auto").precision in eo.PRECISIONS
    with pytest.raises(ValueError, match="fp16"):
        eo.resolve_precision("fp16")
    e = make_embedder("default", "openvino", "fp32")
    assert isinstance(e, eo.OpenVINOEmbedder) and e.backend == "openvino"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(ValueError, match="pip install openvino"):
        eo.OpenVINOEmbedder(precision="fp32")


def test_throughput_hint_same_vectors(ov_fp32, passages):
    from rag_app.embed_openvino import OpenVINOEmbedder

    texts = passages[:12] + ["gout", ""]
    tp = OpenVINOEmbedder(precision="fp32", performance_hint="THROUGHPUT", batch_size=3)
    np.testing.assert_allclose(tp.encode(texts), ov_fp32.encode(texts), atol=1e-5)
    with pytest.raises(ValueError, match="performance_hint"):
        OpenVINOEmbedder(precision="fp32", performance_hint="FAST")


def test_queries_of_a_torch_fp32_index_use_openvino_with_the_same_ranking(
        ov_fp32, embedder, small_index, monkeypatch):
    """The default query path: an index built with torch fp32 embeds its queries with OpenVINO
    fp32 (faster for one query), ranks exactly as torch does, and falls back to torch when
    OpenVINO cannot load; RAG_QUERY_BACKEND=torch keeps torch."""
    import rag_app.pipeline as pl
    from rag_app.embed import SentenceTransformerEmbedder
    from rag_app.embed_openvino import OpenVINOEmbedder
    from rag_app.index import check_embedder

    meta = small_index.meta
    assert meta["embedder"]["backend"] == "torch"
    monkeypatch.delenv("RAG_QUERY_BACKEND", raising=False)
    q_emb = pl.query_embedder_for(meta)
    assert isinstance(q_emb, OpenVINOEmbedder) and q_emb.precision == "fp32"
    check_embedder(meta, q_emb.describe(), "small")
    a, b = embedder.encode(QUERIES), q_emb.encode(QUERIES)
    assert float(np.min(np.sum(a * b, axis=1))) > 0.9999
    np.testing.assert_array_equal(small_index.faiss.search(a, 5)[1],
                                  small_index.faiss.search(b, 5)[1])
    assert isinstance(pl.query_embedder_for(meta, "torch"), SentenceTransformerEmbedder)
    monkeypatch.setenv("RAG_QUERY_BACKEND", "torch")
    assert isinstance(pl.query_embedder_for(meta), SentenceTransformerEmbedder)
    with pytest.raises(ValueError, match="query backend"):
        pl.query_embedder_for(meta, "onnx")

    def broken(*a, **k):
        raise RuntimeError("no openvino here")

    monkeypatch.setattr(pl, "make_embedder", lambda ref, backend, precision: (
        broken() if backend == "openvino" else SentenceTransformerEmbedder(ref)))
    assert isinstance(pl.query_embedder_for(meta, "auto"), SentenceTransformerEmbedder)
    with pytest.raises(RuntimeError):
        pl.query_embedder_for(meta, "openvino")
