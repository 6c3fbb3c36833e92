"""Relevance classifier: a cross-encoder (question, passage) -> P(relevant), trained with
sentence-transformers' CrossEncoderTrainer + BinaryCrossEntropyLoss, registered as kind
"relevance" (rag_app/rerank.py scores with it: model.predict probability, weak below 0.5).

Evaluation (rag_app-side metrics, held-out data only):
- classification: P/R/F1 on pairs of the held-out titles/pmids, at a threshold chosen on a
  VALIDATION split of the training groups; for the bi-encoder cosine (the honest base), the
  untrained head ("pretrained-as-classifier") and the fine-tuned model.
- ranking: nDCG@10 / MRR@10 / Recall@10 of the hybrid top-50 vs the same reranked by the model,
  on medquad-test and the PubMedQA held-out fold (see ranking_eval).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .common import (ProgressCallback, RunManifest, TrainConfig, resolve_base,
                     finish_run, resume_checkpoint, set_seed, start_run,
                     trainer_args_common)
from .data import PairSet, describe_pairs, load_split, mine_negatives, relevance_pairs, \
    sample_by_source

log = logging.getLogger(__name__)


@dataclass
class RelevanceConfig(TrainConfig):
    max_positives: int = 2  # positive passages per query (PubMedQA has ~3)
    pos_weight: float = 0.0  # BCE pos_weight; 0 = n_negatives / n_positives
    mining_embedder: str = "default"  # bi-encoder used to mine hard negatives
    # negatives of the TRAINING pairs only (-1 = as n_hard / n_random / 1): the validation and
    # held-out pairs keep n_hard, n_random and one same-focus negative, so a recipe that trains
    # on other negatives is still measured on the same pairs
    train_n_hard: int = -1
    train_n_random: int = -1
    train_same_focus: int = -1


# ---------- data ----------
def build_pairs(cfg: TrainConfig, split: str, n_queries: int, embedder, cache_dir: Path | None,
                queries_override: PairSet | None = None) -> tuple[list[dict], PairSet]:
    ps = queries_override or sample_by_source(load_split(split, cfg.source_list), n_queries,
                                              cfg.seed, cfg.train_shares if split == "train"
                                              else {})
    n_hard, n_random, n_same = cfg.n_hard, cfg.n_random, 1
    if split == "train":
        pick = lambda v, d: d if getattr(cfg, v, -1) < 0 else getattr(cfg, v)  # noqa: E731
        n_hard, n_random = pick("train_n_hard", n_hard), pick("train_n_random", n_random)
        n_same = pick("train_same_focus", n_same)
    mined = mine_negatives(ps, embedder, n_hard, n_random, cfg.mine_top, cfg.mine_pool,
                           cfg.seed, cache_dir, cfg.mine_words, n_same)
    return relevance_pairs(ps, mined, getattr(cfg, "max_positives", 2)), ps


# ---------- scoring ----------
def cross_scores(model, rows: list[dict], batch_size: int = 32) -> np.ndarray:
    if not rows:
        return np.zeros(0, dtype=np.float32)
    return np.asarray(model.predict([(r["query"], r["passage"]) for r in rows],
                                    batch_size=batch_size, show_progress_bar=False),
                      dtype=np.float32).reshape(-1)


def cosine_scores(embedder, rows: list[dict]) -> np.ndarray:
    """The bi-encoder's relevance score: cosine(question, passage text)."""
    if not rows:
        return np.zeros(0, dtype=np.float32)
    q = embedder.encode([r["query"] for r in rows])
    p = embedder.encode([r["passage"].split("\n", 1)[-1] for r in rows])
    return (q * p).sum(1)


def bce(scores: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(scores, 1e-6, 1 - 1e-6)
    return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())


def prf(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    pred = scores >= threshold
    tp = float((pred & (labels > 0.5)).sum())
    p = tp / max(pred.sum(), 1)
    r = tp / max((labels > 0.5).sum(), 1)
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1, "threshold": float(threshold),
            "accuracy": float((pred == (labels > 0.5)).mean())}


