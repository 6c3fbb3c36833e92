"""`rag eval decision-probe`: the cross-validated probes find a signal the features carry,
find none in shuffled labels, never score a row with a probe fitted on it, refuse models
tuned here and bad folds, and run end to end on the real base generator and PubMedQA's
training side (JSON + PNG)."""
import json

import numpy as np
import pytest

from training.decision_probe import LABELS, oof_proba, probe_metrics


def _labels(n, seed=0):
    rng = np.random.default_rng(seed)
    return [LABELS[i] for i in rng.choice(3, size=n, p=[0.15, 0.35, 0.5])]


def test_probe_finds_the_signal_the_features_carry_and_none_in_shuffled_labels():
    gold = _labels(300)
    rng = np.random.default_rng(1)
    X = np.eye(3)[[LABELS.index(g) for g in gold]] + rng.normal(0, 0.3, (300, 3))
    X = np.hstack([X, rng.normal(size=(300, 20))])  # plus noise columns
    m = probe_metrics(oof_proba(X, gold), gold, "yes")
    assert m["accuracy"] > 0.9 and m["auc_yes_no"] > 0.95
    assert m["majority_baseline"] == pytest.approx(gold.count("yes") / 300)
    assert m["gain_ci95"][0] > 0.3
    shuffled = list(np.random.default_rng(2).permutation(gold))
    m = probe_metrics(oof_proba(X, shuffled), shuffled, "yes")
    assert abs(m["auc_yes_no"] - 0.5) < 0.15 and m["gain_ci95"][0] < 0 < m["gain_ci95"][1] + 0.05


def test_rows_are_scored_by_probes_fitted_without_them():
    """One unique column per row: a probe fitted on a row memorises it (in-sample accuracy
    1), but out of fold nothing carries over, so accuracy stays near chance."""
    gold = _labels(120, seed=3)
    X = np.eye(120)
    from sklearn.linear_model import LogisticRegression

    assert LogisticRegression(C=100, max_iter=5000).fit(X, gold).score(X, gold) == 1.0
    m = probe_metrics(oof_proba(X, gold, C=100), gold, "yes")
    assert m["accuracy"] <= m["majority_baseline"] + 0.05


def test_bad_folds_labels_and_tuned_models_are_refused(tmp_path):
    from training.decision_probe import eval_decision_probe
    from training.qa import QAConfig

    gold = _labels(60)
    with pytest.raises(ValueError, match="folds=1 is invalid"):
        oof_proba(np.zeros((60, 2)), gold, folds=1)
    with pytest.raises(ValueError, match="need all of"):
        oof_proba(np.zeros((4, 2)), ["yes", "no", "yes", "no"], folds=2)
    tuned = tmp_path / "qa-tuned"
    tuned.mkdir()
    (tuned / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    (tuned / "manifest.json").write_text(json.dumps({"training_type": "qa"}))
    with pytest.raises(ValueError, match="qa-tuned was tuned in this project"):
        eval_decision_probe([str(tuned)], QAConfig())


@pytest.mark.slow
def test_decision_probe_end_to_end_on_the_base_generator(tmp_path, capsys):
    from rag_app.cli import main
    from training.qa import pubmedqa_rows

    out = tmp_path / "probe.json"
    assert main(["eval", "decision-probe", "--model", "base", "--limit", "40", "--folds", "2",
                 "--layers", "2,30", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["features"]) == ["tfidf", "base L2", "base L30"]
    gold = [r["decision"] for r in pubmedqa_rows("train")[:40]]
    assert res["n"] == 40 and res["labels"] == {k: gold.count(k) for k in set(gold)}
    for m in res["features"].values():
        assert 0 <= m["auc_yes_no"] <= 1 and sum(m["predicted"].values()) == 40
        assert m["gain"] == pytest.approx(m["accuracy"] - m["majority_baseline"])
    assert out.with_suffix(".png").is_file()
    assert "out-of-fold linear probes" in capsys.readouterr().out
    assert main(["eval", "decision-probe", "--model", "base", "--limit", "40", "--folds", "2",
                 "--layers", "31"]) == 2
    assert "layers=[31] is invalid: this model has layers 1..30" in capsys.readouterr().err
