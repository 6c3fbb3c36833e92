"""Summarisation tuning of the generator: MeQSum consumer health question -> its expert
one-line summary (optionally + MEDIQA 2021 question / answer summaries as extra training data).

Splits (never moving): eval = `rag_app.datasets.meqsum_heldout_files()` (~1/8 of MeQSum by a
hash of File, saved in rag_app/splits/), never trained on; val = a fixed hashed slice of the
rest (eval loss before/after); train = the remaining MeQSum rows + the chosen MEDIQA rows (any
MEDIQA question that near-duplicates a held-out MeQSum question is dropped).

    rag train summarize --recipe training/recipes/summarize.yaml [--set k=v] [--activate]
    rag eval summarize --model base --model NAME [--limit N] [--max-new-tokens 48]
        [--num-beams N] [--length-penalty L] [--mbr] [--split eval|val] --out F
"""
from __future__ import annotations

from dataclasses import dataclass

from .tasks import (TaskConfig, TaskExample, held_out_outputs, is_val, make_example, mean,
                    prompt_fingerprint, render_prompt, run_task, split_fields, split_words,
                    take, val_guard)

SOURCES = ("meqsum", "mediqa-question", "mediqa-answer")
SPLITS = ("train", "val", "eval")


@dataclass
class SummarizeConfig(TaskConfig):
    # meqsum | mediqa-question (MEDIQA 2021 task 1, 150 more question summaries) |
    # mediqa-answer (task 2: a question's answers -> their abstractive summary, 130)
    sources: str = "meqsum"
    max_source_tokens: int = 160
    max_target_tokens: int = 40

    def __post_init__(self):
        super().__post_init__()
        bad = [s for s in self.source_list if s not in SOURCES]
        if bad or not self.source_list:
            raise ValueError(f"sources={self.sources!r} is invalid: use a comma-separated "
                             f"subset of {SOURCES}")


def _words(text: str) -> set[str]:
    return set("".join(c if c.isalnum() else " " for c in text.lower()).split())


def _near_duplicate(text: str, others: list[set[str]], threshold: float = 0.6) -> bool:
    w = _words(text)
    return any(len(w & o) / max(len(w | o), 1) >= threshold for o in others)


def meqsum_rows(split: str, val_fraction: float = 0.1) -> list[dict]:
    """MeQSum rows of one split, sorted by File: {"id", "text", "summary"}."""
    from rag_app.datasets import meqsum_heldout_files, meqsum_records

    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: choose one of {SPLITS}")
    held = meqsum_heldout_files()
    rows = []
    for r in meqsum_records():
        s = ("eval" if r["File"] in held else "val" if is_val(r["File"], val_fraction) else "train")
        if s == split:
            rows.append({"id": r["File"], "text": " ".join(r["CHQ"].split()),
                         "summary": " ".join(r["Summary"].split())})
    return sorted(rows, key=lambda r: r["id"])


def mediqa_rows(kind: str) -> list[dict]:
    """MEDIQA 2021 rows (both of its shipped splits; they are training data here)."""
    from rag_app.config import shared_data_dir
    from rag_app.datasets import _jsonl

    folder = shared_data_dir() / "mediqa2021_summ"
    if kind == "mediqa-question":
        return [{"id": f"mediqa-q-{r['split']}-{r['q_id']}", "text": " ".join(
                    r["NLM Question"].split()), "summary": " ".join(r["Summary"].split())}
                for r in _jsonl(folder / "task1_question_summarization.jsonl")]
    if kind == "mediqa-answer":
        return [{"id": f"mediqa-a-{r['split']}-{r['question_id']}",
                 "question": " ".join(r["question"].split()),
                 "text": "\n".join(f"[{i}] {' '.join(a['text'].split())}"
                                   for i, a in enumerate(r["answers"], start=1)),
                 "summary": " ".join(r["abstractive_summary"].split())}
                for r in _jsonl(folder / "task2_mas_joined.jsonl")]
    raise ValueError(f"unknown MEDIQA source {kind!r}: use mediqa-question or mediqa-answer")


def summary_prompt(tokenizer, row: dict, max_source_tokens: int | None) -> str:
    """THE summarisation prompt of a row (training and `rag eval summarize` both use it)."""
    if "question" in row:
        return render_prompt(tokenizer, "answer-summary", row["text"], max_source_tokens,
                             question=row["question"])
    return render_prompt(tokenizer, "question-summary", row["text"], max_source_tokens)