def choose_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises F1 on the given (validation) scores."""
    cands = np.unique(scores)
    if len(cands) > 400:
        cands = np.quantile(scores, np.linspace(0, 1, 401))
    best = max(cands, key=lambda t: (prf(scores, labels, t)["f1"], -abs(t - 0.5)))
    return float(best)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else 0.0


def by_kind(scores: np.ndarray, rows: list[dict], threshold: float) -> dict:
    """Per pair kind (positive, same_focus, dense, random): how many pairs and the share the
    scorer calls relevant at `threshold` (recall for positives, false-positive rate for the
    negative kinds): where the errors come from."""
    kinds: dict[str, list[bool]] = {}
    for s, r in zip(scores, rows):
        kinds.setdefault(r.get("kind", "?"), []).append(bool(s >= threshold))
    return {k: {"n": len(v), "called_relevant": sum(v) / len(v)} for k, v in kinds.items()}


def classification_eval(scorers: dict, val_rows: list[dict], eval_rows: list[dict]) -> dict:
    """For each scorer (name -> fn(rows) -> scores): threshold chosen on val_rows, P/R/F1/AUC
    on eval_rows (and P/R/F1 at 0.5, the threshold the app uses for a classifier)."""
    yv = np.array([r["label"] for r in val_rows])
    ye = np.array([r["label"] for r in eval_rows])
    out = {}
    for name, fn in scorers.items():
        sv, se = fn(val_rows), fn(eval_rows)
        t = choose_threshold(sv, yv)
        out[name] = prf(se, ye, t) | {"auc": auc(se, ye), "at_0.5": prf(se, ye, 0.5),
                                      "by_kind": by_kind(se, eval_rows, t),
                                      # the validation side, where settings are chosen
                                      "val": prf(sv, yv, t) | {"auc": auc(sv, yv)}}
    out["_counts"] = {"val_pairs": len(val_rows), "eval_pairs": len(eval_rows),
                      "eval_positives": int(ye.sum())}
    return out


# ---------- training ----------
def load_cross_encoder(base: str, max_length: int, seed: int):
    from sentence_transformers import CrossEncoder

    set_seed(seed)  # the new head's initialisation
    return CrossEncoder(resolve_base(base), num_labels=1, max_length=max_length, device="cpu")


def train_cross_encoder(cfg: RelevanceConfig, train_rows: list[dict], val_rows: list[dict],
                        output: Path, progress: ProgressCallback, resume: bool = False):
    """CrossEncoderTrainer + BinaryCrossEntropyLoss; returns (model, trainer)."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderClassificationEvaluator
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    model = load_cross_encoder(cfg.base_model, cfg.max_length, cfg.seed)
    cols = lambda rows: Dataset.from_dict({"query": [r["query"] for r in rows],  # noqa: E731
                                           "passage": [r["passage"] for r in rows],
                                           "label": [float(r["label"]) for r in rows]})
    n_pos = sum(r["label"] > 0.5 for r in train_rows)
    pw = cfg.pos_weight or (len(train_rows) - n_pos) / max(n_pos, 1)
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(float(pw)))
    evaluator = CrossEncoderClassificationEvaluator(
        [[r["query"], r["passage"]] for r in val_rows], [int(r["label"]) for r in val_rows],
        name="val", write_csv=False) if val_rows else None
    args = CrossEncoderTrainingArguments(**trainer_args_common(cfg, output, bool(val_rows)))
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=cols(train_rows),
                                  loss=loss, evaluator=evaluator, callbacks=[progress])
    trainer.train(resume_from_checkpoint=resume_checkpoint(output, resume))
    return model, trainer


