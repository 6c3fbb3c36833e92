"""Synthetic queries for corpora without questions, then (optionally) a relevance classifier
trained on them.

Generation: `template` (default, fast): the passage's top TF-IDF keyphrases placed in
question templates ("Is X associated with Y?"); `generator`: the base generator writes a
question (rag_app.generate.HFGenerator("base").generate_from_prompt). Filter (round trip): a
query is kept only if its passage is in the top `roundtrip_k` of the passage pool for the
current embedder.

Demonstration recipe (synthetic.yaml): queries for the PubMedQA passages of the TRAINING
pmids only; the classifier is evaluated on the REAL questions of the held-out fold.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

import numpy as np

from .data import Mined, PairSet, Passage, Query, load_split, mine_negatives, relevance_pairs
from .relevance import RelevanceConfig

TEMPLATES = ("Is {a} associated with {b}?", "Does {a} affect {b}?",
             "What is the role of {a} in {b}?", "Is there a relationship between {a} and {b}?",
             "Does {a} predict {b}?", "What is known about {a} and {b}?")
METHODS = ("template", "generator")


@dataclass
class SyntheticConfig(RelevanceConfig):
    method: str = "template"
    n_passages: int = 200  # passages to write queries for (training side only)
    roundtrip_k: int = 5
    train: bool = True  # train the relevance classifier on the kept queries
    sources: str = "pubmedqa"

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is invalid: choose one of {METHODS}")


def keyphrases(texts: list[str], top: int = 2) -> list[list[str]]:
    """Top TF-IDF unigrams/bigrams per text (English stop words removed)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), stop_words="english",
                          max_df=0.3 if len(texts) >= 10 else 1.0,
                          token_pattern=r"(?u)\b[A-Za-z][A-Za-z-]{2,}\b", sublinear_tf=True)
    m = vec.fit_transform(texts)
    vocab = np.array(vec.get_feature_names_out())
    out = []
    for i in range(m.shape[0]):
        row = m.getrow(i)
        order = row.indices[np.argsort(-row.data)]
        picked: list[str] = []
        for term in vocab[order]:
            if not any(term in p or p in term for p in picked):
                picked.append(str(term))
            if len(picked) == top:
                break
        out.append(picked)
    return out


def template_queries(passages: list[Passage], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for kp in keyphrases([p.text for p in passages]):
        if len(kp) < 2:
            out.append(f"What is known about {kp[0]}?" if kp else "")
            continue
        out.append(rng.choice(TEMPLATES).format(a=kp[0], b=kp[1]))
    return out


def generator_queries(passages: list[Passage], generator=None) -> list[str]:
    from rag_app.generate import HFGenerator

    gen = generator or HFGenerator("base")
    out = []
    for p in passages:
        text = gen.generate_from_prompt(
            "Write one question that the following passage answers. Reply with the question "
            f"only.\n\nPassage: {p.text[:1200]}\n\nQuestion:")
        m = re.search(r"[^\n?]{8,}\?", text)
        out.append(m.group(0).strip() if m else "")
    return out


def roundtrip_filter(queries: list[str], passages: list[Passage], pool: list[Passage],
                     embedder, k: int, max_words: int = 0) -> list[bool]:
    """True where the query's own passage is in the top k of `pool` for the embedder."""
    from .data import embed_passages

    vecs = embed_passages(embedder, pool, None, max_words)
    row = {p.pid: i for i, p in enumerate(pool)}
    ok = [bool(q) for q in queries]
    idx = [i for i, good in enumerate(ok) if good]
    if not idx:
        return ok
    qv = embedder.encode([queries[i] for i in idx])
    sims = qv @ vecs.T
    for j, i in enumerate(idx):
        top = np.argsort(-sims[j])[:k]
        ok[i] = row[passages[i].pid] in set(top.tolist())
    return ok


def synthesize(cfg: SyntheticConfig, embedder, generator=None) -> tuple[PairSet, dict]:
    """Synthetic queries for n passages of the TRAINING split, round-trip filtered."""
    train = load_split("train", cfg.source_list)
    pool = sorted(train.passages.values(), key=lambda p: p.pid)
    rng = random.Random(cfg.seed)
    chosen = rng.sample(pool, min(cfg.n_passages, len(pool)))
    qs = (template_queries(chosen, cfg.seed) if cfg.method == "template"
          else generator_queries(chosen, generator))
    ids = {p.pid for p in chosen}
    rest = [p for p in pool if p.pid not in ids]  # distractors for the round trip
    rt_pool = chosen + rng.sample(rest, max(0, min(cfg.mine_pool - len(chosen), len(rest))))
    keep = roundtrip_filter(qs, chosen, rt_pool, embedder, cfg.roundtrip_k, cfg.mine_words)
    queries = [Query(f"syn-{p.pid}", q, {p.pid}, p.source, p.group)
               for p, q, k in zip(chosen, qs, keep) if k]
    stats = {"method": cfg.method, "passages": len(chosen), "generated": sum(bool(q) for q in qs),
             "kept_roundtrip": len(queries), "roundtrip_k": cfg.roundtrip_k,
             "roundtrip_pool": len(rt_pool)}
    return PairSet(queries, train.passages, {"split": "train", "synthetic": stats}), stats


def synthetic_pairs(ps: PairSet, cfg: SyntheticConfig, embedder, cache_dir=None) -> list[dict]:
    """Pairs for the synthetic queries. Negatives from the query's own abstract/focus are
    dropped: other sections of the same abstract may well answer a generated question."""
    mined = mine_negatives(ps, embedder, cfg.n_hard, cfg.n_random, cfg.mine_top, cfg.mine_pool,
                           cfg.seed, cache_dir, cfg.mine_words)
    grp = {q.qid: q.group for q in ps.queries}
    keep = lambda qid, pids: [p for p in pids if ps.passages[p].group != grp[qid]]  # noqa: E731
    mined = Mined({}, {q: keep(q, v) for q, v in mined.dense.items()},
                  {q: keep(q, v) for q, v in mined.random.items()})
    return relevance_pairs(ps, mined, 1)


def run(cfg: SyntheticConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False, embedder=None, generator=None) -> dict:
    from rag_app.embed import SentenceTransformerEmbedder

    from . import relevance
    from .common import run_dir

    out = run_dir("synthetic", output)
    emb = embedder or SentenceTransformerEmbedder(cfg.mining_embedder)
    ps, stats = synthesize(cfg, emb, generator)
    with open(out / "synthetic_queries.jsonl", "w", encoding="utf-8") as f:
        for q in ps.queries:
            f.write(json.dumps({"id": q.qid, "question": q.text,
                                "passage_id": sorted(q.positives)[0]}) + "\n")
    if not cfg.train:
        from .common import ProgressCallback

        ProgressCallback(progress_file).done(str(out / "synthetic_queries.jsonl"), stats)
        return {"entry": None, "manifest": {"data": stats}, "run_dir": str(out)}
    rows = synthetic_pairs(ps, cfg, emb, out.parent / ".cache")
    res = relevance.run(cfg, output=str(out), progress_file=progress_file, resume=resume,
                        activate=activate, train_rows=rows, embedder=emb,
                        data_note={"synthetic": stats, "eval": "real questions, held-out fold"})
    return res
