"""`rag eval robustness`: how much a generator's answers depend on the instruction's wording.

The held-out PubMedQA fold (never trained on) is rendered as RAFT prompts by THE serving prompt
(gold passage among distractors, as `rag train instruct` builds them, from the instruct recipe's
settings). Each prompt is asked once with the serving instruction (prompts.ANSWER_INSTRUCTION)
and once with each of the 5 phrasings kept out of training (augment.EVAL_INSTRUCTIONS). Per
phrasing: yes/no/maybe accuracy of the stated decision, the share of answers that state one in
their first sentence, the share of "yes", and the yes-vs-no AUC of the first answer token's
log-odds (from the generation's own first step). The spread is max - min accuracy over the 5
unseen phrasings. `--calibrate [relative]` offsets the first answer token's Yes/No logits by
each wording's lean on content-free prompts (contextual calibration; no labels used);
`--calibrate matched` so that each wording says "Yes" to as many unlabelled training-side
questions as the serving instruction does (`--pool N` of them). Each model's spread is also
given with its bootstrap interval and the spread its per-question flips alone would make
(spread_noise).

`python -m training.robustness RESULT.json` prints a saved result's table again.

`rag eval curves` (also here) puts the training-loss curves of registered runs on one plot:
random vs curriculum sampling at equal steps, with the final train / eval losses.
"""
from __future__ import annotations

from collections import Counter

from .augment import EVAL_INSTRUCTIONS, check_disjoint, with_instruction
from .instruct import InstructConfig  # its recipe sets the prompts

PHRASINGS = ("serving",) + tuple(f"unseen-{i}" for i in range(1, len(EVAL_INSTRUCTIONS) + 1))


def instruction_of(phrasing: str) -> str:
    from rag_app.prompts import ANSWER_INSTRUCTION

    if phrasing == "serving":
        return ANSWER_INSTRUCTION
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing={phrasing!r} is invalid: choose one of {PHRASINGS}")
    return EVAL_INSTRUCTIONS[PHRASINGS.index(phrasing) - 1]


def robustness_items(cfg: InstructConfig, tokenizer, limit: int = 0,
                     split: str = "eval") -> list[tuple]:
    """(RAFT example, gold decision): one per PubMedQA question of `split` (the gold passage
    always present), sorted by id. "eval" is the held-out fold; "val" the training side's
    validation slice, where settings are chosen."""
    from .tasks import check_eval_split

    check_eval_split(split)
    return _raft_items(cfg, tokenizer, limit, split)


def _raft_items(cfg: InstructConfig, tokenizer, limit: int, split: str) -> list[tuple]:
    from .data import _pubmedqa_answers, instruction_examples, load_split

    records = _pubmedqa_answers()
    n_q = sum(q.qid in records for q in load_split(split, ("pubmedqa",)).queries)
    exs = instruction_examples(tokenizer, n_q, split, ("pubmedqa",), 1.0, cfg.n_sources,
                               cfg.max_gold, 0.0, cfg.max_prompt_tokens, cfg.answer_words,
                               cfg.seed + 2)
    seen, items = set(), []
    for e in sorted(exs, key=lambda e: e.qid):
        qid = e.qid.partition(":")[0]
        if qid not in seen:
            seen.add(qid)
            items.append((e, records[qid]["final_decision"]))
    return items[:limit] if limit else items


def phrased_prompt(prompt: str, phrasing: str) -> str:
    if phrasing == "serving":
        return prompt
    out = with_instruction(prompt, instruction_of(phrasing))
    if out == prompt:
        raise ValueError("the prompt does not hold the serving instruction exactly once: the "
                         "phrasing cannot be swapped in")
    return out


CONTENT_FREE = ("N/A", "", "[MASK]")  # stand-ins for the question and the passages
CALIBRATIONS = (None, "content-free", "relative", "matched")  # rag eval robustness --calibrate


def pool_items(cfg: InstructConfig, tokenizer, n: int) -> list:
    """The first `n` training-side PubMedQA questions (by id) as serving RAFT examples: the
    UNLABELLED pool `--calibrate matched` reads each wording's lean on (never val or eval;
    only their prompts are used)."""
    if n < 1:
        raise ValueError(f"calibration pool of {n} questions is invalid: use >= 1")
    return [e for e, _ in _raft_items(cfg, tokenizer, n, "train")]


