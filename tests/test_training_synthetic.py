"""Synthetic queries: template questions, round-trip filter, a tiny classifier on them."""
from training.common import RECIPES_DIR, load_config
from training.data import Passage
from training.synthetic import SyntheticConfig, keyphrases, roundtrip_filter, run, \
    template_queries


def test_templates_and_roundtrip(embedder):
    ps = [Passage("a", "t", "Metformin lowers blood glucose in type 2 diabetes patients.",
                  "pubmedqa", "1"),
          Passage("b", "t", "Statins reduce cholesterol and cardiovascular events in adults.",
                  "pubmedqa", "2"),
          Passage("c", "t", "Smoking cessation improves lung function in COPD.", "pubmedqa", "3")]
    kp = keyphrases([p.text for p in ps])
    assert all(len(k) == 2 for k in kp)
    qs = template_queries(ps)
    assert all(q.endswith("?") for q in qs)
    keep = roundtrip_filter(qs + ["completely unrelated gardening tips?"], ps + [ps[0]], ps,
                            embedder, k=1)
    assert keep[:3] == [True, True, True]


def test_tiny_synthetic_run(embedder, tmp_path):
    cfg = load_config(SyntheticConfig, RECIPES_DIR / "synthetic-tiny.yaml", ["name=syn-tiny"])
    res = run(cfg, output=str(tmp_path / "run"), embedder=embedder)
    man = res["manifest"]
    stats = man["data"]["note"]["synthetic"]
    assert 0 < stats["kept_roundtrip"] <= stats["generated"] <= cfg.n_passages
    assert (tmp_path / "run" / "synthetic_queries.jsonl").exists()
    assert res["entry"]["kind"] == "relevance"
    assert "fine-tuned" in man["metrics_after"]
