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
        # the order fuses the classifier with the hybrid scores: weight 1 = classifier alone,
        # weight 0 = the given (hybrid) order; the score kept is the classifier's either way
        hybrid = [c.with_score(1.0 - i / 10, "hybrid") for i, c in enumerate(cands)]
        alone = Reranker(small_index, embedder, entry["path"], weight=1.0).rerank(
            "What is asthma?", hybrid, 5)
        assert [c.id for c in alone] == [hybrid[i].id for i in np.argsort(-first,
                                                                          kind="stable")]
        kept = Reranker(small_index, embedder, entry["path"], weight=0.0).rerank(
            "What is asthma?", hybrid, 5)
        assert [c.id for c in kept] == [c.id for c in hybrid]
        assert sorted(c.scores["rerank"] for c in kept) == pytest.approx(sorted(first))
        with pytest.raises(ValueError, match="rerank weight"):
            Reranker(small_index, embedder, entry["path"], weight=1.5)
    finally:
        ModelRegistry().rollback("relevance")


def test_fuse_scores_is_a_convex_combination_of_min_max_scores():
    from rag_app.rerank import fuse_scores

    ce, hy = np.array([0.9, 0.1, 0.5]), np.array([3.0, 5.0, 4.0])
    assert fuse_scores(ce, hy, 1.0) == pytest.approx([1.0, 0.0, 0.5])
    assert fuse_scores(ce, hy, 0.0) == pytest.approx([0.0, 1.0, 0.5])
    assert fuse_scores(ce, hy, 0.5) == pytest.approx([0.5, 0.5, 0.5])
    assert fuse_scores(np.ones(3), hy, 0.5) == pytest.approx([0.5, 1.0, 0.75])


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


def test_val_ranking_queries_come_from_the_validation_groups_only():
    from types import SimpleNamespace

    from training.data import load_split
    from training.relevance import ranking_queries

    val = load_split("val", ("pubmedqa",))
    train_ids = {q.qid for q in load_split("train", ("pubmedqa",)).queries}
    docs = [SimpleNamespace(doc_id=d) for q in val.queries for d in q.positives]
    ds = ranking_queries("pubmedqa-val", SimpleNamespace(chunks=docs), 5)
    assert len(ds.queries) == 5 and not set(ds.queries) & train_ids
    assert all(ds.qrels[q] == set(next(x for x in val.queries if x.qid == q).positives)
               for q in ds.queries)
    with pytest.raises(ValueError, match="medquad-val"):
        ranking_queries("pubmedqa-dev", SimpleNamespace(chunks=docs), 5)


def test_eval_index_build_refuses_the_default_index_and_unknown_embedders():
    from training.cli import build_eval_index

    with pytest.raises(ValueError, match="not the app's default"):
        build_eval_index("default")
    with pytest.raises(ValueError, match="not registered"):
        build_eval_index("eval-x", "no-such-embedder")


def test_sample_by_source_gives_each_named_source_its_share():
    from collections import Counter

    from training.data import load_split, sample_by_source, sample_queries

    ps = load_split("train", ("medquad", "pubmedqa"))
    s = sample_by_source(ps, 200, 7, {"pubmedqa": 0.3})
    assert Counter(q.source for q in s.queries) == {"pubmedqa": 60, "medquad": 140}
    assert len({q.qid for q in s.queries}) == 200
    again = sample_by_source(ps, 200, 7, {"pubmedqa": 0.3})
    assert [q.qid for q in again.queries] == [q.qid for q in s.queries]
    plain = sample_by_source(ps, 50, 7, {})
    assert [q.qid for q in plain.queries] == [q.qid for q in sample_queries(ps, 50, 7).queries]
    with pytest.raises(ValueError, match="pubmedqa_share"):
        RelevanceConfig(pubmedqa_share=1.5)


def test_classification_eval_threshold_from_val_and_errors_by_kind():
    import numpy as np

    from training.relevance import classification_eval

    def rows(spec):
        return [{"label": float(k == "positive"), "kind": k, "s": s} for k, s in spec]

    val = rows([("positive", 0.9), ("positive", 0.7), ("dense", 0.6), ("random", 0.1)])
    ev = rows([("positive", 0.8), ("positive", 0.65), ("same_focus", 0.75), ("dense", 0.2),
               ("random", 0.05), ("random", 0.72)])
    res = classification_eval({"s": lambda r: np.array([x["s"] for x in r])}, val, ev)["s"]
    assert res["threshold"] == pytest.approx(0.7)  # best F1 on val, not on the eval rows
    assert res["precision"] == pytest.approx(1 / 3) and res["recall"] == pytest.approx(0.5)
    k = res["by_kind"]
    assert k["positive"] == {"n": 2, "called_relevant": 0.5}
    assert k["same_focus"]["called_relevant"] == 1.0 and k["dense"]["called_relevant"] == 0.0
    assert k["random"] == {"n": 2, "called_relevant": 0.5}


def test_choose_weight_rule_and_refuses_held_out_sets():
    from training.relevance import choose_weight

    def res(rows, sets=("medquad-val", "pubmedqa-val")):
        return {"datasets": {d: {"systems": {"hybrid": {"ndcg@10": 0.7}} | {
            f"hybrid + {n} (w={w:g})": {"ndcg@10": v[i], "weight": w}
            for (n, w), v in rows.items()}} for i, d in enumerate(sets)}}

    r = choose_weight([res({("a", 0.2): (0.75, 0.70), ("a", 0.4): (0.80, 0.695),
                            ("a", 0.6): (0.90, 0.65)}),
                       res({("b", 0.2): (0.72, 0.71), ("b", 0.4): (0.85, 0.68)})])
    a, b = r["classifiers"]["a"], r["classifiers"]["b"]
    assert a["pick"] == 0.4  # 0.6 has the best mean but drops 5 points on one set
    assert not a["weights"]["0.6"]["admissible"] and a["weights"]["0.4"]["admissible"]
    assert b["pick"] == 0.2 and r["joint_pick"] == 0.2  # 0.4 drops b by 2 points
    with pytest.raises(ValueError, match="validation"):
        choose_weight([res({("a", 0.2): (0.8, 0.8)}, sets=("medquad-test", "pubmedqa-val"))])
