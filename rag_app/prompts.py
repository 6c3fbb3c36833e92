"""THE prompt template and answer parser, shared by serving (generate.py) and training.

The generator is trained on exactly the prompt it is served with: build chat messages with
`build_messages`, render them with `render_prompt`, and clean the model's output with
`parse_answer`.
"""
from __future__ import annotations

import logging
import re

from rag_app.types import Source

log = logging.getLogger(__name__)

NO_ANSWER = "The provided sources do not answer this question."

SYSTEM_PROMPT = (
    "You are a medical information assistant. Answer the question using ONLY the numbered "
    "sources given by the user, never outside knowledge. Answer concisely in 2 to 4 sentences. "
    "After each claim, cite the source that supports it with its number in square brackets, "
    "like [1] or [2]. If the sources do not contain the answer, reply exactly: " + NO_ANSWER
)

# A reminder placed after the question: small models follow instructions close to the answer.
ANSWER_INSTRUCTION = "Answer in 2 to 4 sentences using only the sources above, citing them as [1], [2]."

_TRUNCATION_MARK = " ..."
_HEAD_TOKENS = 48  # every truncated source keeps at least this many tokens (first pass)
_MIN_HEAD_TOKENS = 8  # last-resort floor when question + heads alone exceed the budget


def _check_numbers(sources: list[Source]) -> None:
    for i, s in enumerate(sources, start=1):
        if s.number != i:
            raise ValueError(f"source number {s.number} (chunk {s.id!r}) is invalid: sources "
                             f"must be numbered 1..{len(sources)} in order, expected {i}")


def format_sources(sources: list[Source]) -> str:
    """Render sources as "[n] Title\\ntext" blocks separated by blank lines."""
    _check_numbers(sources)
    blocks = []
    for s in sources:
        title = s.title.strip() or s.doc_id
        blocks.append(f"[{s.number}] {title}\n{s.text.strip()}")
    return "\n\n".join(blocks)


def build_messages(question: str, sources: list[Source]) -> list[dict]:
    """Chat messages: an explicit system prompt, then the sources and the question."""
    question = question.strip()
    if not question:
        raise ValueError("question='' is invalid: ask a non-empty question")
    if sources:
        user = (f"Sources:\n{format_sources(sources)}\n\n"
                f"Question: {question}\n\n{ANSWER_INSTRUCTION}")
    else:
        user = f"Sources: (none)\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _render(tokenizer, question: str, sources: list[Source]) -> str:
    return tokenizer.apply_chat_template(build_messages(question, sources), tokenize=False,
                                         add_generation_prompt=True)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(tokenizer, question: str, sources: list[Source],
                  max_prompt_tokens: int | None = None) -> str:
    """The prompt string the model sees; source texts are shortened to fit max_prompt_tokens.

    Truncation cuts the longest source first (the lowest-ranked among equals) and keeps a head
    of every source, so the numbering and the titles never change.
    """
    prompt = _render(tokenizer, question, sources)
    if max_prompt_tokens is None or not sources:
        return prompt
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} is invalid: use >= 1")
    overflow = _n_tokens(tokenizer, prompt) - max_prompt_tokens
    if overflow <= 0:
        return prompt

    ids = [tokenizer(s.text.strip(), add_special_tokens=False)["input_ids"] for s in sources]
    keep = [len(x) for x in ids]
    for floor in (_HEAD_TOKENS, _MIN_HEAD_TOKENS):
        for _ in range(8):  # re-tokenising a cut text may differ by a few tokens: iterate
            if not _shrink(keep, overflow, floor):
                break
            cut = [_cut_source(tokenizer, s, x, k) for s, x, k in zip(sources, ids, keep)]
            prompt = _render(tokenizer, question, cut)
            overflow = _n_tokens(tokenizer, prompt) - max_prompt_tokens
            if overflow <= 0:
                return prompt
    log.warning("prompt still %d tokens over max_prompt_tokens=%d after truncating %d sources",
                overflow, max_prompt_tokens, len(sources))
    return prompt


def _shrink(keep: list[int], overflow: int, floor: int) -> bool:
    """Remove `overflow` (+ margin) tokens from the longest entries of `keep`, not below floor.

    Returns False when nothing could be removed.
    """
    need = overflow + 2  # margin for the truncation mark
    removed = 0
    while removed < need:
        longest = max(range(len(keep)), key=lambda i: (keep[i], i))  # ties: lowest-ranked
        if keep[longest] <= floor:
            break
        others = [k for i, k in enumerate(keep) if i != longest and k < keep[longest]]
        target = max([floor] + others)  # cut down to the next-longest source, at most
        step = min(keep[longest] - target, need - removed) or 1
        keep[longest] -= step
        removed += step
    return removed > 0