def run(cfg: RelevanceConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False, train_rows: list[dict] | None = None,
        data_note: dict | None = None, embedder=None) -> dict:
    """The whole run: data -> metrics before -> train -> metrics after -> save + register.
    `train_rows` replaces the built training pairs (synthetic.py trains on synthetic ones)."""
    from rag_app.embed import SentenceTransformerEmbedder

    t0, out, progress, _ = start_run("relevance", cfg, output, progress_file, resume)
    try:
        emb = embedder or SentenceTransformerEmbedder(getattr(cfg, "mining_embedder", "default"))
        cache = out.parent / ".cache"
        if train_rows is None:
            train_rows, _ = build_pairs(cfg, "train", cfg.n_queries, emb, cache)
        val_rows, _ = build_pairs(cfg, "val", cfg.n_val_queries, emb, cache)
        eval_rows, _ = build_pairs(cfg, "eval", cfg.n_eval_queries, emb, cache)
        manifest = RunManifest("relevance", resolve_base(cfg.base_model), asdict(cfg), cfg.seed,
                               data={"train": describe_pairs(train_rows),
                                     "val": describe_pairs(val_rows),
                                     "eval": describe_pairs(eval_rows),
                                     "note": data_note or {"sources": cfg.source_list},
                                     "excluded": "medquad_test_titles, "
                                                 "pubmedqa_heldout_pmids (eval only)"})
        base_ce = load_cross_encoder(cfg.base_model, cfg.max_length, cfg.seed)
        before = classification_eval({"bi-encoder cosine": lambda r: cosine_scores(emb, r),
                                      "pretrained-as-classifier":
                                          lambda r: cross_scores(base_ce, r)},
                                     val_rows, eval_rows)
        del base_ce
        manifest.metrics_before = before
        model, trainer = train_cross_encoder(cfg, train_rows, val_rows, out, progress, resume)
        after = classification_eval({"fine-tuned": lambda r: cross_scores(model, r)},
                                    val_rows, eval_rows)
        yt = np.array([r["label"] for r in train_rows[:512]])
        manifest.metrics_after = after | {"train_loss_log": progress.losses,
                                          "train_bce_sample": bce(cross_scores(
                                              model, train_rows[:512]), yt)}
        metrics = {"f1": after["fine-tuned"]["f1"], "precision": after["fine-tuned"]["precision"],
                   "recall": after["fine-tuned"]["recall"], "auc": after["fine-tuned"]["auc"],
                   "threshold": after["fine-tuned"]["threshold"],
                   "base_cosine_f1": before["bi-encoder cosine"]["f1"]}
        manifest.metrics_after["summary"] = metrics
        return finish_run(model, trainer, progress, manifest, "relevance", "relevance", cfg,
                          activate, out, t0, metrics)
    except Exception as e:
        progress.error(f"{type(e).__name__}: {e}")
        raise


# ---------- ranking eval ----------
RANKING_DATASETS = ("medquad-test", "pubmedqa-heldout")
VAL_DATASETS = ("medquad-val", "pubmedqa-val")


def ranking_queries(dataset: str, index, limit: int | None):
    """Queries whose relevant passages are all in the index (a modest eval index holds only
    some held-out titles), sorted by id, the first `limit`. medquad-test / pubmedqa-heldout are
    the held-out evaluation; medquad-val / pubmedqa-val are the training side's validation
    groups (`training.data.split_of`: never trained on by any recipe here) for choosing
    settings such as the rerank weight; medquad-dev is an older dev slice of training-side
    foci (a trained classifier may have seen its questions)."""
    from rag_app.datasets import RetrievalDataset, load_retrieval_dataset

    if dataset in ("medquad-test", "medquad-dev"):
        ds = load_retrieval_dataset(dataset)
    elif dataset == "pubmedqa-heldout":
        from rag_app.datasets import pubmedqa_heldout_pmids

        full, held = load_retrieval_dataset("pubmedqa-trainval"), pubmedqa_heldout_pmids()
        ds = RetrievalDataset("pubmedqa-heldout", {q: t for q, t in full.queries.items()
                                                   if q in held},
                              {q: r for q, r in full.qrels.items() if q in held})
    elif dataset in VAL_DATASETS:
        ps = load_split("val", (dataset.split("-")[0],))
        ds = RetrievalDataset(dataset, {q.qid: q.text for q in ps.queries},
                              {q.qid: set(q.positives) for q in ps.queries})
    else:
        raise ValueError(f"ranking dataset {dataset!r} is invalid: choose from "
                         f"{RANKING_DATASETS + VAL_DATASETS + ('medquad-dev',)}")
    docs = {c.doc_id for c in index.chunks}
    ids = sorted(q for q, rel in ds.qrels.items() if rel and rel <= docs)
    if not ids:
        raise ValueError(f"index has none of the {dataset} passages: build an eval index with "
                         "`rag eval ranking --build-index` or pass --index default")
    ids = ids[:limit] if limit else ids
    return RetrievalDataset(ds.name, {q: ds.queries[q] for q in ids},
                            {q: ds.qrels[q] for q in ids})