def matched_offsets(pool: dict[str, list[float]]) -> dict[str, float]:
    """Per phrasing, the yes-vs-no log-odds offset b that makes its share of "Yes" first
    tokens (log-odds - b > 0) on the unlabelled pool equal the serving instruction's raw
    share (b = 0 for serving): quantile matching of each wording's decisions to the
    instruction the model was tuned on; b sits halfway between the two pool values it falls
    between. No labels are used."""
    serving = pool["serving"]
    if not serving or any(len(v) != len(serving) for v in pool.values()):
        raise ValueError("every phrasing needs log-odds on the same, non-empty pool")
    n = len(serving)
    n_no = n - sum(x > 0 for x in serving)  # how many of the pool serving answers "No" to
    out = {}
    for p, xs in pool.items():
        xs = sorted(xs)
        if p == "serving":
            out[p] = 0.0
        elif n_no == 0:
            out[p] = xs[0] - 1.0
        elif n_no == n:
            out[p] = xs[-1] + 1.0
        else:
            out[p] = (xs[n_no - 1] + xs[n_no]) / 2
    return out


def content_free_logodds(model, tok, phrasing: str, n_sources: int) -> float:
    """The model's yes-vs-no log-odds on prompts with no content: the serving prompt with
    `n_sources` passages and the question all replaced by a filler (mean over CONTENT_FREE),
    under `phrasing`. What the wording alone makes the model lean to (Zhao et al. 2021,
    "Calibrate before use": contextual calibration)."""
    import torch

    from rag_app.prompts import render_prompt
    from rag_app.types import Source

    from .qa import decision_logodds

    logits = []
    with torch.inference_mode():
        for filler in CONTENT_FREE:
            sources = [Source(i + 1, f"none-{i}", f"none-{i}", filler or "-", filler, 0.0)
                       for i in range(n_sources)]
            prompt = phrased_prompt(render_prompt(tok, filler or "?", sources), phrasing)
            enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
            logits.append(model(**enc).logits[0, -1])
    return sum(decision_logodds(tok, logits)) / len(logits)


def decision_bias(tok, logodds: float) -> dict[int, float]:
    """First-step logit offsets for "Yes" and "No" that bring a content-free log-odds of
    `logodds` to 0 (half each way, so their joint weight against other tokens barely moves)."""
    from .qa import yes_no_ids

    yes, no = yes_no_ids(tok)
    return {yes: -logodds / 2, no: logodds / 2}


def phrasing_metrics(answers: list[str], golds: list[str]) -> dict:
    from rag_app.evaluate import yes_no_maybe

    decisions = [yes_no_maybe(a) for a in answers]
    n = max(len(answers), 1)
    stated = sum(bool(_first_sentence_decision(a)) for a in answers)
    return {"accuracy": sum(d == g for d, g in zip(decisions, golds)) / n,
            "decision_stated": stated / n,
            "yes_share": decisions.count("yes") / n,
            "mean_words": sum(len(a.split()) for a in answers) / n,
            "predicted": dict(Counter(decisions))}


def _first_sentence_decision(answer: str) -> str | None:
    import re

    first = re.split(r"(?<=[.!?])\s", answer.strip(), maxsplit=1)[0].lower()
    m = re.search(r"\b(yes|no|maybe)\b", first)
    return m.group(1) if m else None


def spread(per_phrasing: dict) -> float:
    accs = [per_phrasing[p]["accuracy"] for p in PHRASINGS[1:] if p in per_phrasing]
    return max(accs) - min(accs) if accs else 0.0


