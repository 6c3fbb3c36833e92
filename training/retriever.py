"""Bi-encoder (embedder) fine-tuning: SentenceTransformerTrainer + MultipleNegativesRankingLoss
on (question, positive passage, mined hard negative) triplets; in-batch negatives come free
(batches hold no duplicate texts). Registered as kind "embedder".

A new embedder means a new index: the index records the embedder's weight hash and
`ChunkIndex.load` / `RagPipeline` refuse a mismatch with a message telling
`rag index build --name NAME --embedder PATH` (or `--embedder tuned` = the active embedder).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .common import (RunManifest, TrainConfig, resolve_base, finish_run, resume_checkpoint,
                     start_run, trainer_args_common)
from .data import (PairSet, load_split, mine_negatives, retriever_triplets,
                   sample_by_source, sample_queries)


@dataclass
class RetrieverConfig(TrainConfig):
    mining_embedder: str = "default"
    mnrl_scale: float = 20.0


def ir_evaluator(ps: PairSet, name: str, max_words: int = 0):
    """sentence-transformers' InformationRetrievalEvaluator over the split's passage pool."""
    from sentence_transformers.sentence_transformer.evaluation import \
        InformationRetrievalEvaluator

    corpus = {pid: (" ".join(p.text.split()[:max_words]) if max_words else p.text)
              for pid, p in ps.passages.items()}
    return InformationRetrievalEvaluator(
        {q.qid: q.text for q in ps.queries}, corpus,
        {q.qid: set(q.positives) for q in ps.queries}, name=name, ndcg_at_k=[10],
        mrr_at_k=[10], accuracy_at_k=[1, 10], precision_recall_at_k=[10], map_at_k=[10],
        show_progress_bar=False, write_csv=False)


def _pool_split(cfg: RetrieverConfig, split: str, n: int) -> PairSet:
    """n queries of a split and a passage pool (their positives + same focus + random)."""
    from .data import mining_pool

    ps = sample_queries(load_split(split, cfg.source_list), n, cfg.seed)
    pool = mining_pool(ps, cfg.mine_pool // 2, cfg.seed)
    return PairSet(ps.queries, {p: ps.passages[p] for p in pool}, ps.description)


def _short(m: dict) -> dict:
    return {k.split("_", 1)[-1]: round(float(v), 4) for k, v in m.items()
            if any(s in k for s in ("ndcg@10", "mrr@10", "recall@10", "accuracy@1"))}


def run(cfg: RetrieverConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False, embedder=None) -> dict:
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from rag_app.embed import SentenceTransformerEmbedder

    t0, out, progress, _ = start_run("retriever", cfg, output, progress_file, resume)
    try:
        emb = embedder or SentenceTransformerEmbedder(cfg.mining_embedder)
        train = sample_by_source(load_split("train", cfg.source_list), cfg.n_queries, cfg.seed,
                                 cfg.train_shares)
        mined = mine_negatives(train, emb, cfg.n_hard, cfg.n_random, cfg.mine_top,
                               cfg.mine_pool, cfg.seed, out.parent / ".cache", cfg.mine_words)
        rows = retriever_triplets(train, mined, cfg.seed)
        val = _pool_split(cfg, "val", cfg.n_val_queries)
        held = _pool_split(cfg, "eval", cfg.n_eval_queries)
        model = SentenceTransformer(resolve_base(cfg.base_model), device="cpu")
        serve_len = model.max_seq_length
        model.max_seq_length = min(cfg.max_length, serve_len)
        ev_val = ir_evaluator(val, "val", cfg.mine_words)
        ev_held = ir_evaluator(held, "heldout", cfg.mine_words)
        manifest = RunManifest("retriever", resolve_base(cfg.base_model), asdict(cfg), cfg.seed,
                               data={"train_triplets": len(rows),
                                     "val": {"queries": len(val.queries),
                                             "corpus": len(val.passages)},
                                     "heldout": {"queries": len(held.queries),
                                                 "corpus": len(held.passages)},
                                     "excluded": "medquad_test_titles, "
                                                 "pubmedqa_heldout_pmids (eval only)"})
        manifest.metrics_before = {"val": _short(ev_val(model)), "heldout": _short(ev_held(model))}
        ds = Dataset.from_dict({k: [r[k] for r in rows] for k in ("anchor", "positive",
                                                                   "negative")})
        args = SentenceTransformerTrainingArguments(
            **trainer_args_common(cfg, out, True), batch_sampler=BatchSamplers.NO_DUPLICATES)
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=ds,
            loss=MultipleNegativesRankingLoss(model, scale=cfg.mnrl_scale),
            evaluator=ev_val, callbacks=[progress])
        trainer.train(resume_from_checkpoint=resume_checkpoint(out, resume))
        manifest.metrics_after = {"val": _short(ev_val(model)), "heldout": _short(ev_held(model)),
                                  "train_loss_log": progress.losses}
        model.max_seq_length = serve_len  # the index chunks to the serving window
        metrics = {"heldout_" + k: v for k, v in manifest.metrics_after["heldout"].items()}
        return finish_run(model, trainer, progress, manifest, "embedder", "retriever", cfg,
                          activate, out, t0, metrics)
    except Exception as e:
        progress.error(f"{type(e).__name__}: {e}")
        raise
