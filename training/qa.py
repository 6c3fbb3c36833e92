"""Single-task QA tuning of the generator: a PubMedQA question + its OWN abstract (the gold
context from the shipped data, no retrieval) -> "Yes." / "No." / "Maybe." then the long answer.

Splits: eval = `rag_app.datasets.pubmedqa_heldout_pmids()` (the fixed ~20% fold, 94 questions),
never trained on; val = a fixed hashed slice of the other pmids; train = the rest.

    rag train qa --recipe training/recipes/qa.yaml [--set k=v] [--activate]
    rag eval qa-gold --model base --model NAME [--limit N] [--max-new-tokens 96] --out F
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .tasks import (TaskConfig, TaskExample, held_out_outputs, is_val, make_example, mean,
                    prompt_fingerprint, render_prompt, run_task, take, val_guard)

SPLITS = ("train", "val", "eval")


@dataclass
class QAConfig(TaskConfig):
    sources: str = "pubmedqa"  # the only QA source with gold contexts and long answers
    max_source_tokens: int = 256  # the abstract
    max_target_tokens: int = 64  # "Yes. <long answer>"
    balance_labels: bool = False  # oversample "no"/"maybe" rows to the "yes" count (seeded)
    # this share of the training questions also gets a reading example: its own conclusion
    # (the long answer, PubMedQA's "reasoning-free" context) -> the bare decision
    conclusion_share: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.source_list != ("pubmedqa",):
            raise ValueError(f"sources={self.sources!r} is invalid for qa: use pubmedqa")
        if not 0.0 <= self.conclusion_share <= 1.0:
            raise ValueError(f"conclusion_share={self.conclusion_share} must be in [0, 1]")


def pubmedqa_rows(split: str, val_fraction: float = 0.1) -> list[dict]:
    """PubMedQA trainval rows of one split, sorted by pmid: {"id", "question", "context",
    "decision", "long_answer"}; the context keeps the abstract's section labels."""
    from rag_app.datasets import pubmedqa_heldout_pmids, pubmedqa_records

    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: choose one of {SPLITS}")
    held = pubmedqa_heldout_pmids()
    rows = []
    for r in pubmedqa_records():
        s = "eval" if r["pmid"] in held else "val" if is_val(r["pmid"], val_fraction) \
            else "train"
        if s != split:
            continue
        labels = r.get("context_labels") or [""] * len(r["contexts"])
        context = "\n".join(f"{lab}: {' '.join(c.split())}" if lab else " ".join(c.split())
                            for lab, c in zip(labels, r["contexts"]))
        rows.append({"id": r["pmid"], "question": " ".join(r["question"].split()),
                     "context": context, "decision": r["final_decision"],
                     "long_answer": " ".join(r["long_answer"].split())})
    return sorted(rows, key=lambda r: r["id"])


