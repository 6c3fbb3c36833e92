import math

import pytest

from rag_app.evaluate import (classification_metrics, mrr_at, ndcg_at, recall_at,
                              retrieval_metrics, token_f1, yes_no_maybe)
from rag_app.retrieve import rrf_fuse


def test_retrieval_metrics_on_hand_examples():
    ranked = ["a", "x", "b", "y"]
    rel = {"a", "b"}
    assert recall_at(ranked, rel, 1) == 0.5
    assert recall_at(ranked, rel, 3) == 1.0
    assert mrr_at(["x", "a"], rel) == 0.5
    assert mrr_at(["x", "y"], rel) == 0.0
    ideal = 1 + 1 / math.log2(3)
    assert ndcg_at(ranked, rel) == pytest.approx((1 + 1 / math.log2(4)) / ideal)
    m = retrieval_metrics({"q1": ["a"], "q2": []}, {"q1": {"a"}, "q2": {"b"}})
    assert m["recall@1"] == 0.5 and m["queries"] == 2


def test_rrf_fusion_rewards_agreement():
    fused = rrf_fuse([[1, 2, 3], [2, 4, 9]], k=60)
    assert fused[0][0] == 2  # found by both (ranks 2 and 1) beats first in one list only
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1] == (1, pytest.approx(1 / 61))
    assert {r for r, _ in fused} == {1, 2, 3, 4, 9}


def test_qa_metrics():
    assert token_f1("The cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert yes_no_maybe("Yes. Telephone counselling helped [1].") == "yes"
    assert yes_no_maybe("No, it did not [2].") == "no"
    assert yes_no_maybe("The evidence is mixed.") == "maybe"
    c = classification_metrics(["yes", "no", "yes"], ["yes", "yes", "yes"])
    assert c["accuracy"] == pytest.approx(2 / 3)
    assert c["no"]["recall"] == 0.0
