"""Dataset builders for the retrieval-side training types, from ../shared/data.

Relevance pairs (question, passage, label) and retriever triplets (anchor, positive, negative):
- MedQuAD: a question -> its own answer passage(s) as positives; hard negatives are passages of
  the SAME focus with another question type (the classic "same disease, other question" case)
  and passages the bi-encoder ranks high that are not positives; plus one random negative.
- PubMedQA trainval: a question -> its context passages (qrels) as positives.
Held-out data never enters training: MedQuAD titles in `medquad_test_titles()` and PubMedQA
pmids in `pubmedqa_heldout_pmids()` are split off here (and, with `split="eval"`, are the only
thing returned). Passages are formatted exactly as rag_app/rerank.py scores them:
"title\\ntext".
"""
from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from rag_app.config import shared_data_dir
from rag_app.datasets import (_bucket, medquad_records, medquad_test_titles,
                              pubmedqa_heldout_pmids, pubmedqa_records)

SPLITS = ("train", "val", "eval")


@dataclass
class Passage:
    pid: str
    title: str
    text: str
    source: str  # medquad | pubmedqa
    group: str  # the focus title (MedQuAD) or the pmid (PubMedQA): the unit of splitting
    qtype: str = ""
    question: str = ""  # the question this passage was written for (MedQuAD)

    @property
    def formatted(self) -> str:
        return f"{self.title}\n{self.text}"


@dataclass
class Query:
    qid: str
    text: str
    positives: set[str]  # passage ids
    source: str
    group: str
    qtype: str = ""


@dataclass
class PairSet:
    """What a builder returns: the queries, the passage pool, and how it was made."""
    queries: list[Query]
    passages: dict[str, Passage]
    description: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def _test_titles() -> frozenset[str]:
    return frozenset(medquad_test_titles())


@lru_cache(maxsize=1)
def _heldout_pmids() -> frozenset[str]:
    return frozenset(pubmedqa_heldout_pmids())


def _val_bucket(group: str, val_fraction: float) -> bool:
    """The held-out split's hash rule (case-blind: MedQuAD spells some foci two ways,
    "Amyloidosis" and "amyloidosis", and both must fall on the same side), salted "val:"."""
    return _bucket("val:" + group.strip(), 1000) < val_fraction * 1000


def split_of(p_or_q, val_fraction: float = 0.1) -> str:
    """eval = the saved held-out splits; val = a fixed slice of the TRAINING groups (used to
    choose thresholds / early stopping); train = the rest."""
    if p_or_q.source == "medquad":
        if p_or_q.group in _test_titles():
            return "eval"
    elif p_or_q.group in _heldout_pmids():
        return "eval"
    return "val" if _val_bucket(p_or_q.group, val_fraction) else "train"


@lru_cache(maxsize=1)
def _load_medquad() -> tuple[list[Query], dict[str, Passage]]:
    return load_medquad()


@lru_cache(maxsize=1)
def _load_pubmedqa() -> tuple[list[Query], dict[str, Passage]]:
    return load_pubmedqa()


def load_medquad() -> tuple[list[Query], dict[str, Passage]]:
    passages, by_key = {}, {}
    queries: list[Query] = []
    for r in medquad_records():
        if not r.get("text", "").strip():
            continue
        p = Passage(r["pid"], r["title"], r["text"], "medquad", r["title"], r.get("qtype", ""),
                    (r.get("question") or "").strip())
        passages[p.pid] = p
        q = (r.get("question") or "").strip()
        if not q:
            continue
        key = (r["title"], q)
        if key in by_key:
            by_key[key].positives.add(p.pid)
        else:
            by_key[key] = Query(r["pid"], q, {p.pid}, "medquad", r["title"], p.qtype)
            queries.append(by_key[key])
    return queries, passages


