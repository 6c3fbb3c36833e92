"""End to end with the real packaged models on a real slice of the corpus."""
import pytest

from rag_app.config import GenerationConfig
from rag_app.pipeline import WEAK_EVIDENCE_TEXT, RagPipeline


@pytest.fixture(scope="module")
def pipe(small_index):
    return RagPipeline("small", "base", generation=GenerationConfig(max_new_tokens=60),
                       build_if_missing=False).warm_up()


@pytest.mark.slow
def test_answers_a_medical_question_with_a_valid_citation(pipe):
    ans = pipe.answer("What are the symptoms of gout?")
    assert not ans.weak_evidence
    assert ans.sources and ans.sources[0].title == "Gout"
    assert ans.text.strip()
    ids = {s.id for s in ans.sources}
    assert ans.citations, f"no citation in: {ans.raw_text!r}"
    assert set(ans.citations) <= ids
    assert {"retrieve", "rerank", "first_token", "generate", "total"} <= set(ans.timings_ms)
    d = ans.to_dict()
    assert {"question", "answer", "sources", "model", "timings_ms"} <= set(d)
    assert {"id", "title", "score", "text"} <= set(d["sources"][0])


@pytest.mark.slow
def test_streaming_grows_and_ends_with_the_parsed_answer(pipe):
    parts = list(pipe.stream("How is glaucoma treated?"))
    assert len(parts) >= 3
    assert len(parts[1].text) >= len(parts[0].text)
    assert parts[-1].text == pipe.answer("How is glaucoma treated?").text


def test_off_topic_question_is_weak_evidence_and_not_guessed(pipe):
    ans = pipe.answer("Who won the football world cup in 1998?")
    assert ans.weak_evidence
    assert ans.text == WEAK_EVIDENCE_TEXT
    assert ans.citations == []


def test_without_a_classifier_the_hybrid_order_is_kept_and_scored_by_cosine(pipe):
    from rag_app.rerank import Reranker

    q = "symptoms of shingles"
    chunks = pipe.retrieve(q, k=4)
    cands = pipe.retriever.search(q, pipe.retrieval.candidates)
    assert [c.id for c in chunks] == [c.id for c in cands[:4]]
    assert "rerank" in chunks[0].scores and chunks[0].title == "Shingles"
    qvec = pipe.embedder.encode([q])[0]
    cos = {c.id: float(v) for c, v in zip(cands, pipe.reranker.score(q, cands, qvec))}
    assert [c.score for c in chunks] == pytest.approx([cos[c.id] for c in chunks], abs=1e-5)
    by_cosine = Reranker(pipe.index, pipe.embedder, None, reorder=True).rerank(q, cands, 4)
    assert [c.score for c in by_cosine] == pytest.approx(sorted(cos.values(), reverse=True)[:4],
                                                         abs=1e-5)
    assert pipe.reranker.kind == "hybrid order" and not pipe.is_weak(chunks)


@pytest.mark.parametrize("q,msg", [("", "empty"), ("   \n", "empty"),
                                   ("x" * 100_000, "100,000 characters")])
def test_bad_questions_are_refused_clearly(pipe, q, msg):
    with pytest.raises(ValueError, match=msg):
        pipe.answer(q)


def test_missing_index_is_a_clear_error(small_index):
    with pytest.raises(ValueError, match="rag index build --name absent"):
        RagPipeline("absent", build_if_missing=False).retrieve("gout")
