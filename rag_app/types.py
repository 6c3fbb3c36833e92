"""The only objects passed between pipeline stages."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    """One source document (a passage, a file, a record of a jsonl file)."""

    id: str
    text: str
    title: str = ""
    source: str = ""  # where it came from (file path or dataset name)
    metadata: dict = field(default_factory=dict)


@dataclass
class Chunk:
    """A piece of a Document, the unit that is embedded, indexed and retrieved."""

    id: str  # "<doc_id>#<n>"
    doc_id: str
    text: str
    title: str = ""
    start: int = 0  # character offsets in the parent document's text
    end: int = 0
    score: float = 0.0  # the score of the stage that produced this copy
    scores: dict = field(default_factory=dict)  # per-stage scores: dense, bm25, rrf, rerank

    def with_score(self, score: float, stage: str) -> "Chunk":
        scores = dict(self.scores)
        scores[stage] = float(score)
        return Chunk(self.id, self.doc_id, self.text, self.title, self.start, self.end,
                     float(score), scores)


@dataclass
class Source:
    """A chunk as shown to the generator and the user: numbered [n] in the prompt."""

    number: int
    id: str  # chunk id
    doc_id: str
    title: str
    text: str
    score: float


@dataclass
class Answer:
    question: str
    text: str  # the model's answer, cleaned (invalid citations removed)
    sources: list[Source]
    citations: list[str] = field(default_factory=list)  # chunk ids actually cited, in order
    model: str = ""
    weak_evidence: bool = False
    raw_text: str = ""  # the model's text before parsing
    dropped_citations: list[int] = field(default_factory=list)  # [n] not among the sources
    timings_ms: dict = field(default_factory=dict)
    # who placed the citations: "model", "attributed" (post-hoc, rag_app/cite.py) or "none"
    citation_source: str = "none"
    unsupported_sentences: int = 0  # sentences no source supports (post-hoc check)

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "answer": self.text,
            "sources": [{"id": s.id, "doc_id": s.doc_id, "title": s.title, "score": s.score,
                         "text": s.text, "number": s.number} for s in self.sources],
            "citations": self.citations,
            "weak_evidence": self.weak_evidence,
            "citation_source": self.citation_source,
            "unsupported_sentences": self.unsupported_sentences,
            "model": self.model,
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
        }
