"""Bi-encoder fine-tuning: a tiny MNRL run registers an embedder; an index built with the old
embedder is then refused (with the rebuild command); `--embedder tuned` resolves it."""
import json

import pytest
import torch

from training.common import RECIPES_DIR, load_config
from training.retriever import RetrieverConfig, run


@pytest.fixture(scope="module")
def tiny_retriever(embedder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ret")
    cfg = load_config(RetrieverConfig, RECIPES_DIR / "retriever-tiny.yaml", ["name=emb-tiny"])
    return run(cfg, output=str(out / "run"), progress_file=str(out / "p.jsonl"),
               embedder=embedder, activate=True), out


def test_tiny_retriever_trains_and_registers(tiny_retriever, embedder):
    from sentence_transformers import SentenceTransformer

    res, out = tiny_retriever
    entry = res["entry"]
    assert entry["kind"] == "embedder"
    m = SentenceTransformer(entry["path"], device="cpu")
    assert m.max_seq_length == embedder.max_seq_length  # saved with the serving window
    base = dict(embedder.model.named_parameters())
    assert any(not torch.allclose(p, base[n]) for n, p in m.named_parameters())
    man = res["manifest"]
    assert man["data"]["train_triplets"] > 0 and man["metrics_before"]["heldout"]
    losses = [x["loss"] for x in man["train_log"] if "loss" in x]
    assert losses and all(v == v for v in losses)
    events = [json.loads(x)["event"] for x in (out / "p.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "done"


def test_stale_index_refused_after_new_embedder(tiny_retriever, embedder, tmp_path):
    from rag_app.index import ChunkIndex, IndexProblem, index_path
    from rag_app.pipeline import RagPipeline, build_index

    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"d{i}", "title": "t", "text": t}) for i, t in
                             enumerate(["Asthma narrows the airways.", "Gout hurts joints."])))
    build_index("stale", [str(src)], embedder=embedder, progress=False)
    from rag_app.embed import SentenceTransformerEmbedder

    tuned = SentenceTransformerEmbedder("tuned")  # the active embedder, via the registry
    assert tuned.model_ref == tiny_retriever[0]["entry"]["path"]
    with pytest.raises(IndexProblem, match="rag index build --name stale --embedder"):
        ChunkIndex.load(index_path("stale"), tuned.describe())
    with pytest.raises(IndexProblem, match="rebuild it"):
        _ = RagPipeline("stale", embedder="tuned").index
    build_index("stale", [str(src)], embedder=tuned, progress=False)  # rebuilt: accepted
    assert len(RagPipeline("stale", embedder="tuned", reranker=None).retrieve("asthma", 1)) == 1
