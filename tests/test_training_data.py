"""Training data: held-out splits never leak, mined negatives never contain a positive."""
from training.data import (forbidden_negatives, load_split, mine_negatives, relevance_pairs,
                           retriever_triplets, sample_queries, split_of)
from rag_app.datasets import medquad_test_titles, pubmedqa_heldout_pmids


def test_splits_are_disjoint_and_exclude_heldout():
    tr, va, ev = (load_split(s) for s in ("train", "val", "eval"))
    test_titles, held = medquad_test_titles(), pubmedqa_heldout_pmids()
    # case-blind: MedQuAD spells some foci two ways, and a disease must stay on one side
    groups = [{q.group.strip().lower() for q in ps.queries}
              | {p.group.strip().lower() for p in ps.passages.values()} for ps in (tr, va, ev)]
    assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
    assert not set(tr.passages) & set(ev.passages) and not set(va.passages) & set(ev.passages)
    for ps in (tr, va):
        for q in ps.queries:
            assert q.group not in (test_titles if q.source == "medquad" else held)
        for p in ps.passages.values():
            assert p.group not in (test_titles if p.source == "medquad" else held)
    assert {q.group for q in ev.queries if q.source == "pubmedqa"} <= held
    assert all(split_of(q) == "eval" for q in ev.queries)
    assert len(tr.queries) > 10 * len(ev.queries) / 2


def test_mined_negatives_never_positive(embedder, tmp_path):
    ps = sample_queries(load_split("train"), 12, seed=1)
    mined = mine_negatives(ps, embedder, n_hard=2, n_random=2, mine_top=15, pool_size=30,
                           seed=1, cache_dir=tmp_path, max_words=16)
    n_same = 0
    for q in ps.queries:
        bad = forbidden_negatives(q, ps.passages)
        negs = mined.same_focus[q.qid] + mined.dense[q.qid] + mined.random[q.qid]
        assert negs, q.qid
        assert not set(negs) & bad
        assert not set(negs) & q.positives
        for pid in negs:  # nor a passage written for the identical question
            assert ps.passages[pid].question.lower().rstrip(" ?") != q.text.lower().rstrip(" ?")
        n_same += len(mined.same_focus[q.qid])
        for pid in mined.same_focus[q.qid]:
            assert ps.passages[pid].group == q.group
    assert n_same > 0  # same disease, other question type: the classic hard negative
    rows = relevance_pairs(ps, mined, max_positives=1)
    pos = {(r["qid"], r["pid"]) for r in rows if r["label"] == 1.0}
    assert all((r["qid"], r["pid"]) not in pos for r in rows if r["label"] == 0.0)
    assert {r["kind"] for r in rows} >= {"positive", "same_focus", "dense", "random"}
    trip = retriever_triplets(ps, mined)
    assert trip and all(t["positive"] != t["negative"] for t in trip)


def test_train_only_negatives_leave_the_measured_pairs_alone(embedder, tmp_path):
    """train_same_focus / train_n_hard / train_n_random shape the TRAINING pairs only: the
    validation and held-out pairs a recipe is measured on stay those of n_hard / n_random."""
    from collections import Counter

    from training.relevance import RelevanceConfig, build_pairs

    common = dict(n_hard=2, n_random=1, mine_top=15, mine_pool=60, mine_words=16, seed=3,
                  sources="medquad")
    plain = RelevanceConfig(**common)
    more = RelevanceConfig(**common, train_n_hard=3, train_same_focus=2, train_n_random=0)
    for split in ("val", "eval"):
        a, _ = build_pairs(plain, split, 8, embedder, tmp_path)
        b, _ = build_pairs(more, split, 8, embedder, tmp_path)
        assert [(r["qid"], r["pid"], r["label"]) for r in a] == \
            [(r["qid"], r["pid"], r["label"]) for r in b]
    a, _ = build_pairs(plain, "train", 10, embedder, tmp_path)
    b, _ = build_pairs(more, "train", 10, embedder, tmp_path)
    ka, kb = Counter(r["kind"] for r in a), Counter(r["kind"] for r in b)
    assert kb["random"] == 0 < ka["random"]
    assert kb["same_focus"] > ka["same_focus"]  # two per query where the focus has them
    per_q = Counter(r["qid"] for r in b if r["kind"] == "same_focus")
    assert max(per_q.values()) == 2
    assert all(n <= 3 for n in Counter(r["qid"] for r in b if r["label"] == 0).values())
