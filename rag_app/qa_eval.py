"""QA evaluation shared by `rag eval qa` and the app's Evaluate tab: answer held-out questions
through the pipeline (retrieval as in the app) and score the answers.

- `pubmedqa-heldout`: the held-out fold of PubMedQA trainval (never trained on): yes/no/maybe
  decision accuracy and macro-F1, ROUGE-L against the long answer.
- `medquad-test`: the held-out MedQuAD split (by focus): token F1 and ROUGE-L against the answer.
Both: citation validity (no citation to a source that was not given), share of answers with a
citation, weak-evidence rate, mean answer length.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from .evaluate import classification_metrics, rouge_l, token_f1, yes_no_maybe

QA_DATASETS = ("pubmedqa-heldout", "medquad-test")
QA_COLUMNS = ("accuracy", "macro_f1", "rouge_l", "token_f1", "citation_validity",
              "answers_with_citation", "weak_evidence", "mean_words")


def qa_items(dataset: str, limit: int | None = None) -> list[tuple]:
    """(id, question, gold answer, gold decision or None), sorted by id, first `limit`."""
    from .datasets import (medquad_records, medquad_test_titles, pubmedqa_heldout_pmids,
                           pubmedqa_records)

    if dataset == "pubmedqa-heldout":
        held = pubmedqa_heldout_pmids()
        items = [(r["pmid"], r["question"], r["long_answer"], r["final_decision"])
                 for r in pubmedqa_records() if r["pmid"] in held]
    elif dataset == "medquad-test":
        test, seen, items = medquad_test_titles(), set(), []
        for r in medquad_records():
            if r["title"] in test and r["question"] not in seen:
                seen.add(r["question"])
                items.append((r["pid"], r["question"], r["text"], None))
    else:
        raise ValueError(f"dataset={dataset!r} is invalid: choose one of {QA_DATASETS}")
    return sorted(items)[:limit] if limit else sorted(items)


def evaluate_qa(pipe, dataset: str, items: list[tuple],
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Answer every item with `pipe` and return the summary metrics plus per-question rows."""
    rows, t = [], time.perf_counter()
    for i, (qid, question, gold, decision) in enumerate(items):
        ans = pipe.answer(question)
        rows.append({"id": qid, "question": question, "answer": ans.text,
                     "weak_evidence": ans.weak_evidence, "cited": ans.citations,
                     "rouge_l": rouge_l(ans.text, gold), "token_f1": token_f1(ans.text, gold),
                     "gold_decision": decision,
                     "decision": yes_no_maybe(ans.text) if decision else None,
                     "citation_ok": not ans.dropped_citations,
                     "words": len(ans.text.split())})
        if progress:
            progress(i + 1, len(items))
    n = max(len(rows), 1)
    result = {"dataset": dataset, "model": pipe.generator.name, "n": len(rows),
              "seconds": round(time.perf_counter() - t, 1),
              "rouge_l": sum(r["rouge_l"] for r in rows) / n,
              "token_f1": sum(r["token_f1"] for r in rows) / n,
              "citation_validity": sum(r["citation_ok"] for r in rows) / n,
              "answers_with_citation": sum(bool(r["cited"]) for r in rows) / n,
              "weak_evidence": sum(r["weak_evidence"] for r in rows) / n,
              "mean_words": sum(r["words"] for r in rows) / n}
    if dataset == "pubmedqa-heldout" and rows:
        golds = [r["gold_decision"] for r in rows]
        cls = classification_metrics(golds, [r["decision"] for r in rows])
        result["accuracy"] = cls["accuracy"]
        result["macro_f1"] = cls["macro_f1"]
        result["majority_baseline"] = max(golds.count(x) for x in set(golds)) / n
    return result | {"rows": rows}