def balanced(rows: list[dict], seed: int) -> list[dict]:
    """Every decision as often as the most frequent one: each minority label's rows repeated
    in turn (all of them before any twice) until its count matches, then a seeded shuffle --
    so the loss no longer rewards answering the prior ("yes")."""
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r["decision"], []).append(r)
    top = max((len(v) for v in by.values()), default=0)
    out = [r for v in by.values() for r in (v * (top // len(v) + 1))[:top]]
    random.Random(seed).shuffle(out)
    return out


def qa_prompt(tokenizer, row: dict, max_source_tokens: int | None) -> str:
    """THE QA prompt of a row (training and `rag eval qa-gold` both use it)."""
    return render_prompt(tokenizer, "qa", row["context"], max_source_tokens,
                         question=row["question"])


def qa_target(row: dict) -> str:
    """"Yes./No./Maybe." then the long answer; the decision alone for a bare row (the
    reading examples of conclusion_rows)."""
    decision = f"{row['decision'].capitalize()}."
    return decision if row.get("bare") else f"{decision} {row['long_answer']}"


def conclusion_rows(rows: list[dict], share: float, seed: int) -> list[dict]:
    """Reading examples for a seeded `share` of the rows: the question with the row's own
    conclusion (its long answer) as the context, and the bare decision as the target. The
    decision is one token of a ~64-token target, so the abstract examples mostly train the
    long answer; these put the whole loss on the decision, read from text that states it."""
    picked = random.Random(seed).sample(rows, round(share * len(rows)))
    return [{**r, "id": f"{r['id']}:conclusion", "context": r["long_answer"], "bare": True}
            for r in picked]


def build_examples(cfg: QAConfig, tokenizer, split: str = "train") -> list[TaskExample]:
    rows = pubmedqa_rows(split, cfg.val_fraction)
    if split == "train":
        rows = take(rows, cfg.n_examples, cfg.seed)
        if cfg.balance_labels:
            rows = balanced(rows, cfg.seed)
        if cfg.conclusion_share:
            rows = rows + conclusion_rows(rows, cfg.conclusion_share, cfg.seed)
            random.Random(cfg.seed).shuffle(rows)
    out = []
    for r in rows:
        ex = make_example(tokenizer, cfg, r["id"], "pubmedqa",
                          qa_prompt(tokenizer, r, cfg.max_source_tokens), qa_target(r),
                          label=r["decision"])
        ex.reference = r["long_answer"]  # ROUGE-L is scored against the long answer
        out.append(ex)
    return out


def run(cfg: QAConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False) -> dict:
    data = {"prompt": prompt_fingerprint(("qa",)), "sources": ["pubmedqa"],
            "excluded": "pubmedqa_heldout_pmids (rag_app/splits/pubmedqa_heldout_pmids.txt)"}
    return run_task("qa", cfg, build_examples, data, output, progress_file, resume, activate)


# ---------- evaluation: `rag eval qa-gold` ----------
def majority_label(cfg: QAConfig | None = None) -> str:
    """The most frequent decision on the TRAINING side (the majority-class baseline)."""
    counts = Counter(r["decision"] for r in pubmedqa_rows("train", cfg.val_fraction if cfg
                                                          else 0.1))
    return counts.most_common(1)[0][0]


def qa_metrics(answers: list[str], decisions: list[str], long_answers: list[str],
               majority: str) -> dict:
    """Decision accuracy / macro-F1 (the first yes/no/maybe of the answer), the accuracy of
    always answering `majority`, ROUGE-L of the whole answer vs the long answer."""
    from rag_app.evaluate import classification_metrics, rouge_l, yes_no_maybe

    if not len(answers) == len(decisions) == len(long_answers):
        raise ValueError("answers, decisions and long answers must have the same length")
    preds = [yes_no_maybe(a) for a in answers]
    cls = classification_metrics(decisions, preds)
    rows = [{"rouge_l": rouge_l(a, g), "words": len(a.split())}
            for a, g in zip(answers, long_answers)]
    return {"n": len(answers), "accuracy": cls["accuracy"], "macro_f1": cls["macro_f1"],
            "majority_baseline": (sum(d == majority for d in decisions) / len(decisions)
                                  if decisions else 0.0),
            "majority_label": majority, "rouge_l": mean(rows, "rouge_l"),
            "mean_words": mean(rows, "words"), "predicted": dict(Counter(preds))}


def yes_no_ids(tok) -> tuple[int, int]:
    """The first token of "Yes" and of "No": how a decision-first answer starts."""
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    return yes, no


def decision_logodds(tok, first_logits: list) -> list[float]:
    """logit("Yes") - logit("No") (= log P("Yes") - log P("No")) of each answer's first token,
    the decision the QA target starts with, from the logits of the answer's own first step."""
    yes, no = yes_no_ids(tok)
    return [float(x[yes] - x[no]) for x in first_logits]


def decision_auc(logodds: list[float], decisions: list[str]) -> float | None:
    """How well the yes-vs-no log-odds separate the "yes" questions from the "no" ones (ROC
    AUC; 0.5 = the decision does not depend on the evidence); None without both classes."""
    pos = [s for s, d in zip(logodds, decisions) if d == "yes"]
    neg = [s for s, d in zip(logodds, decisions) if d == "no"]
    if not pos or not neg:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def eval_qa_gold(refs: list[str], cfg: QAConfig, limit: int = 0, max_new_tokens: int = 96,
                 batch_size: int = 8, split: str = "eval") -> dict:
    """Greedy answers of each model on the held-out PubMedQA fold (split "eval"; "val": the
    training side's validation slice, to choose settings on) with the gold abstracts, and
    the yes-vs-no AUC of its first-token log-odds."""
    from .tasks import split_fields

    majority = majority_label(cfg)
    out: dict = {"dataset": f"pubmedqa-{'heldout' if split == 'eval' else 'val'} "
                            f"(gold contexts)",
                 **split_fields(split, "rag_app/splits/pubmedqa_heldout_pmids.txt"),
                 "max_new_tokens": max_new_tokens, "max_source_tokens": cfg.max_source_tokens,
                 "prompt": prompt_fingerprint(("qa",)), "models": {}}
    for label, name, items, answers, logodds in held_out_outputs(
            refs, lambda tok: build_examples(cfg, tok, split), limit, max_new_tokens,
            batch_size, score=decision_logodds,
            check=val_guard("qa", cfg.val_fraction, split)):
        gold = [e.label for e in items]
        m = qa_metrics(answers, gold, [e.reference for e in items], majority) | {
            "model": name, "decision_auc": decision_auc(logodds, gold)}
        m["rows"] = [{"id": e.id, "gold": e.label, "yes_no_logodds": round(x, 3), "answer": a}
                     for e, a, x in zip(items, answers, logodds)]
        out["models"][label] = m
        out["n"] = len(items)
    print_qa_gold(out)
    return out


def print_qa_gold(res: dict) -> None:
    first = next(iter(res["models"].values()), None)
    from .tasks import split_words

    print(f"{res.get('n')} {split_words(res, 'PubMedQA')} questions with their gold abstracts "
          f"(greedy, max_new_tokens {res['max_new_tokens']}); AUC: how well the first token's "
          f"yes-vs-no log-odds separate yes from no questions (0.5 = not at all)")
    print(f"{'model':28s} {'acc':>6s} {'macroF1':>8s} {'ROUGE-L':>8s} {'words':>6s} "
          f"{'AUC':>6s}  predicted")
    for label, m in res["models"].items():
        auc = m.get("decision_auc")
        print(f"{label:28s} {m['accuracy']:6.3f} {m['macro_f1']:8.3f} {m['rouge_l']:8.4f} "
              f"{m['mean_words']:6.1f} {'-' if auc is None else f'{auc:.3f}':>6s}  "
              f"{m['predicted']}")
    if first:
        print(f"{'majority baseline':28s} {first['majority_baseline']:6.3f}  "
              f"(always {first['majority_label']!r}, the training side's majority)")


def plot_qa_gold(result: dict, path: str) -> None:
    from rag_app.ui_admin import grouped_bars

    from .tasks import split_words

    fig = grouped_bars(result["models"], ["accuracy", "majority_baseline", "macro_f1",
                                          "rouge_l", "decision_auc"],
                       f"{split_words(result, 'PubMedQA')}, gold contexts "
                       f"(n={result.get('n')})")
    fig.savefig(path, dpi=100)
