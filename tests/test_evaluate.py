import math

import pytest

from rag_app.evaluate import (classification_metrics, mbr_select, mrr_at, ndcg_at, recall_at,
                              retrieval_metrics, rouge_scores, token_f1, yes_no_maybe)
from rag_app.retrieve import cc_fuse, rrf_fuse


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


def test_weighted_rrf_leans_on_the_heavier_ranking():
    # equal weights: a tie broken by row id; dense weight 0.7: the dense top row wins
    assert rrf_fuse([[1, 2], [2, 1]], k=60)[0][1] == pytest.approx(rrf_fuse([[1, 2], [2, 1]])[1][1])
    fused = rrf_fuse([[1, 2], [2, 1]], k=60, weights=[0.7, 0.3])
    assert fused[0][0] == 1 and fused[0][1] == pytest.approx(0.7 / 61 + 0.3 / 62)


def test_cc_fusion_normalises_each_list_and_weights_them():
    dense = [(1, 0.9), (2, 0.6), (3, 0.3)]  # normalised 1, 0.5, 0
    bm25 = [(2, 12.0), (4, 4.0)]  # normalised 1, 0
    fused = dict(cc_fuse([dense, bm25], [0.5, 0.5]))
    assert fused == pytest.approx({1: 0.5, 2: 0.75, 3: 0.0, 4: 0.0})
    assert cc_fuse([dense, bm25], [0.5, 0.5])[0][0] == 2  # strong in both beats top of one
    # all weight on dense: the dense order; a one-item or empty list does not divide by zero
    assert [r for r, _ in cc_fuse([dense, bm25], [1.0, 0.0])][:3] == [1, 2, 3]
    assert cc_fuse([[(7, 3.0)], []], [0.5, 0.5]) == [(7, 0.5)]
    # scale-free: multiplying the BM25 scores by 100 changes nothing
    assert cc_fuse([dense, [(r, s * 100) for r, s in bm25]], [0.5, 0.5]) == \
        cc_fuse([dense, bm25], [0.5, 0.5])


def test_retrieval_config_fusion_and_its_default_weight():
    from rag_app.config import FUSION_WEIGHTS, RetrievalConfig

    assert RetrievalConfig().fusion == "cc" and RetrievalConfig().weight == FUSION_WEIGHTS["cc"]
    assert RetrievalConfig(fusion="rrf").weight == FUSION_WEIGHTS["rrf"]
    assert RetrievalConfig(fusion="rrf", dense_weight=0.2).weight == 0.2
    with pytest.raises(ValueError, match="fusion"):
        RetrievalConfig(fusion="max")


def test_fusion_dev_split_is_training_side_and_disjoint_from_the_test_split():
    from rag_app.datasets import load_retrieval_dataset, medquad_records, medquad_test_titles

    dev, test = load_retrieval_dataset("medquad-dev"), load_retrieval_dataset("medquad-test")
    title = {r["pid"]: r["title"] for r in medquad_records()}
    dev_titles = {title[p] for rel in dev.qrels.values() for p in rel}
    assert len(dev.queries) > 500 and not dev_titles & medquad_test_titles()
    assert not set(dev.queries) & set(test.queries)


def test_qa_metrics():
    assert token_f1("The cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert yes_no_maybe("Yes. Telephone counselling helped [1].") == "yes"
    assert yes_no_maybe("No, it did not [2].") == "no"
    assert yes_no_maybe("The evidence is mixed.") == "maybe"
    c = classification_metrics(["yes", "no", "yes"], ["yes", "yes", "yes"])
    assert c["accuracy"] == pytest.approx(2 / 3)
    assert c["no"]["recall"] == 0.0


def test_mbr_select_keeps_the_consensus_candidate():
    """The chosen candidate has the highest mean ROUGE against the others, so an outlier that
    ranks first loses to what most candidates agree on; ties and a lone candidate keep the
    first; no candidate is an error."""
    beams = ["What are the treatments for gout?",
             "What causes headache after a lumbar puncture?",
             "What causes headache after lumbar puncture?",
             "How long does headache after a lumbar puncture last?"]
    pick = mbr_select(beams)
    utility = [sum(sum(rouge_scores(c, o).values()) / 3 for o in beams if o is not c)
               for c in beams]
    assert pick == utility.index(max(utility)) == 1 and utility[0] < min(utility[1:])
    assert mbr_select(["same words", "same words", "other words"]) == 0
    assert mbr_select(["only one"]) == 0
    with pytest.raises(ValueError, match="candidate"):
        mbr_select([])


def test_mbr_select_scoring_each_pair_once_matches_the_two_sided_definition():
    """mbr_select scores each pair once (ROUGE F is symmetric): on 200 random candidate sets
    it picks what scoring every candidate against every other one, both ways, picks."""
    import random

    words = "what are the treatments causes of gout headache after lumbar puncture".split()
    rng = random.Random(0)
    for _ in range(200):
        c = [" ".join(rng.choices(words, k=rng.randint(3, 9))) for _ in range(rng.randint(2, 8))]
        u = [sum(sum(rouge_scores(x, o).values()) / 3 for j, o in enumerate(c) if j != i)
             for i, x in enumerate(c)]
        best = 0
        for i in range(1, len(u)):
            if u[i] > u[best] + 1e-12:
                best = i
        assert mbr_select(c) == best, c
