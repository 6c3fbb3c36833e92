"""The runners behind `rag eval retrieval|qa`: print a table, save JSON (and a plot)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from .config import RetrievalConfig
from .datasets import (load_retrieval_dataset, load_retrieval_files, pubmedqa_heldout_pmids,
                       pubmedqa_records)
from .evaluate import (classification_metrics, rouge_l, run_retrieval, retrieval_metrics,
                       token_f1, yes_no_maybe)

COLUMNS = ("recall@1", "recall@5", "recall@10", "recall@100", "mrr@10", "ndcg@10")


def _save(out: str | None, result: dict) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"saved {out}")


def plot_retrieval(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["modes"])
    metrics = ["recall@10", "mrr@10", "ndcg@10"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    w = 0.8 / len(modes)
    for i, m in enumerate(modes):
        ax.bar([j + i * w for j in range(len(metrics))],
               [result["modes"][m][k] for k in metrics], w, label=m)
    ax.set_xticks([j + w * (len(modes) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylim(0, 1)
    ax.set_title(f"retrieval on {result['dataset']} ({result['queries']} queries)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def eval_retrieval(args) -> int:
    from .pipeline import RagPipeline

    ds = (load_retrieval_files(args.queries, args.qrels) if args.queries
          else load_retrieval_dataset(args.dataset, args.limit))
    pipe = RagPipeline(args.index, retrieval=RetrievalConfig(candidates=200))
    result = {"dataset": ds.name, "index": args.index, "queries": len(ds.queries),
              "embedder": pipe.index.meta["embedder"]["name"], "modes": {}}
    print(f"{ds.name}: {len(ds.queries)} queries, index {args.index} "
          f"({len(pipe.index)} chunks)")
    print(f"{'mode':8s} " + " ".join(f"{c:>10s}" for c in COLUMNS) + "   q/s")
    for mode in args.modes.split(","):
        t = time.perf_counter()
        runs = run_retrieval(pipe.retriever, ds, mode.strip())
        dt = time.perf_counter() - t
        m = retrieval_metrics(runs, ds.qrels)
        result["modes"][mode] = m
        print(f"{mode:8s} " + " ".join(f"{m[c]:10.4f}" for c in COLUMNS)
              + f"  {len(ds.queries) / dt:5.1f}")
    from .rerank import COSINE_WEAK

    qs = list(ds.queries.values())
    best = [rows[0][1] if rows else 0.0 for rows in pipe.retriever.dense_rows(qs, 1)]
    result["weak_evidence_rate"] = sum(b < COSINE_WEAK for b in best) / max(len(best), 1)
    print(f"questions whose best passage has cosine < {COSINE_WEAK} (answered as weak "
          f"evidence): {result['weak_evidence_rate']:.1%}")
    _save(args.out, result)
    if args.out:
        plot_retrieval(result, str(Path(args.out).with_suffix(".png")))
    return 0


def eval_qa(args) -> int:
    """PubMedQA held-out fold: decision accuracy and ROUGE-L vs the long answer; MedQuAD
    test: token F1 and ROUGE-L vs the reference answer. The pipeline retrieves as in the app."""
    from .config import GenerationConfig
    from .datasets import medquad_records, medquad_test_titles
    from .pipeline import RagPipeline

    pipe = RagPipeline(args.index, args.model,
                       generation=GenerationConfig(max_new_tokens=args.max_new_tokens))
    if args.dataset == "pubmedqa-heldout":
        held = pubmedqa_heldout_pmids()
        items = [(r["pmid"], r["question"], r["long_answer"], r["final_decision"])
                 for r in pubmedqa_records() if r["pmid"] in held]
    else:
        test = medquad_test_titles()
        seen, items = set(), []
        for r in medquad_records():
            if r["title"] in test and r["question"] not in seen:
                seen.add(r["question"])
                items.append((r["pid"], r["question"], r["text"], None))
    items = sorted(items)[: args.limit]
    rows, t = [], time.perf_counter()
    for qid, question, gold, decision in tqdm(items, desc="answering", unit="q"):
        ans = pipe.answer(question)
        rows.append({"id": qid, "question": question, "answer": ans.text,
                     "weak_evidence": ans.weak_evidence, "cited": ans.citations,
                     "rouge_l": rouge_l(ans.text, gold), "token_f1": token_f1(ans.text, gold),
                     "gold_decision": decision,
                     "decision": yes_no_maybe(ans.text) if decision else None,
                     "citation_ok": not ans.dropped_citations,
                     "words": len(ans.text.split())})
    n = len(rows)
    result = {"dataset": args.dataset, "model": pipe.generator.name, "n": n,
              "seconds": round(time.perf_counter() - t, 1),
              "rouge_l": sum(r["rouge_l"] for r in rows) / max(n, 1),
              "token_f1": sum(r["token_f1"] for r in rows) / max(n, 1),
              "citation_validity": sum(r["citation_ok"] for r in rows) / max(n, 1),
              "answers_with_citation": sum(bool(r["cited"]) for r in rows) / max(n, 1),
              "weak_evidence": sum(r["weak_evidence"] for r in rows) / max(n, 1),
              "mean_words": sum(r["words"] for r in rows) / max(n, 1)}
    if args.dataset == "pubmedqa-heldout":
        cls = classification_metrics([r["gold_decision"] for r in rows],
                                     [r["decision"] for r in rows])
        golds = [r["gold_decision"] for r in rows]
        result["accuracy"] = cls["accuracy"]
        result["macro_f1"] = cls["macro_f1"]
        result["majority_baseline"] = max(golds.count(x) for x in set(golds)) / max(n, 1)
    for k, v in result.items():
        print(f"{k:24s} {v:.4f}" if isinstance(v, float) else f"{k:24s} {v}")
    _save(args.out, result | {"rows": rows})
    return 0