def spread_noise(per_phrasing: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """How much of the spread the questions alone make, from the saved rows (the same
    questions under every wording). `ci95`: percentile bootstrap interval of the spread,
    questions resampled. `if_no_wording_effect`: the mean spread when each question's five
    right/wrong outcomes are shuffled among the five unseen wordings (a permutation null: the
    same per-question flips, no wording better than another); a spread near it is flips, not
    a lean that a per-wording offset could remove. `flip_share`: the mean share of questions
    whose decision under an unseen wording differs from the serving one."""
    import numpy as np

    from rag_app.evaluate import yes_no_maybe

    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    dec = {p: [yes_no_maybe(r["answer"]) for r in per_phrasing[p]["rows"]] for p in PHRASINGS}
    gold = [r["gold"] for r in per_phrasing["serving"]["rows"]]
    if not gold or any(len(d) != len(gold) for d in dec.values()):
        raise ValueError("every phrasing needs rows for the same, non-empty questions")
    ok = np.array([[d == g for d, g in zip(dec[p], gold)] for p in PHRASINGS[1:]], float)
    rng = np.random.default_rng(seed)
    boot = ok[:, rng.integers(0, len(gold), size=(resamples, len(gold)))].mean(2)
    lo, hi = np.percentile(boot.max(0) - boot.min(0), [2.5, 97.5])
    null = rng.permuted(np.broadcast_to(ok, (resamples,) + ok.shape), axis=1).mean(2)
    flips = [sum(a != b for a, b in zip(dec[p], dec["serving"])) / len(gold)
             for p in PHRASINGS[1:]]
    return {"ci95": [float(lo), float(hi)],
            "if_no_wording_effect": float((null.max(1) - null.min(1)).mean()),
            "flip_share": sum(flips) / len(flips), "resamples": resamples, "seed": seed}


def eval_robustness(refs: list[str], cfg: InstructConfig, limit: int = 0, max_new_tokens: int = 16,
                    batch_size: int = 8, split: str = "eval", calibrate: str | None = None,
                    pool_size: int = 60) -> dict:
    """`calibrate` offsets the first token's "Yes"/"No" logits under each phrasing (no labels
    used): by what a content-free prompt leans to (content_free_logodds), brought to 0 under
    every phrasing ("content-free") or to the serving instruction's own lean ("relative": only
    what a wording changes against the instruction the model was tuned on is taken out, the
    serving answers stay as they are); "matched": by matched_offsets on `pool_size`
    unlabelled training-side questions (pool_items), so every wording says "Yes" to as
    many of them as the serving instruction does (serving answers unchanged too)."""
    if calibrate not in CALIBRATIONS:
        raise ValueError(f"calibrate={calibrate!r} is invalid: use one of {CALIBRATIONS}")
    from .instruct import prompt_fingerprint
    from .qa import decision_auc, decision_logodds
    from .tasks import generate_texts, models_to_compare, split_fields

    check_disjoint()
    out: dict = {"dataset": ("pubmedqa-heldout" if split == "eval" else "pubmedqa-val")
                 + " (RAFT prompts: gold + distractors)",
                 **split_fields(split, "rag_app/splits/pubmedqa_heldout_pmids.txt"),
                 "phrasings": {p: instruction_of(p) for p in PHRASINGS},
                 "max_new_tokens": max_new_tokens, "n_sources": cfg.n_sources,
                 "calibrate": calibrate, "prompt": prompt_fingerprint(), "models": {}}
    for label, name, model, tok in models_to_compare(refs):
        items = robustness_items(cfg, tok, limit, split)
        golds = [g for _, g in items]
        cf = {p: content_free_logodds(model, tok, p, cfg.n_sources)
              for p in PHRASINGS} if calibrate in ("content-free", "relative") else {}
        offset = {p: c - (cf["serving"] if calibrate == "relative" else 0.0)
                  for p, c in cf.items()}
        pool: dict = {}
        if calibrate == "matched":
            prompts = [e.prompt for e in pool_items(cfg, tok, pool_size)]
            for p in PHRASINGS:
                first_pool: list = []
                generate_texts(model, tok, [phrased_prompt(q, p) for q in prompts], 1,
                               batch_size, desc=f"{label} pool {p}", first_logits=first_pool)
                pool[p] = decision_logodds(tok, first_pool)
            offset = matched_offsets(pool)
        per = {}
        for p in PHRASINGS:
            first: list = []
            answers = generate_texts(model, tok, [phrased_prompt(e.prompt, p) for e, _ in items],
                                     max_new_tokens, batch_size, desc=f"{label} {p}",
                                     first_logits=first,
                                     first_step_bias=decision_bias(tok, offset[p])
                                     if offset.get(p) else None)
            logodds = decision_logodds(tok, first)  # raw: before any calibration offset
            per[p] = phrasing_metrics(answers, golds) | {
                "decision_auc": decision_auc(logodds, golds),
                "rows": [{"id": e.group, "gold": g, "answer": a, "yes_no_logodds": round(x, 3)}
                         for (e, g), a, x in zip(items, answers, logodds)]}
            if cf:
                per[p]["content_free_logodds"] = round(cf[p], 3)
            if pool:
                per[p] |= {"offset": round(offset[p], 3),
                           "pool_yes_share": sum(x > 0 for x in pool[p]) / len(pool[p])}
        unseen = [per[p]["accuracy"] for p in PHRASINGS[1:]]
        out["models"][label] = {"model": name, "phrasings": per, "spread": spread(per),
                                "spread_noise": spread_noise(per),
                                "unseen_mean_accuracy": sum(unseen) / len(unseen)}
        out["n"] = len(items)
        if pool:
            out["pool"] = {"split": "train", "n": len(pool["serving"]), "labels_used": False}
        out["majority_baseline"] = max(Counter(golds).values()) / max(len(golds), 1)
    print_robustness(out)
    return out


def print_robustness(res: dict) -> None:
    print(f"{res.get('n')} PubMedQA questions ({res.get('split', 'eval')} split), decision "
          f"accuracy per instruction phrasing (majority baseline "
          f"{res.get('majority_baseline', 0):.3f})"
          + (f", decisions calibrated ({res['calibrate']}: "
             + ("each wording's yes share on unlabelled training-side questions matched to "
                "the serving one's" if res["calibrate"] == "matched"
                else "content-free prompts' lean") + ")"
             if res.get("calibrate") else ""))
    print(f"{'model':24s} " + " ".join(f"{p:>9s}" for p in PHRASINGS)
          + f" {'spread':>7s} {'stated':>7s} {'yes':>6s}")
    for label, m in res["models"].items():
        per = m["phrasings"]
        stated = sum(per[p]["decision_stated"] for p in PHRASINGS) / len(PHRASINGS)
        yes = sum(per[p]["yes_share"] for p in PHRASINGS) / len(PHRASINGS)
        print(f"{label:24s} " + " ".join(f"{per[p]['accuracy']:9.3f}" for p in PHRASINGS)
              + f" {m['spread']:7.3f} {stated:7.3f} {yes:6.3f}")
        print(f"{'  share yes':24s} " + " ".join(f"{per[p]['yes_share']:9.3f}"
                                                 for p in PHRASINGS))
        if all("decision_auc" in per[p] for p in PHRASINGS):  # results saved before it have none
            aucs = [per[p]["decision_auc"] for p in PHRASINGS]
            print(f"{'  AUC yes-vs-no':24s} " + " ".join(
                f"{'-' if a is None else f'{a:.3f}':>9s}" for a in aucs))
        noise = m.get("spread_noise") or (  # results saved before it: from their rows
            spread_noise(per) if all("rows" in per[p] for p in PHRASINGS) else None)
        if noise:
            print(f"{'  spread 95% interval':24s} [{noise['ci95'][0]:.3f}, {noise['ci95'][1]:.3f}]"
                  f"; with no wording effect ~{noise['if_no_wording_effect']:.3f}; decisions "
                  f"differing from serving's: {noise['flip_share']:.3f}")
        if all("offset" in per[p] for p in PHRASINGS):
            print(f"{'  pool yes share (raw)':24s} " + " ".join(
                f"{per[p]['pool_yes_share']:9.3f}" for p in PHRASINGS))
            print(f"{'  log-odds offset':24s} " + " ".join(
                f"{per[p]['offset']:+9.3f}" for p in PHRASINGS))
        if all("content_free_logodds" in per[p] for p in PHRASINGS):
            print(f"{'  content-free log-odds':24s} " + " ".join(
                f"{per[p]['content_free_logodds']:+9.3f}" for p in PHRASINGS))
    print("spread = max - min accuracy over the 5 unseen phrasings; stated / yes = mean share "
          "of answers whose first sentence states a decision / that decide yes; 'share yes' "
          "per phrasing (a decision that follows the wording swings here); 'AUC yes-vs-no': how "
          "well the first answer token's yes-vs-no log-odds separate yes from no questions "
          "under that phrasing (0.5 = not at all): a steady AUC under a swinging share means "
          "the wording moves the threshold, not the reading; 'with no wording effect': the "
          "mean spread if each question's outcomes were shuffled among the unseen wordings "
          "(the per-question flips alone)")


def plot_robustness(result: dict, path: str) -> None:
    from rag_app.ui_admin import grouped_bars

    series = {f"{label} (spread {m['spread']:.3f})": {p: m["phrasings"][p]["accuracy"]
                                                      for p in PHRASINGS}
              for label, m in result["models"].items()}
    fig = grouped_bars(series, list(PHRASINGS), f"decision accuracy by instruction phrasing, "
                       f"PubMedQA held-out (n={result.get('n')})", figsize=(9, 4), fontsize=8)
    fig.axes[0].axhline(result.get("majority_baseline", 0), color="grey", ls="--", lw=1)
    fig.savefig(path, dpi=100)


# ---------- training curves of registered runs ----------
def run_curves(names: list[str]) -> dict:
    """Training-loss logs and final losses of registered runs, from their manifests."""
    import json
    from pathlib import Path

    from rag_app.models import ModelRegistry

    if not names:
        raise ValueError("no --model given: pass two or more registered runs")
    reg, out = ModelRegistry(), {"models": {}}
    for ref in names:
        label, _, name = ref.rpartition("=") if "=" in ref else (ref, "", ref)
        entry = reg.get(name)
        manifest = Path(entry["path"]) / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"{name!r} has no manifest.json at {manifest}")
        m = json.loads(manifest.read_text())
        after, cfg = m.get("metrics_after") or {}, m.get("config") or {}
        log = after.get("train_loss_log") or []
        if not log:
            raise ValueError(f"{name!r} recorded no training-loss log")
        out["models"][label] = {
            "model": name, "sampling": cfg.get("sampling"), "augment_ratio": cfg.get("augment_ratio"),
            "max_steps": cfg.get("max_steps"), "log": log,
            "train_loss_last": after.get("train_loss_last"),
            "train_loss_mean_last_quarter": _tail_mean(log),
            "eval_loss_before": (m.get("metrics_before") or {}).get("eval_loss"),
            "eval_loss_after": after.get("eval_loss"), "wall_time_s": m.get("wall_time_s")}
    steps = {v["max_steps"] for v in out["models"].values()}
    out["equal_steps"] = len(steps) == 1
    print_curves(out)
    return out


