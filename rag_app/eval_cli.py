"""The runners behind `rag eval retrieval|qa`: print a table, save JSON (and a plot)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from .config import RetrievalConfig
from .datasets import load_retrieval_dataset, load_retrieval_files
from .evaluate import run_retrieval, retrieval_metrics

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
    cfg = RetrievalConfig(candidates=200, fusion=getattr(args, "fusion", None) or "cc",
                          dense_weight=getattr(args, "dense_weight", None))
    w = cfg.weight
    pipe = RagPipeline(args.index, retrieval=cfg)
    result = {"dataset": ds.name, "index": args.index, "queries": len(ds.queries),
              "fusion": cfg.fusion, "dense_weight": w,
              "embedder": pipe.index.meta["embedder"]["name"], "modes": {}}
    print(f"{ds.name}: {len(ds.queries)} queries, index {args.index} "
          f"({len(pipe.index)} chunks), hybrid: {cfg.fusion} fusion, dense weight {w}")
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
    """Answer held-out questions through the pipeline and score them (see `qa_eval`)."""
    from .config import GenerationConfig
    from .pipeline import RagPipeline
    from .qa_eval import evaluate_qa, qa_items

    pipe = RagPipeline(args.index, args.model,
                       generation=GenerationConfig(max_new_tokens=args.max_new_tokens))
    items = qa_items(args.dataset, args.limit)
    bar = tqdm(total=len(items), desc="answering", unit="q")
    result = evaluate_qa(pipe, args.dataset, items,
                         progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    for k, v in result.items():
        if k != "rows":
            print(f"{k:24s} {v:.4f}" if isinstance(v, float) else f"{k:24s} {v}")
    _save(args.out, result)
    return 0
