"""Metrics (retrieval, classification, QA) and the evaluation runners behind `rag eval`."""
from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np

from .datasets import RetrievalDataset

KS = (1, 5, 10, 100)


# ---------- retrieval ----------
def recall_at(ranked: list[str], relevant: set[str], k: int) -> float:
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


def mrr_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k], start=1):
        if d in relevant:
            return 1.0 / i
    return 0.0


def ndcg_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    dcg = sum(1.0 / math.log2(i + 1) for i, d in enumerate(ranked[:k], start=1) if d in relevant)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(relevant), k) + 1))
    return dcg / ideal if ideal else 0.0


def retrieval_metrics(runs: dict[str, list[str]], qrels: dict[str, set[str]]) -> dict:
    """Mean Recall@1/5/10/100, MRR@10, nDCG@10 over the queries of `qrels`."""
    out: dict[str, list[float]] = {f"recall@{k}": [] for k in KS}
    out["mrr@10"], out["ndcg@10"] = [], []
    for qid, rel in qrels.items():
        ranked = runs.get(qid, [])
        for k in KS:
            out[f"recall@{k}"].append(recall_at(ranked, rel, k))
        out["mrr@10"].append(mrr_at(ranked, rel))
        out["ndcg@10"].append(ndcg_at(ranked, rel))
    return {k: float(np.mean(v)) if v else 0.0 for k, v in out.items()} | {"queries": len(qrels)}


def dedupe_docs(chunk_doc_ids: list[str], k: int) -> list[str]:
    seen, out = set(), []
    for d in chunk_doc_ids:
        if d not in seen:
            seen.add(d)
            out.append(d)
            if len(out) == k:
                break
    return out


def run_retrieval(retriever, dataset: RetrievalDataset, mode: str, k: int = 100,
                  batch: int = 256) -> dict[str, list[str]]:
    """Document-level rankings (a document's best chunk counts) for every query."""
    qids = list(dataset.queries)
    n_chunks = min(len(retriever.index), 2 * k)
    runs = {}
    for s in range(0, len(qids), batch):
        ids = qids[s:s + batch]
        res = retriever.search_batch([dataset.queries[q] for q in ids], k=n_chunks, mode=mode)
        for q, chunks in zip(ids, res):
            runs[q] = dedupe_docs([c.doc_id for c in chunks], k)
    return runs


# ---------- classification ----------
def classification_metrics(y_true: list, y_pred: list) -> dict:
    labels = sorted(set(y_true) | set(y_pred))
    out = {"accuracy": float(np.mean([a == b for a, b in zip(y_true, y_pred)])) if y_true else 0.0}
    f1s = []
    for lab in labels:
        tp = sum(1 for a, b in zip(y_true, y_pred) if a == lab and b == lab)
        p = tp / max(sum(1 for b in y_pred if b == lab), 1)
        r = tp / max(sum(1 for a in y_true if a == lab), 1)
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[f"{lab}"] = {"precision": p, "recall": r, "f1": f1}
        f1s.append(f1)
    out["macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    return out


# ---------- QA ----------
def normalize_text(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_text(pred).split(), normalize_text(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if not p or not g or not same:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def rouge_l(pred: str, gold: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(gold, pred)["rougeL"].fmeasure


_ROUGE = {}


def rouge_scores(pred: str, gold: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (rouge-score, Porter stemming) of `pred` against `gold`."""
    from rouge_score import rouge_scorer

    if "s" not in _ROUGE:
        _ROUGE["s"] = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return {k: v.fmeasure for k, v in _ROUGE["s"].score(gold, pred).items()}


def mbr_select(candidates: list[str]) -> int:
    """Minimum-Bayes-risk choice among `candidates` (e.g. the finished beams, best first): the
    index of the one with the highest mean ROUGE (mean of the 1/2/L F-measures, rouge_scores)
    against all the others, i.e. the consensus output; ties go to the earlier candidate.
    ROUGE F-measures are symmetric, so each pair is scored once."""
    if not candidates:
        raise ValueError("mbr_select needs at least one candidate")
    u = [0.0] * len(candidates)
    for i in range(len(candidates)):
        for j in range(i + 1, len(candidates)):
            s = sum(rouge_scores(candidates[i], candidates[j]).values()) / 3
            u[i] += s
            u[j] += s
    best = 0
    for i in range(1, len(u)):
        if u[i] > u[best] + 1e-12:
            best = i
    return best


def yes_no_maybe(answer: str) -> str:
    """The decision an answer states: its first yes/no word, else 'maybe'."""
    first = re.split(r"(?<=[.!?])\s", answer.strip(), maxsplit=1)[0].lower()
    m = re.search(r"\b(yes|no|maybe|unclear|uncertain)\b", first)
    if not m:
        return "maybe"
    return {"unclear": "maybe", "uncertain": "maybe"}.get(m.group(1), m.group(1))


# ---------- LM ----------
def perplexity(mean_nll: float) -> float:
    return float(math.exp(mean_nll))
