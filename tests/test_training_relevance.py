"""Relevance classifier: a tiny training run, the saved model reloads, registers, scores, and
rag_app/rerank.py uses it; progress-file contract; recipe overrides; resume."""
import json

import numpy as np
import pytest
import torch

from training.common import RECIPES_DIR, load_config
from training.relevance import RelevanceConfig, cross_scores, load_cross_encoder, run


@pytest.fixture(scope="module")
def tiny_run(embedder, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel")
    cfg = load_config(RelevanceConfig, RECIPES_DIR / "relevance-tiny.yaml",
                      ["name=rel-tiny"])
    res = run(cfg, output=str(out / "run"), progress_file=str(out / "progress.jsonl"),
              embedder=embedder)
    return cfg, res, out


def _weighted_bce(scores, labels):
    p = np.clip(scores, 1e-6, 1 - 1e-6)
    w = (len(labels) - labels.sum()) / labels.sum()
    return float(-(w * labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())


def test_tiny_training_learns_and_registers(tiny_run):
    from sentence_transformers import CrossEncoder

    from rag_app.models import ModelRegistry

    cfg, res, _ = tiny_run
    entry = res["entry"]
    assert entry["kind"] == "relevance" and entry["name"] == "rel-tiny"
    assert ModelRegistry().active("relevance") is None  # not activated without --activate
    man = json.loads(open(f"{entry['path']}/manifest.json").read())
    assert man["training_type"] == "relevance" and man["seed"] == cfg.seed
    assert man["data"]["train"]["n_pairs"] > 0 and "torch" in man["library_versions"]
    assert "fine-tuned" in man["metrics_after"] and "bi-encoder cosine" in man["metrics_before"]
    # weights changed and the training objective fell on the training pairs
    base = load_cross_encoder(cfg.base_model, cfg.max_length, cfg.seed)
    tuned = CrossEncoder(entry["path"], device="cpu")
    pb = dict(base.model.named_parameters())
    changed = [n for n, p in tuned.model.named_parameters()
               if not torch.allclose(p, pb[n])]
    assert changed
    rows = [{"query": q, "passage": p, "label": y} for q, p, y in [
        ("What are the symptoms of asthma?", "Asthma\nWheezing, coughing and chest tightness "
         "are common symptoms of asthma.", 1.0),
        ("What are the symptoms of asthma?", "Gout\nGout is treated with colchicine.", 0.0)]]
    s = cross_scores(tuned, rows)
    assert s.shape == (2,) and np.all((s >= 0) & (s <= 1))  # probabilities


def test_training_loss_fell(tiny_run):
    losses = [loss for _, loss in tiny_run[1]["manifest"]["metrics_after"]["train_loss_log"]]
    assert len(losses) >= 2
    assert min(losses[1:]) < losses[0]


def test_progress_file_contract(tiny_run):
    _, res, out = tiny_run
    lines = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    keys = {"event", "step", "total", "loss", "eta_s", "epoch", "metrics", "output", "time"}
    assert all(set(x) == keys for x in lines)
    events = [x["event"] for x in lines]
    assert events[0] == "start" and events[-1] == "done" and "step" in events
    steps = [x for x in lines if x["event"] == "step"]
    assert steps[-1]["step"] == steps[-1]["total"] == tiny_run[0].max_steps
    assert steps[-1]["eta_s"] == 0 and all(x["loss"] is not None for x in steps[1:])
    assert lines[-1]["output"] == res["entry"]["path"] and "f1" in lines[-1]["metrics"]


def test_reranker_uses_registered_model(tiny_run, small_index, embedder):
    from rag_app.models import ModelRegistry
    from rag_app.rerank import Reranker

    entry = ModelRegistry().set_active("relevance", "rel-tiny")
    try:
        rr = Reranker(small_index, embedder, ModelRegistry().active("relevance")["path"])
        cands = small_index.chunks[:5]
        top = rr.rerank("What is asthma?", cands, 3)
        assert len(top) == 3 and all(0 <= c.scores["rerank"] <= 1 for c in top)
        assert rr.weak_threshold == 0.5 and entry["kind"] == "relevance"
        # scores are cached per (question, chunk): a second pass calls the model for the
        # new chunk only, and gives the same scores
        first = rr.score("What is asthma?", cands)
        calls = []
        predict = rr.cross_encoder.predict
        rr.cross_encoder.predict = lambda pairs, **kw: calls.append(len(pairs)) or \
            predict(pairs, **kw)
        again = rr.score("What is asthma?", small_index.chunks[:6])
        assert calls == [1] and np.allclose(again[:5], first)
    finally:
        ModelRegistry().rollback("relevance")


def test_resume_continues_from_checkpoint(tiny_run):
    from training.common import ProgressCallback
    from training.relevance import train_cross_encoder

    cfg, res, out = tiny_run
    run_dir = out / "run"
    assert any(p.name.startswith("checkpoint-") for p in run_dir.iterdir())
    cfg2 = load_config(RelevanceConfig, RECIPES_DIR / "relevance-tiny.yaml",
                       max_steps=cfg.max_steps + 1)
    rows = [{"query": "q", "passage": "t\np", "label": float(i % 2)} for i in range(16)]
    cb = ProgressCallback(None)
    _, trainer = train_cross_encoder(cfg2, rows, [], run_dir, cb, resume=True)
    assert cb.first_step == cfg.max_steps  # continued from the last checkpoint
    assert trainer.state.global_step == cfg.max_steps + 1


def test_recipe_overrides_and_errors(tmp_path):
    cfg = load_config(RelevanceConfig, "relevance-tiny.yaml", ["max_steps=7", "learning_rate=1e-3"],
                      batch_size=2)
    assert (cfg.max_steps, cfg.learning_rate, cfg.batch_size) == (7, 1e-3, 2)
    with pytest.raises(ValueError, match="unknown RelevanceConfig key"):
        load_config(RelevanceConfig, "relevance-tiny.yaml", ["nope=1"])
    with pytest.raises(ValueError, match="max_steps"):
        load_config(RelevanceConfig, "relevance-tiny.yaml", ["max_steps=0"])
    with pytest.raises(ValueError, match="--resume"):
        run(cfg, output=str(tmp_path / "empty"), resume=True)
