"""training.summary_compare: per-row ROUGE recomputed from saved `rag eval summarize` results
matches the saved means; the paired bootstrap interval excludes 0 for a real gap and is
[0, 0] for no gap; mismatched rows and edited files are refused."""
import json
from pathlib import Path

import pytest

from training.summary_compare import interval, main, paired, row_scores

REPO = Path(__file__).resolve().parent.parent
VAL = REPO / "results" / "summarize_val_v3_beam8.json"


def _entry(path=VAL):
    return next(iter(json.loads(path.read_text())["models"].values()))


def test_row_scores_reproduce_the_saved_means():
    entry = _entry()
    for metric in ("rouge1", "rouge2", "rougeL"):
        scores = row_scores(entry, metric)
        assert len(scores) == entry["n"] == 104
        assert sum(scores.values()) / len(scores) == pytest.approx(entry[metric], abs=1e-9)


def test_paired_interval_on_a_real_gap_and_on_none():
    entry = _entry()
    model = row_scores(entry, "rouge2")
    gold = {r["id"]: 1.0 for r in entry["rows"]}  # the references scored against themselves
    gap = paired(model, gold, resamples=2000)
    assert gap["mean_diff"] == pytest.approx(1 - entry["rouge2"])
    assert 0 < gap["ci95"][0] < gap["mean_diff"] < gap["ci95"][1] <= 1
    assert gap["b_wins"] + gap["ties"] == 104 and gap["b_loses"] == 0
    same = paired(model, dict(model), resamples=500)
    assert same["mean_diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["ties"] == 104
    assert paired(model, gold, 2000, seed=3) == paired(model, gold, 2000, seed=3)
    with pytest.raises(ValueError, match="different rows"):
        paired(model, {k: v for k, v in list(model.items())[1:]})


def test_cli_prints_saves_and_refuses_edited_files(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    other = REPO / "results" / "summarize_val_v3_greedy.json"
    s = main([str(other), str(VAL), "--out", str(out)])
    text = capsys.readouterr().out
    assert "bootstrap 95% interval" in text and f"{s['mean_diff']:+.4f}" in text
    assert json.loads(out.read_text())["mean_diff"] == s["mean_diff"] and s["n"] == 104
    edited = json.loads(VAL.read_text())
    next(iter(edited["models"].values()))["rouge2"] += 0.05
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="recomputed from its rows"):
        main([str(other), str(bad)])
    two = REPO / "results" / "summarize_meqsum_v3.json"
    with pytest.raises(ValueError, match="name one with --model-a"):
        main([str(two), str(two)])


def test_one_result_interval_covers_its_mean(capsys):
    scores = row_scores(_entry(), "rouge2")
    s = interval(scores, resamples=2000)
    assert s["n"] == 104 and s["ci95"][0] < s["mean_a"] < s["ci95"][1]
    assert s["ci95"][1] - s["ci95"][0] > 0.02  # 104 rows cannot pin ROUGE-2 to +-0.01
    assert main([str(VAL), "--resamples", "2000"])["ci95"] == s["ci95"]
    assert "bootstrap 95% interval" in capsys.readouterr().out
