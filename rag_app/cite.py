"""Post-hoc citation: attach [n] to answer sentences that a source supports.

Small generators often answer from the sources without writing [n]. Rather than leave such an
answer uncited (or trust citations blindly), each uncited sentence is matched to the source
that shares most of its content words; it gets that source's number when the overlap reaches
`min_support`. Sentences no source supports stay uncited and are counted as unsupported.
"""
from __future__ import annotations

import re

from .types import Source

_STOP = set("""a an the and or but if of to in on at by for with from as is are was were be been
being it its this that these those there their they them he she his her you your we our i me my
can could may might must should would will shall do does did not no nor so than too very also
into out over under about after before between during through while which who whom what when
where why how all any both each few more most other some such only own same just than then""".split())
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_CITE = re.compile(r"\[\d+\]")


def _terms(text: str) -> set[str]:
    return {w[:6] for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP and len(w) > 2}


def support(sentence: str, source_text: str) -> float:
    """Share of the sentence's content words (crudely stemmed) found in the source."""
    words = _terms(sentence)
    return len(words & _terms(source_text)) / len(words) if words else 0.0


def attribute(text: str, sources: list[Source], min_support: float = 0.6
              ) -> tuple[str, list[str], int]:
    """Returns (text with [n] added, cited chunk ids in order, number of unsupported sentences).
    Sentences that already cite something are left as they are."""
    if not text.strip() or not sources:
        return text, [], 0
    source_terms = [_terms(f"{s.title} {s.text}") for s in sources]
    out, cited, unsupported = [], [], 0
    for sent in _SENT.split(text.strip()):
        if _CITE.search(sent) or len(_terms(sent)) < 3:
            out.append(sent)
            continue
        words = _terms(sent)
        scores = [len(words & st) / len(words) for st in source_terms]
        best = max(range(len(sources)), key=lambda i: scores[i])
        if scores[best] >= min_support:
            m = re.match(r"^(.*?)([.!?]*)$", sent, flags=re.S)
            sent = f"{m.group(1).rstrip()} [{sources[best].number}]{m.group(2)}"
            if sources[best].id not in cited:
                cited.append(sources[best].id)
        else:
            unsupported += 1
        out.append(sent)
    return " ".join(out), cited, unsupported
