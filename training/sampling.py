"""Example ordering for instruction tuning, chosen in the recipe (`sampling:`):

- random:       a seeded shuffle;
- curriculum:   easy -> hard by a difficulty score (monotone non-decreasing);
- hard:         hard-example weighting: examples are drawn (with replacement, seeded) with
                probability proportional to difficulty ** hard_power, then shuffled.

The trainer then reads the examples in this order (train_sampling_strategy="sequential"), so
the order chosen here is the order the model sees.

Difficulty: the base model's per-example loss on the target when given (`losses`), otherwise
a heuristic in [0, 1]: more distractors and longer prompts are harder, and a gold-absent
example (the model must notice the answer is missing) counts as the hardest distractor setting.
"""
from __future__ import annotations

import math
import random

STRATEGIES = ("random", "curriculum", "hard")


def heuristic_difficulty(examples: list) -> list[float]:
    """0.5 * distractor share + 0.5 * prompt length relative to the longest prompt."""
    if not examples:
        return []
    max_len = max(e.prompt_tokens or len(e.prompt) for e in examples) or 1
    out = []
    for e in examples:
        n_src = max(len(e.sources), 1)
        distract = 1.0 if e.gold_absent else e.n_distractors / n_src
        out.append(0.5 * distract + 0.5 * (e.prompt_tokens or len(e.prompt)) / max_len)
    return out


def base_model_losses(model, tokenizer, examples: list, max_length: int = 512) -> list[float]:
    """Mean token loss of the target completion under `model` (the base), one per example."""
    import torch

    losses = []
    model.eval()
    with torch.inference_mode():
        for e in examples:
            p = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
            c = tokenizer(e.completion, add_special_tokens=False)["input_ids"]
            ids = (p + c)[:max_length]
            labels = ([-100] * len(p) + c)[:max_length]
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            losses.append(float(out.loss))
    return losses


def difficulties(examples: list, losses: list[float] | None = None) -> list[float]:
    if losses is not None:
        if len(losses) != len(examples):
            raise ValueError(f"losses has {len(losses)} entries for {len(examples)} examples")
        return [float(x) for x in losses]
    return heuristic_difficulty(examples)


def order_examples(examples: list, strategy: str = "random", seed: int = 0,
                   losses: list[float] | None = None, hard_power: float = 1.0,
                   n_out: int | None = None) -> list:
    """The examples in training order; each gets its `difficulty` set."""
    if strategy not in STRATEGIES:
        raise ValueError(f"sampling={strategy!r} is invalid: choose one of {STRATEGIES}")
    diff = difficulties(examples, losses)
    for e, d in zip(examples, diff):
        e.difficulty = d
    rng = random.Random(seed)
    idx = list(range(len(examples)))
    if strategy == "random":
        rng.shuffle(idx)
    elif strategy == "curriculum":
        rng.shuffle(idx)  # ties in random order
        idx.sort(key=lambda i: diff[i])
    else:
        weights = [max(d, 1e-6) ** hard_power for d in diff]
        if not all(math.isfinite(w) for w in weights):
            raise ValueError("difficulty scores must be finite for hard-example weighting")
        idx = rng.choices(idx, weights=weights, k=n_out or len(idx)) if idx else []
        rng.shuffle(idx)
    return [examples[i] for i in idx]
