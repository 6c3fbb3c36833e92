import json

import pytest

from rag_app.config import RetrievalConfig
from rag_app.evaluate import retrieval_metrics, run_retrieval
from rag_app.datasets import RetrievalDataset
from rag_app.retrieve import Retriever

from conftest import DATA


def _dataset():
    rows = [json.loads(line) for line in (DATA / "corpus.jsonl").read_text().splitlines()]
    queries, qrels = {}, {}
    for r in rows:
        if r.get("question"):
            qid = f"{r['title']}|{r['question']}"
            queries[qid] = r["question"]
            qrels.setdefault(qid, set()).add(r["id"])
    return RetrievalDataset("slice", queries, qrels)


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_each_mode_finds_the_right_topic(small_index, embedder, mode):
    r = Retriever(small_index, embedder, RetrievalConfig(mode=mode))
    hits = r.search("What are the symptoms of gout?", k=3)
    assert len(hits) == 3
    assert hits[0].title == "Gout"
    assert mode in hits[0].scores


def test_hybrid_is_at_least_as_good_as_the_weaker_retriever(small_index, embedder):
    ds = _dataset()
    r = Retriever(small_index, embedder, RetrievalConfig(candidates=100))
    ndcg = {m: retrieval_metrics(run_retrieval(r, ds, m, k=20), ds.qrels)["ndcg@10"]
            for m in ("dense", "bm25", "hybrid")}
    assert ndcg["hybrid"] >= min(ndcg["dense"], ndcg["bm25"])
    assert ndcg["hybrid"] > 0.2


def test_query_with_no_known_words_returns_no_bm25_hits(small_index, embedder):
    r = Retriever(small_index, embedder)
    assert r.search("zzqx qqvv", 3, mode="bm25") == []
    assert len(r.search("zzqx qqvv", 3, mode="hybrid")) == 3  # dense still answers


def test_bad_mode_is_refused(small_index, embedder):
    with pytest.raises(ValueError, match="retrieval mode"):
        Retriever(small_index, embedder).search("gout", 3, mode="magic")