def _cut_source(tokenizer, s: Source, ids: list[int], keep: int) -> Source:
    if keep >= len(ids):
        return s
    text = tokenizer.decode(ids[:keep], skip_special_tokens=True).rstrip() + _TRUNCATION_MARK
    return Source(s.number, s.id, s.doc_id, s.title, text, s.score)


# [1]  [1, 2]  [1;2]  [1-3]  [1–3]  [Source 1]  [sources 1, 2]
_NUM = r"\d+(?:\s*[-\u2013]\s*\d+)?"
CITATION_RE = re.compile(rf"\[\s*(?:sources?\s*)?({_NUM}(?:\s*(?:,|;|and)\s*(?:source\s*)?{_NUM})*)\s*\]",
                         re.IGNORECASE)
_MAX_RANGE = 50


def _expand(group: str) -> list[int]:
    """"1, 3-4" -> [1, 3, 4] (ranges longer than 50 keep only their endpoints)."""
    numbers: list[int] = []
    for part in re.split(r"\s*(?:,|;|and)\s*", group, flags=re.IGNORECASE):
        part = re.sub(r"(?i)^source\s*", "", part.strip())
        if not part:
            continue
        bounds = [int(x) for x in re.split(r"\s*[-\u2013]\s*", part)]
        lo, hi = bounds[0], bounds[-1]
        if len(bounds) == 2 and lo <= hi and hi - lo <= _MAX_RANGE:
            numbers.extend(range(lo, hi + 1))
        else:
            numbers.extend(bounds)
    return numbers


def _tidy(text: str) -> str:
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([.,;:!?)])", r"\1", text)
    text = re.sub(r"\(\s*\)", "", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = "\n".join(line.strip() for line in text.splitlines())
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def parse_answer(text: str, sources: list[Source]) -> tuple[str, list[str], list[int]]:
    """Clean a generated answer.

    Returns (text, cited chunk ids in order of first citation, dropped citation numbers).
    Valid citations are rewritten as "[1][2]"; numbers outside 1..len(sources) are removed
    from the text and reported (each once, in order of appearance).
    """
    by_number = {i: s for i, s in enumerate(sources, start=1)}
    cited: list[str] = []
    dropped: list[int] = []

    def replace(match: re.Match) -> str:
        valid = []
        for n in _expand(match.group(1)):
            if n in by_number:
                if n not in valid:
                    valid.append(n)
                if by_number[n].id not in cited:
                    cited.append(by_number[n].id)
            elif n not in dropped:
                dropped.append(n)
        return "".join(f"[{n}]" for n in valid)

    cleaned = CITATION_RE.sub(replace, text)
    return _tidy(cleaned), cited, dropped


_NO_ANSWER_RE = re.compile(
    r"(sources?|context|passages?|documents?)\s+(provided\s+)?"
    r"(do|does|did)\s*(not|n't|n’t)\s+(answer|contain|provide|mention|address|include|say)"
    r"|(can ?not|can't|can’t|could ?not|couldn't|couldn’t|unable to)\s+(answer|find)\b.{0,40}"
    r"\b(sources?|context|passages?)"
    r"|no (relevant )?information (about|on)\b.{0,60}\b(in|from) the (provided )?(sources?|context)",
    re.IGNORECASE | re.DOTALL)


def is_no_answer(text: str) -> bool:
    """True when the text says the sources do not answer the question (NO_ANSWER or a variant)."""
    norm = " ".join(text.split())
    if NO_ANSWER.lower().rstrip(".") in norm.lower():
        return True
    return bool(_NO_ANSWER_RE.search(norm))




def trim_generation(text: str) -> str:
    """Drop sentences that repeat an earlier one (small models loop) and an unfinished last
    sentence cut off by the token limit, when at least one complete sentence precedes it."""
    parts = [p for p in re.split(r"(?<=[.!?])\s+|(?<=[.!?]\])\s+", text.strip()) if p]
    seen, kept = set(), []
    for p in parts:
        key = re.sub(r"\W+", " ", re.sub(r"\[\d+\]", "", p)).strip().lower()
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(p)
    if len(kept) > 1 and not re.search(r"[.!?](\s*\[\d+\])*[\"')\]]*$", kept[-1]):
        kept.pop()
    return " ".join(kept)