def _tail_mean(log: list) -> float:
    tail = log[-max(len(log) // 4, 1):]
    return sum(v for _, v in tail) / len(tail)


def print_curves(res: dict) -> None:
    print(f"{'run':24s} {'sampling':>10s} {'aug':>5s} {'steps':>6s} {'loss last':>10s} "
          f"{'last 1/4':>9s} {'eval before':>12s} {'eval after':>11s}")
    for label, m in res["models"].items():
        before = "-" if m["eval_loss_before"] is None else f"{m['eval_loss_before']:.4f}"
        after = "-" if m["eval_loss_after"] is None else f"{m['eval_loss_after']:.4f}"
        print(f"{label:24s} {str(m['sampling']):>10s} {str(m['augment_ratio']):>5s} "
              f"{str(m['max_steps']):>6s} {m['train_loss_last']:10.4f} "
              f"{m['train_loss_mean_last_quarter']:9.4f} {before:>12s} {after:>11s}")
    if not res["equal_steps"]:
        print("note: the runs trained for different numbers of steps")


def plot_curves(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, m in result["models"].items():
        ax.plot([s for s, _ in m["log"]], [v for _, v in m["log"]], marker=".",
                label=f"{label} ({m['sampling']}; eval {m['eval_loss_after']:.3f})"
                if m["eval_loss_after"] is not None else label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("training loss by sampling strategy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # python -m training.robustness RESULT.json: print a saved result
    import json
    import sys
    from pathlib import Path

    if len(sys.argv) != 2:
        sys.exit("usage: python -m training.robustness RESULT.json (written by rag eval "
                 "robustness --out)")
    print_robustness(json.loads(Path(sys.argv[1]).read_text()))
