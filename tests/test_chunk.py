from rag_app.chunk import chunk_documents
from rag_app.config import ChunkConfig
from rag_app.types import Document

import pytest


def test_chunks_fit_the_window_overlap_and_keep_offsets(embedder):
    tok = embedder.tokenizer
    text = " ".join(f"word{i} diabetes insulin glucose." for i in range(400))
    doc = Document("d1", text, "Diabetes")
    cfg = ChunkConfig(size=64, overlap=16)
    chunks = chunk_documents([doc, Document("d2", "Short note.", "T")], tok, cfg)
    long = [c for c in chunks if c.doc_id == "d1"]
    assert len(long) > 5
    for i, c in enumerate(long):
        assert c.id == f"d1#{i}" and c.title == "Diabetes"
        assert text[c.start:c.end] == c.text
        assert len(tok(c.text)["input_ids"]) <= cfg.size + 2  # re-tokenising may merge 1-2
    for a, b in zip(long, long[1:]):
        assert b.start < a.end  # overlap
    assert long[0].start == 0 and long[-1].end == len(text)
    short = [c for c in chunks if c.doc_id == "d2"]
    assert len(short) == 1 and short[0].text == "Short note."


def test_bad_chunk_config_names_the_parameter():
    with pytest.raises(ValueError, match="overlap"):
        ChunkConfig(size=64, overlap=40)
    with pytest.raises(ValueError, match="chunk size"):
        ChunkConfig(size=4)
