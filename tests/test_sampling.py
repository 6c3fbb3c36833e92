"""Example ordering: random is a permutation, curriculum is monotone in difficulty, hard-example
weighting favours hard examples; base-model losses can replace the heuristic."""
from collections import Counter

import pytest

from training.sampling import heuristic_difficulty, order_examples


def test_curriculum_is_monotone(tiny_examples):
    ordered = order_examples(list(tiny_examples), "curriculum", seed=3)
    d = [e.difficulty for e in ordered]
    assert d == sorted(d) and len(set(d)) > 1
    assert sorted(e.qid for e in ordered) == sorted(e.qid for e in tiny_examples)


def test_curriculum_with_losses(tiny_examples):
    losses = [float(i % 5) for i in range(len(tiny_examples))]
    ordered = order_examples(list(tiny_examples), "curriculum", losses=losses)
    assert [e.difficulty for e in ordered] == sorted(losses)


def test_random_is_seeded_permutation(tiny_examples):
    a = order_examples(list(tiny_examples), "random", seed=1)
    b = order_examples(list(tiny_examples), "random", seed=1)
    assert [e.qid for e in a] == [e.qid for e in b]
    assert Counter(e.qid for e in a) == Counter(e.qid for e in tiny_examples)


def test_hard_weighting_prefers_hard(tiny_examples):
    exs = list(tiny_examples)
    losses = [10.0 if i == 0 else 0.01 for i in range(len(exs))]
    drawn = order_examples(exs, "hard", seed=0, losses=losses, n_out=200)
    assert len(drawn) == 200
    assert sum(e.qid == exs[0].qid for e in drawn) > 100


def test_heuristic_ranks_gold_absent_and_bad_strategy(tiny_examples):
    d = heuristic_difficulty(tiny_examples)
    assert all(0 <= x <= 1 for x in d)
    with pytest.raises(ValueError, match="sampling='nope'"):
        order_examples(list(tiny_examples), "nope")
