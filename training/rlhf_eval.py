"""`rag eval reward` and `rag eval policy`: the RLHF measurements.

- reward: pairwise accuracy of reward models on held-out pairs, per origin, on the val split
  (other foci / pmids than training) and on the eval split (the held-out PubMedQA pmids and
  MedQuAD test foci, never trained on), human pairs reported apart from data-derived ones.
- policy: greedy answers of each generator on held-out prompts (eval split): mean reward-model
  score, rubric total (training/data.py), win rate against the FIRST model by the reward model
  and by the rubric, KL of each adapter's answers to its reference (the adapter disabled),
  answer length, refusal accuracy (refuses exactly when the gold passage is absent),
  citation validity, and the rubric total on the app's 1-5 rating scale (a proxy for mean
  user ratings, `training.data.rubric_rating`).
"""
from __future__ import annotations


def eval_reward(refs: list[str], n_pairs: int = 300, seed: int = 0) -> dict:
    from .data import HELDOUT_BARE_SHARE, data_pairs, describe_preferences
    from .reward import (RewardConfig, load_reward_model, pairwise_accuracy, resolve_reward,
                         reward_settings, to_rows)

    out: dict = {"pairs": {}, "models": {}}
    for ref in refs:
        label, _, r = ref.partition("=") if "=" in ref else (ref, "", ref)
        path = resolve_reward(r) if r not in ("untrained",) else "default"
        cfg = RewardConfig(**reward_settings(path))
        splits = {s: data_pairs(s, n_pairs, seed + 7, cfg.n_sources, cfg.answer_words,
                                 bare_share=HELDOUT_BARE_SHARE)
                  for s in ("val", "eval")}
        out["pairs"] = {s: describe_preferences(p) for s, p in splits.items()}
        model, tok = load_reward_model(path, cfg.max_length)
        out["models"][label] = {s: pairwise_accuracy(model, tok, to_rows(p, cfg), cfg.max_length)
                                for s, p in splits.items()}
        for s in splits:
            m = out["models"][label][s]
            print(f"{label:24s} {s:5s} pairwise accuracy {m['accuracy']:.3f} (n={m['n']})  " +
                  "  ".join(f"{k.split(':')[-1]} {v['accuracy']:.2f}"
                            for k, v in m["by_origin"].items()))
    return out


def eval_policy(refs: list[str], reward: str = "reward", n: int = 24, seed: int = 0,
                max_new_tokens: int = 64) -> dict:
    from rag_app.models import ModelRegistry
    from rag_app.prompts import is_no_answer, parse_answer

    from .data import rubric_rating
    from .policy import load_causal, rl_prompts
    from .ppo import PPOConfig, Scorer, evaluate_policy
    from .reward import resolve_reward

    scorer = Scorer(resolve_reward(reward), PPOConfig())
    out: dict = {"n": n, "split": "eval", "reward_model": reward, "models": {}}
    first = None
    for ref in refs:
        label, _, r = ref.partition("=") if "=" in ref else (ref, "", ref)
        base, adapter, name = ModelRegistry().resolve_generator(r)
        model, tok = load_causal(base, adapter)
        recs = rl_prompts(tok, "eval", n, seed)
        m = evaluate_policy(model, tok, recs, scorer, max_new_tokens)
        refusal = [is_no_answer(a) == (not rec["gold_numbers"]) for a, rec in zip(m["answers"], recs)]
        valid = [not parse_answer(a, rec["sources"])[2] for a, rec in zip(m["answers"], recs)]
        m |= {"rating_rubric_1to5": sum(map(rubric_rating, m["rubric_each"])) / len(recs),
              "refusal_accuracy": sum(refusal) / len(recs),
              "citation_validity": sum(valid) / len(recs), "model": name}
        if first is None:
            first = m
        m["win_rate_reward"] = sum(a > b for a, b in zip(m["scores"], first["scores"])) / len(recs)
        m["win_rate_rubric"] = sum(a > b for a, b in zip(m["rubric_each"],
                                                         first["rubric_each"])) / len(recs)
        m["tie_rate_rubric"] = sum(a == b for a, b in zip(m["rubric_each"],
                                                          first["rubric_each"])) / len(recs)
        m["loss_rate_rubric"] = 1.0 - m["win_rate_rubric"] - m["tie_rate_rubric"]
        out["models"][label] = m
        print(f"{label:24s} reward {m['score']:7.3f}  rubric {m['rubric']:6.3f}  "
              f"win(reward) {m['win_rate_reward']:.2f}  win/tie/loss(rubric) "
              f"{m['win_rate_rubric']:.2f}/{m['tie_rate_rubric']:.2f}/"
              f"{m['loss_rate_rubric']:.2f}  "
              f"KL {m['kl']:6.2f}  words {m['words']:5.1f}  refusal-acc "
              f"{m['refusal_accuracy']:.2f}  cite-valid {m['citation_validity']:.2f}  "
              f"rating (rubric proxy, 1-5) {m['rating_rubric_1to5']:.2f}")
    return out


def plot_policy(result: dict, path: str) -> None:
    from rag_app.ui_admin import grouped_bars

    metrics = ["win_rate_reward", "win_rate_rubric", "refusal_accuracy", "citation_validity"]
    fig = grouped_bars({k: v for k, v in result["models"].items()}, metrics,
                       f"policies on {result['n']} held-out prompts (win rates vs the first)",
                       figsize=(8, 3.4), fontsize=7)
    fig.savefig(path, dpi=100)


def plot_reward_eval(result: dict, path: str) -> None:
    from rag_app.ui_admin import grouped_bars

    series = {f"{m} / {s}": {o: v["accuracy"] for o, v in r[s]["by_origin"].items()}
              for m, r in result["models"].items() for s in r}
    origins = sorted({o for v in series.values() for o in v})
    fig = grouped_bars(series, origins, "reward models: held-out pairwise accuracy",
                       figsize=(9, 3.4), fontsize=7)
    fig.savefig(path, dpi=100)
