"""Turning Answers into what people read (Markdown for the UI). No model code here."""
from __future__ import annotations

import html
import re

from .types import Answer

DISCLAIMER = ("This tool summarises published medical information and is not medical advice. "
              "For decisions about your health, consult a qualified clinician.")


def answer_markdown(ans: Answer) -> str:
    """The answer with each [n] linked to its source card below."""
    text = html.escape(ans.text)
    n_sources = len(ans.sources)

    def link(m: re.Match) -> str:
        n = int(m.group(1))
        return f"[[{n}]](#source-{n})" if 1 <= n <= n_sources else m.group(0)

    text = re.sub(r"\[(\d+)\]", link, text)
    if ans.weak_evidence:
        text = f"**Weak evidence.** {text}"
    timing = ans.timings_ms.get("total") or ans.timings_ms.get("generate")
    footer = f"\n\n<sub>{html.escape(ans.model)}" + (f" · {timing / 1000:.1f} s" if timing else "") \
        + "</sub>"
    return text + footer


def sources_markdown(ans: Answer, snippet_chars: int = 600) -> str:
    if not ans.sources:
        return "_No sources retrieved._"
    parts = []
    for s in ans.sources:
        cited = " · **cited**" if s.id in ans.citations else ""
        body = html.escape(s.text[:snippet_chars]) + ("…" if len(s.text) > snippet_chars else "")
        parts.append(f'<a id="source-{s.number}"></a>**[{s.number}] {html.escape(s.title)}**'
                     f" <sub>({html.escape(s.id)}, score {s.score:.3f}{cited})</sub>\n\n"
                     f"> {body}")
    return "\n\n".join(parts)