def ranking_eval(index_name: str, rerankers: dict[str, str | None],
                 datasets: tuple[str, ...] = RANKING_DATASETS, limit: int | None = 50,
                 candidates: int = 50, weights: tuple[float, ...] | None = None) -> dict:
    """nDCG@10 / MRR@10 / Recall@10 of the hybrid top-`candidates` ("hybrid"), and of the same
    candidates reranked by each entry of `rerankers` (name -> cross-encoder path, or None for
    the bi-encoder cosine the app uses without a trained model). A classifier gets one row per
    rerank weight in `weights` (its share when fused with the hybrid scores; default: the
    serving weight), from ONE scoring pass per query."""
    from tqdm.auto import tqdm

    from rag_app.config import RetrievalConfig
    from rag_app.evaluate import dedupe_docs, retrieval_metrics
    from rag_app.pipeline import RagPipeline
    from rag_app.rerank import RERANK_WEIGHT, Reranker

    weights = tuple(weights) if weights else (RERANK_WEIGHT,)
    pipe = RagPipeline(index_name, retrieval=RetrievalConfig(candidates=candidates),
                       reranker=None, build_if_missing=False)
    index, emb = pipe.index, pipe.embedder
    rr = {name: Reranker(index, emb, ref, reorder=True) for name, ref in rerankers.items()}
    rows = {name: ([(f"{name} (w={w:g})", w) for w in weights]
                   if ref and len(weights) > 1 else [(name, weights[0])])
            for name, ref in rerankers.items()}
    out = {"index": index_name, "n_chunks": len(index), "candidates": candidates,
           "weights": list(weights), "datasets": {}}
    for dname in datasets:
        ds = ranking_queries(dname, index, limit)
        runs: dict[str, dict[str, list[str]]] = {"hybrid": {}}
        runs |= {label: {} for rs in rows.values() for label, _ in rs}
        secs = {n: 0.0 for n in rr}
        for qid, q in tqdm(list(ds.queries.items()), desc=f"ranking {dname}", unit="q"):
            qvec = emb.encode([q])
            cands = pipe.retriever.search_batch([q], candidates, mode="hybrid",
                                                query_vecs=qvec)[0]
            runs["hybrid"][qid] = dedupe_docs([c.doc_id for c in cands], 100)
            for name, r in rr.items():
                t = time.perf_counter()
                scores = r.score(q, cands, qvec[0])
                secs[name] += time.perf_counter() - t
                for label, w in rows[name]:
                    runs[label][qid] = dedupe_docs(
                        [cands[i].doc_id for i in r.order(scores, cands, w)], 100)
        res = {}
        for name, run_ in runs.items():
            m = retrieval_metrics(run_, ds.qrels)
            res[name] = {k: m[k] for k in ("ndcg@10", "mrr@10", "recall@10")}
        for name, rs in rows.items():
            for label, w in rs:
                res[label]["rerank_ms_per_query"] = 1000 * secs[name] / max(len(ds.queries), 1)
                if rerankers[name]:
                    res[label]["weight"] = w
        out["datasets"][dname] = {"queries": len(ds.queries), "systems": res}
    return out