def load_pubmedqa() -> tuple[list[Query], dict[str, Passage]]:
    data = shared_data_dir() / "pubmedqa"
    passages = {}
    with open(data / "pqal_passages.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("text", "").strip():
                passages[r["pid"]] = Passage(
                    r["pid"], f"PubMed {r['pmid']} ({r.get('section', '').lower()})", r["text"],
                    "pubmedqa", r["pmid"])
    qrels: dict[str, set[str]] = defaultdict(set)
    with open(data / "pqal_qrels_trainval.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if int(row["grade"]) > 0 and row["passage_id"] in passages:
                qrels[row["query_id"]].add(row["passage_id"])
    queries = [Query(r["pmid"], r["question"].strip(), qrels[r["pmid"]], "pubmedqa", r["pmid"])
               for r in pubmedqa_records() if qrels.get(r["pmid"])]
    trainval = {q.group for q in queries}
    # passages of the 500 PubMedQA test questions (not shipped) are kept out of training
    passages = {k: p for k, p in passages.items() if p.group in trainval}
    return queries, passages


def load_split(split: str, sources: tuple[str, ...] = ("medquad", "pubmedqa"),
               val_fraction: float = 0.1) -> PairSet:
    """Queries and passages of one split. Passages of other splits are NOT included, so a
    training negative can never be an eval passage."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: choose one of {SPLITS}")
    queries, passages = [], {}
    for src in sources:
        if src == "medquad":
            q, p = _load_medquad()  # cached: treat as read-only
        elif src == "pubmedqa":
            q, p = _load_pubmedqa()
        else:
            raise ValueError(f"data source {src!r} is invalid: choose medquad or pubmedqa")
        queries += [x for x in q if split_of(x, val_fraction) == split]
        passages.update({k: v for k, v in p.items() if split_of(v, val_fraction) == split})
    queries = [q for q in queries if q.positives <= passages.keys()]
    return PairSet(queries, passages, {"split": split, "sources": list(sources),
                                       "val_fraction": val_fraction})


def sample_queries(ps: PairSet, n: int | None, seed: int) -> PairSet:
    """At most n queries (a seeded sample; 0/None = all). The passage pool is unchanged."""
    if not n or n >= len(ps.queries):
        return ps
    rng = random.Random(seed)
    qs = sorted(ps.queries, key=lambda q: q.qid)
    rng.shuffle(qs)
    return PairSet(qs[:n], ps.passages, ps.description | {"n_queries_cap": n})


def sample_by_source(ps: PairSet, n: int | None, seed: int, shares: dict[str, float]
                     ) -> PairSet:
    """n queries: round(n * share) from each source named in `shares`
    (capped by what the split has), the rest sampled from the other sources; seeded, and
    without shares the same as `sample_queries`. The passage pool is unchanged."""
    if not shares or not n:
        return sample_queries(ps, n, seed)
    picked: list[Query] = []
    for src, share in sorted(shares.items()):
        own = PairSet([q for q in ps.queries if q.source == src], ps.passages, ps.description)
        picked += sample_queries(own, max(1, round(n * share)), seed).queries
    rest = PairSet([q for q in ps.queries if q.source not in shares], ps.passages,
                   ps.description)
    if n > len(picked):  # (sample_queries reads n = 0 as "all")
        picked += sample_queries(rest, n - len(picked), seed).queries
    return PairSet(picked, ps.passages, ps.description | {"n_queries_cap": n,
                                                          "source_shares": shares})


def _norm(q: str) -> str:
    return " ".join(q.lower().split()).rstrip(" ?")


def question_index(passages: dict[str, Passage]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for pid, p in passages.items():
        if p.question:
            out[_norm(p.question)].add(pid)
    return out


def forbidden_negatives(q: Query, passages: dict[str, Passage],
                        by_question: dict[str, set[str]] | None = None) -> set[str]:
    """Passage ids that must never be a negative for q: its positives, and any passage written
    for the identical question text."""
    by_question = by_question if by_question is not None else question_index(passages)
    return set(q.positives) | by_question.get(_norm(q.text), set())


def mining_pool(ps: PairSet, size: int, seed: int) -> list[str]:
    """Passage ids to embed for mining: positives and same-focus passages of the queries first,
    then random passages up to `size`."""
    by_group: dict[str, list[str]] = defaultdict(list)
    for pid, p in ps.passages.items():
        by_group[p.group].append(pid)
    pool: dict[str, None] = {}
    for q in ps.queries:
        for pid in sorted(q.positives) + by_group[q.group]:
            pool[pid] = None
    rest = sorted(set(ps.passages) - set(pool))
    random.Random(seed).shuffle(rest)
    for pid in rest[:max(0, size - len(pool))]:
        pool[pid] = None
    return list(pool)


def embed_passages(embedder, passages: list[Passage], cache_dir: Path | None = None,
                   max_words: int = 0):
    """Normalised vectors of the passages' text (as the index embeds chunks; the first
    `max_words` words when > 0, cheaper on CPU), cached on disk by (embedder hash, ids)."""
    import hashlib

    key = hashlib.sha1((f"{embedder.fingerprint}|{max_words}|" + "|".join(p.pid for p in passages))
                       .encode()).hexdigest()[:16]
    path = cache_dir / f"emb-{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path)
    texts = [" ".join(p.text.split()[:max_words]) if max_words else p.text for p in passages]
    vecs = embedder.encode(texts, progress=len(passages) > 500)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs)
    return vecs


@dataclass
class Mined:
    """Per query: its hard negatives (same focus, bi-encoder) and random negatives."""
    same_focus: dict[str, list[str]]
    dense: dict[str, list[str]]
    random: dict[str, list[str]]


def mine_negatives(ps: PairSet, embedder, n_hard: int = 2, n_random: int = 1,
                   mine_top: int = 30, pool_size: int = 3000, seed: int = 0,
                   cache_dir: Path | None = None, max_words: int = 0,
                   n_same_focus: int = 1) -> Mined:
    """Hard negatives: first up to `n_same_focus` passages of the same focus with another
    question type (when they exist; never more than `n_hard`), then the highest-scoring
    bi-encoder passages (FAISS inner product over the pool) that are not forbidden; plus
    random ones. Never a positive, never a passage written for the identical question."""
    import faiss

    rng = random.Random(seed)
    pool = mining_pool(ps, pool_size, seed)
    vecs = embed_passages(embedder, [ps.passages[p] for p in pool], cache_dir, max_words)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    qvecs = embedder.encode([q.text for q in ps.queries]) if ps.queries else vecs[:0]
    k = min(mine_top, len(pool))
    _, rows = index.search(np.ascontiguousarray(qvecs, dtype=np.float32), k) if k else (None, [])
    by_group: dict[str, list[str]] = defaultdict(list)
    for pid in pool:
        by_group[ps.passages[pid].group].append(pid)
    same, dense, rand = {}, {}, {}
    by_question = question_index(ps.passages)
    for qi, q in enumerate(ps.queries):
        bad = forbidden_negatives(q, ps.passages, by_question)
        sf = [pid for pid in by_group[q.group] if pid not in bad]
        sf.sort(key=lambda pid: (ps.passages[pid].qtype == q.qtype, pid))  # other qtype first
        same[q.qid] = sf[:min(n_same_focus, n_hard)]
        taken = bad | set(same[q.qid])
        d = [pool[r] for r in rows[qi] if r >= 0 and pool[r] not in taken]
        dense[q.qid] = d[:max(0, n_hard - len(same[q.qid]))]
        taken |= set(dense[q.qid])
        r_out = []
        for _ in range(20 * max(n_random, 1)):
            if len(r_out) >= n_random:
                break
            pid = pool[rng.randrange(len(pool))]
            if pid not in taken:
                r_out.append(pid)
                taken.add(pid)
        rand[q.qid] = r_out
    return Mined(same, dense, rand)


def relevance_pairs(ps: PairSet, mined: Mined, max_positives: int = 2) -> list[dict]:
    """(query, passage, label) rows: positives label 1, mined + random negatives label 0."""
    rows = []
    for q in ps.queries:
        for pid in sorted(q.positives)[:max_positives]:
            rows.append({"query": q.text, "passage": ps.passages[pid].formatted, "label": 1.0,
                         "qid": q.qid, "pid": pid, "kind": "positive"})
        for kind, src in (("same_focus", mined.same_focus), ("dense", mined.dense),
                          ("random", mined.random)):
            for pid in src.get(q.qid, []):
                rows.append({"query": q.text, "passage": ps.passages[pid].formatted,
                             "label": 0.0, "qid": q.qid, "pid": pid, "kind": kind})
    return rows


def retriever_triplets(ps: PairSet, mined: Mined, seed: int = 0) -> list[dict]:
    """(anchor, positive, negative) rows, one per query (so in-batch negatives are never a
    duplicate of the anchor's own positive); the negative is the hardest mined one. Passages are
    embedded as the index embeds chunks: text only."""
    rng = random.Random(seed)
    rows = []
    for q in ps.queries:
        negs = mined.same_focus.get(q.qid, []) + mined.dense.get(q.qid, []) + \
            mined.random.get(q.qid, [])
        if not negs:
            continue
        pos = rng.choice(sorted(q.positives))
        rows.append({"anchor": q.text, "positive": ps.passages[pos].text,
                     "negative": ps.passages[negs[0]].text})
    return rows


def describe_pairs(rows: list[dict]) -> dict:
    from collections import Counter

    return {"n_pairs": len(rows), "n_queries": len({r["qid"] for r in rows}),
            "by_kind": dict(Counter(r["kind"] for r in rows)),
            "positives": sum(r["label"] > 0.5 for r in rows)}


# ---------- eval index corpus ----------
def eval_titles(n_titles: int = 40, seed: int = 0) -> set[str]:
    """A fixed sample of the held-out MedQuAD titles (the ranking eval's medquad-test queries
    are those of these titles, so a modest index holds all their passages)."""
    titles = sorted(medquad_test_titles())
    random.Random(seed).shuffle(titles)
    return set(titles[:n_titles])


def eval_corpus(n_titles: int = 40, n_medquad_distractors: int = 600,
                n_pubmed_distractor_pmids: int = 150, seed: int = 0) -> list[dict]:
    """Passages for a modest evaluation index (the default index needs ~20k chunks embedded,
    too slow here): every MedQuAD passage of `eval_titles()`, every PubMedQA passage of the
    held-out fold, and distractors: n random MedQuAD passages (any title) and the passages of
    n other PubMedQA trainval questions. Ids are the passage ids (= the qrels)."""
    keep = eval_titles(n_titles, seed)
    rng = random.Random(seed)
    rows, others = [], []
    for r in medquad_records():
        if not r.get("text", "").strip():
            continue
        rec = {"id": r["pid"], "title": r["title"], "text": r["text"]}
        (rows if r["title"] in keep else others).append(rec)
    rows += rng.sample(others, min(n_medquad_distractors, len(others)))
    held = pubmedqa_heldout_pmids()
    trainval = sorted({r["pmid"] for r in pubmedqa_records()} - held)
    held |= set(rng.sample(trainval, min(n_pubmed_distractor_pmids, len(trainval))))
    with open(shared_data_dir() / "pubmedqa" / "pqal_passages.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("text", "").strip() and r["pmid"] in held:
                rows.append({"id": r["pid"], "text": r["text"],
                             "title": f"PubMed {r['pmid']} ({r.get('section', '').lower()})"})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# ---------- instruction examples (RAFT-style) for the generator ----------
# Each example is rendered with THE serving prompt (rag_app.prompts.render_prompt), so the model
# is trained on exactly what HFGenerator.prompt() sends it. RAFT (Zhang et al. 2024): the gold
# passage(s) sit among distractors at a random position; a share of examples has NO gold passage
# and the target is exactly prompts.NO_ANSWER.
def _content_words(text: str) -> set[str]:
    """Lower-cased words of 4+ characters (a cheap lexical-overlap signal)."""
    import re

    return set(re.findall(r"[a-z][a-z0-9-]{3,}", text.lower()))


def _sentences(text: str) -> list[str]:
    import re

    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(])", " ".join(text.split()))
            if s.strip()]


def concise_answer(text: str, max_sentences: int = 3, max_words: int = 60) -> str:
    """The first 2-3 sentences of a passage (at least one, at most ~max_words words)."""
    out: list[str] = []
    for s in _sentences(text)[:max_sentences]:
        if out and len(" ".join(out + [s]).split()) > max_words:
            break
        out.append(s)
    answer = " ".join(out) or " ".join(text.split()[:max_words])
    words = answer.split()
    if len(words) > max_words * 1.5:  # one very long sentence: cut it at a clause
        answer = " ".join(words[:max_words]).rstrip(",;:") + "."
    return answer


@dataclass
class InstructExample:
    """One training example: the serving prompt and the target completion (EOS appended)."""
    qid: str
    source: str  # pubmedqa | medquad
    group: str  # pmid | MedQuAD title (the unit of the held-out split)
    question: str
    sources: list  # rag_app.types.Source, numbered 1..n as in the prompt
    answer: str  # target text without EOS
    gold_numbers: list[int]  # [] when the gold passage is absent
    prompt: str = ""
    completion: str = ""
    n_distractors: int = 0
    prompt_tokens: int = 0
    difficulty: float = 0.0
    augment: str = ""  # which paraphrase was applied ("" = none)

    @property
    def gold_absent(self) -> bool:
        return not self.gold_numbers


def _pubmedqa_answers() -> dict[str, dict]:
    from rag_app.datasets import pubmedqa_records

    return {r["pmid"]: r for r in pubmedqa_records()}


def _pick_distractors(q: Query, ps: PairSet, n: int, rng: random.Random,
                      by_group: dict[str, list[str]], pool_size: int = 60) -> list[str]:
    """n distractor passage ids from OTHER groups (other pmids / other MedQuAD titles): the one
    sharing most content words with the question out of a random pool (a cheap stand-in for a
    retrieved near-miss), then random ones."""
    groups = [g for g in by_group if g != q.group]
    if not groups or n <= 0:
        return []
    cands = []
    for _ in range(pool_size):
        g = groups[rng.randrange(len(groups))]
        cands.append(rng.choice(by_group[g]))
    cands = list(dict.fromkeys(cands))
    qw = _content_words(q.text)
    ranked = sorted(cands, key=lambda pid: -len(qw & _content_words(ps.passages[pid].text)))
    out = ranked[:1]
    rest = [c for c in cands if c not in out]
    rng.shuffle(rest)
    for pid in rest:
        if len(out) >= n:
            break
        if ps.passages[pid].group not in {ps.passages[o].group for o in out}:
            out.append(pid)
    return out[:n]


def instruction_examples(tokenizer, n_examples: int = 400, split: str = "train",
                         sources: tuple[str, ...] = ("pubmedqa", "medquad"),
                         pubmedqa_share: float = 0.5, n_sources: int = 3, max_gold: int = 2,
                         p_no_answer: float = 0.15, max_prompt_tokens: int | None = 400,
                         answer_words: int = 60, seed: int = 0) -> list[InstructExample]:
    """RAFT-style examples from the `split` side of the data (never the held-out PubMedQA pmids
    or MedQuAD test titles: load_split only returns eval data for split="eval").

    PubMedQA: "Yes/No/Maybe. <long answer> [n]" citing the gold context passage(s);
    MedQuAD: the first 2-3 sentences of the question's own passage + " [n]".
    Exactly round(p_no_answer * n) examples have no gold passage: target = NO_ANSWER.
    """
    from rag_app.prompts import NO_ANSWER, render_prompt
    from rag_app.types import Source

    if not 0 <= p_no_answer <= 1:
        raise ValueError(f"p_no_answer={p_no_answer!r} is invalid: use 0..1")
    if n_sources < 1 or max_gold < 1:
        raise ValueError(f"n_sources={n_sources}, max_gold={max_gold} are invalid: use >= 1")
    rng = random.Random(seed)
    shares = {"pubmedqa": pubmedqa_share, "medquad": 1 - pubmedqa_share}
    if len(sources) == 1:
        shares = {sources[0]: 1.0}
    records = _pubmedqa_answers() if "pubmedqa" in sources else {}
    picked: list[tuple[Query, PairSet, dict]] = []
    for src in sources:
        ps = load_split(split, (src,))
        qs = sorted(ps.queries, key=lambda q: q.qid)
        if src == "pubmedqa":
            qs = [q for q in qs if q.qid in records]
        rng.shuffle(qs)
        want = round(shares.get(src, 0) * n_examples)
        by_group: dict[str, list[str]] = defaultdict(list)
        for pid in sorted(ps.passages):
            by_group[ps.passages[pid].group].append(pid)
        for i in range(want):  # cycles through the questions when n exceeds them
            if qs:
                picked.append((qs[i % len(qs)], ps, by_group))
    rng.shuffle(picked)
    n_absent = round(p_no_answer * len(picked))
    absent = set(rng.sample(range(len(picked)), n_absent))
    out = []
    for i, (q, ps, by_group) in enumerate(picked):
        gold = sorted(q.positives)
        if q.source == "pubmedqa":
            gold = gold[-max_gold:]  # the last sections hold the results / conclusions
        else:
            gold = gold[:1]
        gold = [] if i in absent else gold[:n_sources]
        distract = _pick_distractors(q, ps, n_sources - len(gold), rng, by_group)
        pids = gold + distract
        rng.shuffle(pids)
        srcs = [Source(k, f"{pid}#0", pid, ps.passages[pid].title, ps.passages[pid].text, 0.0)
                for k, pid in enumerate(pids, start=1)]
        nums = [k for k, pid in enumerate(pids, start=1) if pid in gold]
        cite = "".join(f"[{k}]" for k in nums)
        if not nums:
            answer = NO_ANSWER
        elif q.source == "pubmedqa":
            r = records[q.qid]
            long = concise_answer(r["long_answer"], 3, answer_words)
            answer = f"{r['final_decision'].capitalize()}. {long} {cite}"
        else:
            answer = f"{concise_answer(ps.passages[gold[0]].text, 3, answer_words)} {cite}"
        prompt = render_prompt(tokenizer, q.text, srcs, max_prompt_tokens)
        ex = InstructExample(f"{q.qid}:{i}", q.source, q.group, q.text, srcs, answer, nums,
                             prompt, answer + tokenizer.eos_token, len(distract))
        ex.prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        out.append(ex)
    return out


def describe_instructions(examples: list[InstructExample]) -> dict:
    from collections import Counter

    n = max(len(examples), 1)
    return {"n_examples": len(examples), "by_source": dict(Counter(e.source for e in examples)),
            "gold_absent_share": sum(e.gold_absent for e in examples) / n,
            "augmented": sum(bool(e.augment) for e in examples),
            "mean_prompt_tokens": sum(e.prompt_tokens for e in examples) / n,
            "groups": len({e.group for e in examples})}


# ---------- preference pairs (RLHF: reward model, DPO, PPO prompts) ----------
# Origins, always recorded per pair and reported separately:
#   human                   the app's feedback store: a base-vs-tuned preference, or two
#                           different 1-5 ratings of the two answers to one question
#   data:medquad-sibling    MedQuAD: the question's own answer preferred over the answer to
#                           ANOTHER question on the same topic (same focus), both passages given
#                           and cited - only matching the answer to the question separates them
#   data:pubmedqa-other     PubMedQA: the expert decision + long answer preferred over another
#                           question's expert answer (its decision and text, citing a source)
#   data:pubmedqa-generated PubMedQA: the expert answer preferred over one generated by a model
#                           (when a generate function is given)
#   data:no-answer          gold passage absent: "the sources do not answer" preferred over an
#                           answer drawn from a distractor
#   data:over-refusal       gold passage present: its answer preferred over a refusal
#   synthetic:rubric        several answers sampled per question, ranked by `rubric_score`
RUBRIC = {"grounding": 1.0, "citation": 0.5, "refusal": 1.0, "length": 0.5}
TARGET_WORDS = 60
# Share of bare-decision pairs in the held-out preference sets (reward / DPO / `rag eval
# reward`). Training on them too (RewardConfig.bare_decision_share 0.1) made the reward model
# worse on validation (0.784 vs 0.837; no-answer 0.20 vs 0.41) while the model trained without
# them already ranked 0.967 of them right: training leaves them out by default.
HELDOUT_BARE_SHARE = 0.1


@dataclass
class PreferencePair:
    question: str
    sources: list  # rag_app.types.Source, numbered 1..n as the generator saw them
    chosen: str
    rejected: str
    origin: str
    group: str = ""  # the unit of the held-out split (pmid / MedQuAD focus / interaction)
    gold_numbers: list = field(default_factory=list)  # [] = the sources do not answer

    def to_dict(self) -> dict:
        return {"question": self.question, "chosen": self.chosen, "rejected": self.rejected,
                "origin": self.origin, "group": self.group, "gold_numbers": self.gold_numbers,
                "sources": [{"number": s.number, "id": s.id, "doc_id": s.doc_id,
                             "title": s.title, "text": s.text} for s in self.sources]}


def _sources(ps: PairSet, pids: list[str]) -> list:
    from rag_app.types import Source

    return [Source(k, f"{pid}#0", pid, ps.passages[pid].title, ps.passages[pid].text, 0.0)
            for k, pid in enumerate(pids, start=1)]


def data_pairs(split: str, n_pairs: int, seed: int = 0, n_sources: int = 3,
               answer_words: int = 40, shares: dict | None = None,
               bare_share: float = 0.0) -> list[PreferencePair]:
    """Data-derived pairs from one split of the shipped data (train for training; val / eval
    are other questions' groups, for held-out accuracy). `shares` of the origins default to
    bare-decision `bare_share` and the rest as medquad-sibling .4, pubmedqa-other .3, no-answer
    .15, over-refusal .15. Training uses bare_share 0 by default; held-out sets use
    HELDOUT_BARE_SHARE, so held-out accuracy shows whether a model pays for a bare decision.
    bare-decision: the answer with its explanation and citation over a bare "Yes."/"No."/
    "Maybe." (PubMedQA: the expert's own decision; MedQuAD: a yes/no that answers nothing), the
    reward hack PPO found when no pair said it was worse."""
    from rag_app.prompts import NO_ANSWER

    rest = 1.0 - bare_share
    shares = shares or {"data:medquad-sibling": .4 * rest, "data:pubmedqa-other": .3 * rest,
                        "data:no-answer": .15 * rest, "data:over-refusal": .15 * rest,
                        "data:bare-decision": bare_share}
    shares = {k: v for k, v in shares.items() if v > 0}
    rng = random.Random(seed)
    mq, pq = load_split(split, ("medquad",)), load_split(split, ("pubmedqa",))
    records = _pubmedqa_answers()
    pq_qs = sorted((q for q in pq.queries if q.qid in records), key=lambda q: q.qid)
    by_title: dict[str, list[Query]] = defaultdict(list)
    for q in sorted(mq.queries, key=lambda q: q.qid):
        by_title[q.group].append(q)
    siblings = [(a, b) for qs in by_title.values() for a in qs for b in qs
                if a is not b and a.positives and b.positives and a.positives != b.positives
                and _norm(a.text) != _norm(b.text)]
    rng.shuffle(siblings)
    rng.shuffle(pq_qs)
    groups = {"medquad": defaultdict(list), "pubmedqa": defaultdict(list)}
    for name, ps in (("medquad", mq), ("pubmedqa", pq)):
        for pid in sorted(ps.passages):
            groups[name][ps.passages[pid].group].append(pid)
    out: list[PreferencePair] = []

    def cite(nums):
        return "".join(f"[{k}]" for k in nums)

    def arrange(gold, others, n_extra, q, ps, by_group):
        pids = gold + others + _pick_distractors(q, ps, n_extra, rng, by_group)
        pids = list(dict.fromkeys(pids))[:max(n_sources, len(gold) + len(others))]
        rng.shuffle(pids)
        return pids

    want = {k: int(v * n_pairs) for k, v in shares.items()}  # largest remainder: sums to n
    for k in sorted(shares, key=lambda k: -(shares[k] * n_pairs - want[k]))[
            :max(n_pairs - sum(want.values()), 0)]:
        want[k] += 1
    for a, b in siblings[:want.get("data:medquad-sibling", 0)]:
        ga, gb = sorted(a.positives)[0], sorted(b.positives)[0]
        pids = arrange([ga], [gb], n_sources - 2, a, mq, groups["medquad"])
        na, nb = pids.index(ga) + 1, pids.index(gb) + 1
        out.append(PreferencePair(
            a.text, _sources(mq, pids),
            f"{concise_answer(mq.passages[ga].text, 3, answer_words)} {cite([na])}",
            f"{concise_answer(mq.passages[gb].text, 3, answer_words)} {cite([nb])}",
            "data:medquad-sibling", a.group, [na]))
    k_other = want.get("data:pubmedqa-other", 0)
    for i, q in enumerate(pq_qs[:k_other]):
        other = pq_qs[(i + 1 + rng.randrange(len(pq_qs) - 1)) % len(pq_qs)] \
            if len(pq_qs) > 1 else None
        if other is None:
            break
        gold = sorted(q.positives)[-2:]
        pids = arrange(gold, [], n_sources - len(gold), q, pq, groups["pubmedqa"])
        nums = [k for k, p in enumerate(pids, 1) if p in gold]
        wrong = [k for k, p in enumerate(pids, 1) if p not in gold] or nums
        r, o = records[q.qid], records[other.qid]
        out.append(PreferencePair(
            q.text, _sources(pq, pids),
            f"{r['final_decision'].capitalize()}. "
            f"{concise_answer(r['long_answer'], 3, answer_words)} {cite(nums)}",
            f"{o['final_decision'].capitalize()}. "
            f"{concise_answer(o['long_answer'], 3, answer_words)} {cite(wrong[:1])}",
            "data:pubmedqa-other", q.group, nums))
    pool = [(q, mq, "medquad") for q in sorted(mq.queries, key=lambda q: q.qid)] + \
        [(q, pq, "pubmedqa") for q in pq_qs]
    rng.shuffle(pool)
    n_abs, n_over = want.get("data:no-answer", 0), want.get("data:over-refusal", 0)
    n_bare = want.get("data:bare-decision", 0)
    # half PubMedQA (questions pubmedqa-other left unused first), half MedQuAD
    pq_rest = [(q, pq, "pubmedqa") for q in pq_qs[k_other:] + pq_qs[:k_other]]
    mq_rest = [t for t in pool[n_abs + n_over:] if t[2] == "medquad"]
    bare = [t for pair in zip(pq_rest, mq_rest) for t in pair]
    for q, ps, name in bare[:n_bare]:
        gold = sorted(q.positives)[-1:] if name == "pubmedqa" else sorted(q.positives)[:1]
        pids = arrange(gold, [], n_sources - len(gold), q, ps, groups[name])
        nums = [k for k, p in enumerate(pids, 1) if p in gold]
        if name == "pubmedqa":
            decision = f"{records[q.qid]['final_decision'].capitalize()}."
            chosen = f"{decision} {concise_answer(records[q.qid]['long_answer'], 3, answer_words)}"
        else:
            decision = rng.choice(["Yes.", "No."])
            chosen = concise_answer(ps.passages[gold[0]].text, 3, answer_words)
        out.append(PreferencePair(q.text, _sources(ps, pids), f"{chosen} {cite(nums)}",
                                  decision, "data:bare-decision", q.group, nums))
    for j, (q, ps, name) in enumerate(pool[:n_abs + n_over]):
        absent = j < n_abs
        gold = [] if absent else (sorted(q.positives)[-1:] if name == "pubmedqa"
                                  else sorted(q.positives)[:1])
        pids = arrange(gold, [], n_sources - len(gold), q, ps, groups[name])
        nums = [k for k, p in enumerate(pids, 1) if p in gold]
        if absent:
            k = rng.randrange(len(pids)) + 1
            wrong = f"{concise_answer(ps.passages[pids[k - 1]].text, 2, answer_words)} [{k}]"
            out.append(PreferencePair(q.text, _sources(ps, pids), NO_ANSWER, wrong,
                                      "data:no-answer", q.group, []))
        else:
            text = records[q.qid]["long_answer"] if name == "pubmedqa" else \
                ps.passages[gold[0]].text
            prefix = f"{records[q.qid]['final_decision'].capitalize()}. " \
                if name == "pubmedqa" else ""
            out.append(PreferencePair(
                q.text, _sources(ps, pids),
                f"{prefix}{concise_answer(text, 3, answer_words)} {cite(nums)}", NO_ANSWER,
                "data:over-refusal", q.group, nums))
    rng.shuffle(out)
    return out


def feedback_pairs(db: str | Path | None = None, include_ratings: bool = True
                   ) -> list[PreferencePair]:
    """Human pairs from the app's feedback store (oldest first); the group is the question."""
    from rag_app.feedback import FeedbackStore
    from rag_app.types import Source

    out = []
    for p in FeedbackStore(db).preference_pairs(include_ratings):
        row = p["row"]
        srcs = [Source(s["number"], s["id"], s["doc_id"], s["title"], s["text"], s["score"])
                for s in row["sources"]]
        out.append(PreferencePair(row["question"], srcs, p["chosen"], p["rejected"], "human",
                                  f"q:{_norm(row['question'])}"))
    return out


SYNTHETIC_HELDOUT = 0.2  # share of synthetic-pair questions held out


def read_pairs(path: str) -> list[PreferencePair]:
    """Preference pairs from a JSON-lines file of `PreferencePair.to_dict` rows (what `rag
    train synthetic-prefs` writes); a malformed line is an error naming the file and line."""
    from rag_app.types import Source

    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            srcs = [Source(s["number"], s["id"], s["doc_id"], s["title"], s["text"], 0.0)
                    for s in d["sources"]]
            out.append(PreferencePair(d["question"], srcs, d["chosen"], d["rejected"],
                                      d["origin"], d["group"], d["gold_numbers"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: not a preference pair ({type(e).__name__}: {e})") \
                from e
    return out


def synthetic_split(path: str, seed: int = 0) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) of a synthetic-pairs file ("" = none), SYNTHETIC_HELDOUT of its
    questions held out: the one split the reward model and DPO share."""
    return split_by_group(read_pairs(path), SYNTHETIC_HELDOUT, seed) if path else ([], [])


def split_by_group(pairs: list[PreferencePair], heldout_fraction: float, seed: int = 0
                   ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) with every group (question / focus / pmid) on one side only."""
    held = [p for p in pairs if _val_bucket(f"{seed}:{p.group}", heldout_fraction)]
    return [p for p in pairs if p not in held], held


def rubric_score(answer: str, sources: list, gold_numbers: list | None) -> dict:
    """The documented rubric that ranks generated answers when there is too little human
    feedback (also PPO's reward shaping and the policy evaluation):
      grounding  share of the answer's content words found in the sources it cites (all
                 sources when it cites none), 0..1;
      citation   +1 every citation is to a given source and there is one, 0 no citation,
                 -1 any citation to a source that was not given;
      refusal    (gold_numbers known) +1 refuses when no source answers, -1 refuses when one
                 does or answers when none does, 0 otherwise;
      length     -max(0, words - 60) / 60 (rambling), and -1 for an empty answer.
    total = sum of RUBRIC weight x term. A refusal's grounding counts as 1."""
    from rag_app.cite import support
    from rag_app.prompts import is_no_answer, parse_answer

    text, cited, dropped = parse_answer(answer, sources)
    refuses = is_no_answer(text)
    words = len(text.split())
    by_id = {s.id: s for s in sources}
    evidence = " ".join(by_id[c].text for c in cited) if cited else \
        " ".join(s.text for s in sources)
    body = _CITES.sub("", text)
    terms = {"grounding": 1.0 if refuses else (support(body, evidence) if body.strip() else 0.0),
             "citation": -1.0 if dropped else (1.0 if cited else 0.0),
             "refusal": 0.0,
             "length": -1.0 if not words else -max(0.0, words - TARGET_WORDS) / TARGET_WORDS}
    if refuses and gold_numbers is not None and not cited:
        terms["citation"] = 0.0
    if gold_numbers is not None:
        terms["refusal"] = (1.0 if refuses else -1.0) if not gold_numbers else \
            (-1.0 if refuses else 0.0)
    terms["total"] = sum(RUBRIC[k] * terms[k] for k in RUBRIC)
    return terms


def rubric_rating(total: float) -> float:
    """A rubric total mapped onto the app's 1-5 rating scale: 1 at the worst bounded total
    (-2.0: ungrounded, invalid citation, wrong refusal, 60 words too long), 5 at the best
    (+2.5), linear between, clipped. A proxy for human ratings, always reported as such."""
    lo, hi = -2.0, sum(w for k, w in RUBRIC.items() if k != "length")
    return 1.0 + 4.0 * min(max((total - lo) / (hi - lo), 0.0), 1.0)


_CITES = __import__("re").compile(r"\[\d+\]")


def synthetic_pairs(prompts: list[dict], generate, k: int = 4, margin: float = 0.25,
                    all_pairs: bool = False) -> list[PreferencePair]:
    """For each prompt {question, sources, gold_numbers, group}: `generate(prompt, k)` returns
    k sampled answers ranked by `rubric_score`; the best and the worst make a pair when their
    totals differ by >= margin, or with `all_pairs` every two answers that differ by >= margin
    (up to k(k-1)/2 pairs per prompt, as InstructGPT's rankings). Labelled synthetic:rubric."""
    out = []
    for p in prompts:
        answers = list(dict.fromkeys(a.strip() for a in generate(p, k) if a.strip()))
        if len(answers) < 2:
            continue
        scored = sorted((rubric_score(a, p["sources"], p["gold_numbers"])["total"], a)
                        for a in answers)
        cands = [(i, j) for j in range(len(scored)) for i in range(j)] if all_pairs else \
            [(0, len(scored) - 1)]
        for i, j in cands:
            if scored[j][0] - scored[i][0] >= margin:
                out.append(PreferencePair(p["question"], p["sources"], scored[j][1],
                                          scored[i][1], "synthetic:rubric", p.get("group", ""),
                                          list(p["gold_numbers"])))
    return out


def describe_preferences(pairs: list[PreferencePair]) -> dict:
    from collections import Counter

    return {"n_pairs": len(pairs), "by_origin": dict(Counter(p.origin for p in pairs)),
            "groups": len({p.group for p in pairs})}
