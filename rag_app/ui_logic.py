"""The Ask page's logic: retrieve once, stream the base and the tuned answer on the same sources,
render everything as escaped HTML (document and model text is data, never markup), and record
the interaction for ratings. app.py only wires these functions to components.
"""
from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import Iterator

from .cite import support
from .config import GenerationConfig, RetrievalConfig
from .feedback import FeedbackStore
from .index import index_path
from .models import ModelRegistry
from .pipeline import RagPipeline
from .present import DISCLAIMER
from .types import Answer, Chunk, Source

NO_TUNED_TEXT = "No tuned model yet — train one in the Fine-tune tab."
_SENT = re.compile(r"(?<=[.!?])\s+")
_CITE = re.compile(r"\[(\d+)\]")


class AppState:
    """What every page of one app process shares: the active index, the two pipelines (base and
    tuned generator, one retrieval), the feedback store. Models follow the registry: when the
    active relevance model or generator changes, cached models are dropped (no restart)."""

    def __init__(self, index: str = "default", model: str = "base",
                 generation: GenerationConfig = GenerationConfig(),
                 feedback: FeedbackStore | None = None, top_k: int = 5,
                 first_run_sources: list[str] | None = None, first_run_embedder=None):
        self.model = model
        self.first_run = None  # a BackgroundBuild while the default index is being built
        self._first_run_sources = first_run_sources
        self._first_run_embedder = first_run_embedder
        self.generation = generation
        self.top_k = top_k
        self.feedback = feedback or FeedbackStore()
        self._lock = threading.RLock()
        self._signature: tuple | None = None
        self.set_index(index)

    # -- pipelines
    def set_index(self, index: str) -> None:
        with self._lock:
            self.index_name = index
            self.base = RagPipeline(index, self.model, RetrievalConfig(top_k=self.top_k),
                                    self.generation, build_if_missing=False)
            self.tuned = RagPipeline(index, "tuned", RetrievalConfig(top_k=self.top_k),
                                     self.generation, build_if_missing=False)
            self._signature = self.registry_signature()
            if index == "default" and not (index_path(index) / "meta.json").exists() \
                    and self.first_run is None:
                from .embed import DEFAULT_EMBEDDER
                from .firstrun import BackgroundBuild

                self.first_run = BackgroundBuild(
                    index, self._first_run_sources,
                    self._first_run_embedder or DEFAULT_EMBEDDER).start()

    def first_run_text(self) -> str:
        """The first-run banner (empty once the index is built)."""
        fr = self.first_run
        return "" if fr is None or fr.succeeded else fr.status_text()

    def prepare(self) -> str | None:
        """Before answering. On the first run: answer from the keyword-only index while the dense
        one builds (returns the notice to show), and switch to the full index once it is on
        disk. Otherwise nothing to do."""
        fr = self.first_run
        if fr is None or self.index_name != fr.name:
            return None
        if fr.succeeded:
            with self._lock:
                if self.first_run is fr:
                    self.first_run = None
                    self.reload_index()  # hybrid from now on
            return None
        fr.ready.wait()
        if fr.provisional is None:
            raise ValueError(fr.status_text())
        with self._lock:
            for p in (self.base, self.tuned):
                if p._index is not fr.provisional:
                    p.use_index(fr.provisional, fr.embedder)
        return fr.status_text()

    def reload_index(self) -> None:
        """The index changed on disk (upload, rebuild): reload it, keep the generators."""
        with self._lock:
            for p in (self.base, self.tuned):
                p.reset(index=True, generator=False)

    @staticmethod
    def registry_signature() -> tuple:
        reg = ModelRegistry()
        return tuple((e or {}).get("name") for e in (reg.active("relevance"),
                                                   reg.active("generator")))

    def reload_models(self) -> None:
        """Drop cached reranker and generators so the next answer uses the active models."""
        with self._lock:
            self.base.reset(generator=self.model == "tuned")
            self.tuned.reset()
            self._signature = self.registry_signature()

    def sync_models(self) -> None:
        if self.registry_signature() != self._signature:
            self.reload_models()

    def tuned_available(self) -> bool:
        return ModelRegistry().active("generator") is not None

    def share_retrieval(self) -> None:
        """The tuned pipeline reuses the base pipeline's index, embedder and reranker."""
        self.tuned.share_retrieval_from(self.base)

    def reranker_label(self) -> str:
        rr = self.base.reranker
        ref = rr.model_ref
        if not ref:
            return "hybrid order, no relevance model (bi-encoder cosine gates weak evidence)"
        name = next((e["name"] for e in ModelRegistry().list("relevance") if e["path"] == ref),
                    ref)
        return f"relevance model {name} (weight {rr.weight:g}, fused with the hybrid scores)"

    # -- the Ask event
    def ask(self, question: str, top_k: int = 5) -> Iterator[tuple]:
        """Yields (status, sources, base answer, tuned answer, interaction id) as HTML."""
        self.sync_models()
        notice = self.prepare()
        with self._lock:
            base, tuned = self.base, self.tuned
        q = base.check_question(question)
        timings: dict = {}
        chunks = base.retrieve(q, int(top_k), timings)
        self.share_retrieval()
        weak = base.is_weak(chunks)
        status = status_html(self.index_name, self.reranker_label(), len(chunks), timings, weak)
        if notice:
            status = f'<div class="notice" id="first-run">⏳ {html.escape(notice)}</div>' + status
        pending = '<div class="ans pending">waiting…</div>'
        has_tuned = self.tuned_available()
        tuned_html = pending if has_tuned else notice_html(NO_TUNED_TEXT)
        yield status, sources_html(to_sources(chunks), []), pending, tuned_html, None
        # the interaction is stored as soon as the base answer is complete, and its id goes
        # out with that answer's first complete rendering: a rating clicked at once never
        # finds "no question yet" (the tuned answer is added when it is complete)
        base_final = None
        for base_final, html_, done in _stream(base, q, chunks):
            if not done:
                yield status, sources_html(base_final.sources, []), html_, tuned_html, None
        iid = self.feedback.record(q, base_final.sources, base_final, None)
        yield (status, sources_html(base_final.sources, [base_final]), answer_html(base_final),
               tuned_html, iid)
        tuned_final = None
        if has_tuned:
            for tuned_final, html_, done in _stream(tuned, q, chunks):
                if not done:
                    yield status, sources_html(base_final.sources, [base_final]), \
                        answer_html(base_final), html_, iid
            self.feedback.add_answer(iid, "tuned", tuned_final)
        answers = [a for a in (base_final, tuned_final) if a is not None]
        yield (status, sources_html(base_final.sources, answers), answer_html(base_final),
               answer_html(tuned_final) if tuned_final else tuned_html, iid)