def choose_weight(results: list[dict], max_drop: float = 0.01) -> dict:
    """The rerank-weight rule, applied to `rag eval ranking --weights ...` results on the
    VALIDATION sets (held-out sets are refused): per classifier, the weight with the best mean
    nDCG@10 over the datasets among the admissible ones (no dataset more than `max_drop` below
    the hybrid order); jointly, the weight admissible for every classifier with the best
    average of their means (one constant serves them all)."""
    import re

    per: dict[str, dict[float, dict]] = {}
    for res in results:
        bad = sorted(set(res["datasets"]) - set(VAL_DATASETS))
        if bad:
            raise ValueError(f"the weight is chosen on the validation sets {VAL_DATASETS} only, "
                             f"not on {bad}")
        for d, r in res["datasets"].items():
            hybrid = r["systems"]["hybrid"]["ndcg@10"]
            for label, m in r["systems"].items():
                if "weight" not in m:
                    continue
                name = re.sub(r" \(w=[^)]*\)$", "", label).removeprefix("hybrid + ")
                e = per.setdefault(name, {}).setdefault(float(m["weight"]), {"by_dataset": {}})
                e["by_dataset"][d] = {"ndcg@10": m["ndcg@10"],
                                      "vs_hybrid": m["ndcg@10"] - hybrid}
    if not per:
        raise ValueError("no classifier rows with a weight in these results")
    out: dict = {"max_drop": max_drop, "classifiers": {}}
    for name, ws in per.items():
        n_sets = max(len(e["by_dataset"]) for e in ws.values())
        for e in ws.values():
            v = list(e["by_dataset"].values())
            e["mean"] = sum(x["ndcg@10"] for x in v) / len(v)
            e["admissible"] = len(v) == n_sets and all(x["vs_hybrid"] >= -max_drop for x in v)
        ok = {w: e for w, e in ws.items() if e["admissible"]}
        out["classifiers"][name] = {"weights": {str(w): e for w, e in sorted(ws.items())},
                                    "pick": max(ok, key=lambda w: ok[w]["mean"]) if ok else None}
    common = set.intersection(*({w for w, e in ws.items() if e["admissible"]}
                                for ws in per.values()))
    out["joint_pick"] = max(common, key=lambda w: sum(per[n][w]["mean"] for n in per)
                            / len(per)) if common else None
    return out


def print_weight_choice(res: dict) -> None:
    print(f"rerank weight rule: best mean nDCG@10 over the validation sets, no set more than "
          f"{res['max_drop']:g} below the hybrid order")
    for name, c in res["classifiers"].items():
        print(f"  {name}:")
        for w, e in c["weights"].items():
            sets = "  ".join(f"{d} {x['ndcg@10']:.4f} ({100 * x['vs_hybrid']:+.2f})"
                             for d, x in e["by_dataset"].items())
            print(f"    w={w:<5s} mean {e['mean']:.4f}  {sets}"
                  f"{'' if e['admissible'] else '  (not admissible)'}")
        print(f"    pick: w={c['pick']}")
    print(f"joint pick (admissible for every classifier): w={res['joint_pick']}")


def plot_ranking(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dsets = list(result["datasets"])
    fig, axes = plt.subplots(1, len(dsets), figsize=(5.5 * len(dsets), 3.6), squeeze=False)
    metrics = ["ndcg@10", "mrr@10", "recall@10"]
    for ax, d in zip(axes[0], dsets):
        systems = result["datasets"][d]["systems"]
        w = 0.8 / len(systems)
        for i, (name, m) in enumerate(systems.items()):
            ax.bar([j + i * w for j in range(len(metrics))], [m[k] for k in metrics], w,
                   label=name)
        ax.set_xticks([j + w * (len(systems) - 1) / 2 for j in range(len(metrics))], metrics)
        ax.set_ylim(0, 1)
        ax.set_title(f"{d} ({result['datasets'][d]['queries']} q, top-{result['candidates']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_classification(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = {k: v for k, v in result.items() if not k.startswith("_")}
    metrics = ["precision", "recall", "f1", "auc"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    w = 0.8 / max(len(systems), 1)
    for i, (name, m) in enumerate(systems.items()):
        ax.bar([j + i * w for j in range(len(metrics))], [m[k] for k in metrics], w, label=name)
    ax.set_xticks([j + w * (len(systems) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylim(0, 1)
    c = result.get("_counts", {})
    ax.set_title(f"relevance classification ({c.get('eval_pairs')} held-out pairs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