def build_examples(cfg: SummarizeConfig, tokenizer, split: str = "train") -> list[TaskExample]:
    """train: shuffled MeQSum train rows + the recipe's MEDIQA rows (n_examples of them);
    val / eval: MeQSum only, sorted by File."""
    rows = [(r, "meqsum") for r in meqsum_rows(split, cfg.val_fraction)] \
        if "meqsum" in cfg.source_list or split != "train" else []
    if split == "train":
        held = [_words(r["text"]) for r in meqsum_rows("eval")]
        for kind in cfg.source_list:
            if kind != "meqsum":
                rows += [(r, kind) for r in mediqa_rows(kind)
                         if not _near_duplicate(r["text"], held)]
        rows = take(rows, cfg.n_examples, cfg.seed)
    return [make_example(tokenizer, cfg, r["id"], kind,
                         summary_prompt(tokenizer, r, cfg.max_source_tokens), r["summary"])
            for r, kind in rows]


def run(cfg: SummarizeConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False) -> dict:
    tasks = ("question-summary",) + (("answer-summary",) if "mediqa-answer" in cfg.source_list
                                     else ())
    data = {"prompt": prompt_fingerprint(tasks), "sources": list(cfg.source_list),
            "excluded": "meqsum_heldout_files (rag_app/splits/meqsum_heldout_files.txt) and "
                        "MEDIQA near-duplicates of them"}
    return run_task("summarize", cfg, build_examples, data, output, progress_file, resume,
                    activate)


# ---------- evaluation: `rag eval summarize` ----------
def summary_metrics(preds: list[str], refs: list[str]) -> dict:
    """Mean ROUGE-1/2/L F-measure and mean lengths (words) of predictions vs references."""
    from rag_app.evaluate import rouge_scores

    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    rows = [rouge_scores(p, g) | {"words": len(p.split())} for p, g in zip(preds, refs)]
    return {"n": len(rows), "rouge1": mean(rows, "rouge1"), "rouge2": mean(rows, "rouge2"),
            "rougeL": mean(rows, "rougeL"), "mean_words": mean(rows, "words"),
            "reference_words": sum(len(g.split()) for g in refs) / max(len(refs), 1)}


def eval_summarize(refs: list[str], cfg: SummarizeConfig, limit: int = 0,
                   max_new_tokens: int = 48, batch_size: int = 8, split: str = "eval",
                   num_beams: int = 1, length_penalty: float = 1.0, mbr: bool = False) -> dict:
    """Greedy (or `num_beams` beam-search) summaries of the held-out MeQSum questions (split
    "eval"; "val": the training side's validation slice, to choose settings on) by each model,
    ROUGE vs the experts'. `length_penalty` ranks finished beams (policy.generate); `mbr` keeps
    the consensus beam instead of the most probable (tasks.generate_texts)."""
    out: dict = {"dataset": "meqsum-heldout" if split == "eval" else "meqsum-val",
                 **split_fields(split, "rag_app/splits/meqsum_heldout_files.txt"),
                 "max_new_tokens": max_new_tokens, "num_beams": num_beams,
                 "length_penalty": length_penalty, "mbr": mbr,
                 "max_source_tokens": cfg.max_source_tokens,
                 "prompt": prompt_fingerprint(("question-summary",)), "models": {}}
    for label, name, items, preds, _ in held_out_outputs(
            refs, lambda tok: build_examples(cfg, tok, split), limit, max_new_tokens,
            batch_size, num_beams=num_beams, length_penalty=length_penalty, mbr=mbr,
            check=val_guard("summarize", cfg.val_fraction, split)):
        m = summary_metrics(preds, [e.reference for e in items]) | {"model": name}
        m["rows"] = [{"id": e.id, "reference": e.reference, "summary": p}
                     for e, p in zip(items, preds)]
        out["models"][label] = m
        out["n"] = len(items)
    print_summarize(out)
    return out


def print_summarize(res: dict) -> None:
    beams, lp = res.get("num_beams", 1), res.get("length_penalty", 1.0)
    print(f"summaries of {res.get('n')} {split_words(res, 'MeQSum')} questions "
          f"({'greedy' if beams == 1 else f'beam search, {beams} beams'}"
          f"{'' if lp == 1.0 else f', length penalty {lp:g}'}"
          f"{', consensus (MBR) beam' if res.get('mbr') else ''}, "
          f"max_new_tokens {res['max_new_tokens']})")
    print(f"{'model':28s} {'ROUGE-1':>8s} {'ROUGE-2':>8s} {'ROUGE-L':>8s} {'words':>6s}")
    for label, m in res["models"].items():
        print(f"{label:28s} {m['rouge1']:8.4f} {m['rouge2']:8.4f} {m['rougeL']:8.4f} "
              f"{m['mean_words']:6.1f}")
    if res["models"]:
        print(f"{'(reference length)':28s} {'':8s} {'':8s} {'':8s} "
              f"{next(iter(res['models'].values()))['reference_words']:6.1f}")


def plot_summarize(result: dict, path: str) -> None:
    from rag_app.ui_admin import grouped_bars

    fig = grouped_bars(result["models"], ["rouge1", "rouge2", "rougeL"],
                       f"{split_words(result, 'MeQSum')} summaries (n={result.get('n')})")
    fig.savefig(path, dpi=100)