def to_sources(chunks: list[Chunk]) -> list[Source]:
    from .pipeline import to_sources as _to_sources

    return _to_sources(chunks)


def _stream(pipe: RagPipeline, q: str, chunks: list[Chunk]
            ) -> Iterator[tuple[Answer, str, bool]]:
    """(answer so far, its HTML, done): partial renderings, then the complete one."""
    t0 = time.perf_counter()
    final = None
    for final in pipe.stream(q, chunks=chunks):
        yield final, answer_html(final, partial=True), False
    final.timings_ms["wall"] = (time.perf_counter() - t0) * 1000
    yield final, answer_html(final), True


# ---------- rendering (everything escaped) ----------
def answer_html(ans: Answer, partial: bool = False) -> str:
    """The answer with [n] linked to its source card, a weak-evidence banner and latency."""
    n = len(ans.sources)
    text = html.escape(ans.text)
    text = _CITE.sub(lambda m: (f'<a class="cite" href="#src-{m.group(1)}">[{m.group(1)}]</a>'
                                if 1 <= int(m.group(1)) <= n else m.group(0)), text)
    text = text.replace("\n", "<br>")
    weak = ('<div class="weak">⚠️ Weak evidence: the retrieved sources do not clearly answer '
            'this question.</div>' if ans.weak_evidence else "")
    t = ans.timings_ms
    if partial:
        foot = "generating…" + (f" first token {t['first_token'] / 1000:.1f} s"
                                if "first_token" in t else "")
    else:
        parts = [f"model <b>{html.escape(ans.model)}</b>"]
        if "first_token" in t:
            parts.append(f"first token {t['first_token'] / 1000:.1f} s")
        total = t.get("wall") or t.get("total")
        if total is not None:
            parts.append(f"latency {total / 1000:.1f} s")
        foot = " · ".join(parts)
    return (f'{weak}<div class="ans" data-model="{html.escape(ans.model)}">{text}'
            f'{"▌" if partial else ""}</div><div class="meta"><small>{foot}</small></div>')


def notice_html(text: str) -> str:
    return f'<div class="ans notice"><i>{html.escape(text)}</i></div>'


def status_html(index: str, reranker: str, n: int, timings: dict, weak: bool) -> str:
    ms = timings.get("retrieve", 0) + timings.get("rerank", 0)
    s = (f"<small>index <b>{html.escape(index)}</b> · {n} sources · reranker "
         f"<b>{html.escape(reranker)}</b> · retrieval {ms:.0f} ms</small>")
    if weak:
        s += ('<div class="weak">⚠️ Weak evidence: no source clearly matches the question, so '
              'no answer is generated. Rephrase it or add documents in the Index tab.</div>')
    return s


def supporting_sentences(answers: list[Answer]) -> dict[int, set[int]]:
    """{source number: indexes of its sentences that best support a citing answer sentence}."""
    out: dict[int, set[int]] = {}
    for ans in answers:
        if ans is None or ans.weak_evidence:
            continue
        by_n = {s.number: _SENT.split(s.text.strip()) for s in ans.sources}
        for sent in _SENT.split(ans.text):
            numbers = {int(x) for x in _CITE.findall(sent)} & set(by_n)
            claim = _CITE.sub("", sent)
            for n in numbers:
                scores = [support(claim, s) for s in by_n[n]]
                best = max(range(len(scores)), key=scores.__getitem__, default=None)
                if best is not None and scores[best] > 0:
                    out.setdefault(n, set()).add(best)
    return out


def sources_html(sources: list[Source], answers: list[Answer], chars: int = 1500) -> str:
    """Source cards: title, id, score, which answers cite it; supporting sentences marked."""
    if not sources:
        return "<i>No sources retrieved.</i>"
    marks = supporting_sentences(answers)
    cards = []
    for s in sources:
        by = [a.model for a in answers if a is not None and s.id in a.citations]
        sents = _SENT.split(s.text.strip()[:chars])
        body = " ".join(f"<mark>{html.escape(x)}</mark>" if i in marks.get(s.number, ())
                        else html.escape(x) for i, x in enumerate(sents))
        cited = f" · cited by {html.escape(', '.join(by))}" if by else ""
        cards.append(
            f'<div class="src" id="src-{s.number}"><b>[{s.number}] {html.escape(s.title)}</b> '
            f'<small>({html.escape(s.id)} · score {s.score:.3f}{cited})</small>'
            f'<p>{body}{"…" if len(s.text) > chars else ""}</p></div>')
    return "\n".join(cards)


def disclaimer_html() -> str:
    return f'<p class="disclaimer"><small>⚕️ {html.escape(DISCLAIMER)}</small></p>'


def rate(store: FeedbackStore, interaction: int | None, which: str, rating) -> str:
    if interaction is None:
        raise ValueError("ask a question first, then rate its answers")
    row = store.rate(interaction, which.lower(), rating)
    return (f"Saved: {which} answer rated {row[f'{which.lower()}_rating']}/5 "
            f"(question #{row['id']}).")


def prefer(store: FeedbackStore, interaction: int | None, choice: str) -> str:
    if interaction is None:
        raise ValueError("ask a question first, then pick the better answer")
    row = store.prefer(interaction, choice.lower())
    return f"Saved: preferred {row['preference']} (question #{row['id']})."


def feedback_summary(store: FeedbackStore) -> str:
    s = store.summary()
    return (f"{s['n']} answered questions · {s['ratings']} ratings (base avg "
            f"{s['base_avg']:.2f}, tuned avg {s['tuned_avg']:.2f}) · preferences: base "
            f"{s['prefer_base']}, tuned {s['prefer_tuned']}")
