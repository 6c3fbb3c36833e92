"""Paraphrase augmentation for instruction tuning: the answer instruction (the reminder after the
question, prompts.ANSWER_INSTRUCTION) and light question rewrites.

The robustness evaluation measures how the tuned model copes with phrasings it never saw, so its
5 instruction phrasings (EVAL_INSTRUCTIONS) and question templates (EVAL_QUESTION_TEMPLATES)
are kept apart from the training ones; `check_disjoint()` (and a test) enforce it.
"""
from __future__ import annotations

import random
import re
from dataclasses import replace

from rag_app.prompts import ANSWER_INSTRUCTION, render_prompt

# Training paraphrases of ANSWER_INSTRUCTION (the original is used for all other examples).
TRAIN_INSTRUCTIONS = (
    "Using only the sources above, answer in 2 to 4 sentences and cite them as [1], [2].",
    "Reply briefly (2-4 sentences) from the numbered sources only; cite each claim like [1].",
    "Give a short answer based solely on the sources above, with citations such as [2].",
    "Answer concisely from the sources listed above and mark the supporting source as [n].",
    "Base your 2 to 4 sentence answer on the sources only, citing them in square brackets.",
    "Keep it to a few sentences, use nothing but the sources, and cite them like [1] or [3].",
)

# Held out for the robustness evaluation: NEVER used in training.
EVAL_INSTRUCTIONS = (
    "Respond in two to four sentences, relying exclusively on the passages provided, "
    "with bracketed source numbers.",
    "Write a compact answer grounded in the listed documents; reference them by number in "
    "brackets.",
    "Summarise what the sources say about this in a few sentences, citing [number] after "
    "each claim.",
    "Only the material above may be used. Be brief and put the source number in brackets.",
    "Provide a short, referenced reply drawn from the excerpts above (e.g. [1]).",
)

# Light question rewrites ("{q}" = the question without its final "?" when it ends a sentence).
TRAIN_QUESTION_TEMPLATES = (
    "{q}?",
    "Please answer: {q}?",
    "I would like to know: {q}?",
    "Question from a patient: {q}?",
)
EVAL_QUESTION_TEMPLATES = (
    "Could you explain {q}?",
    "Quick question - {q}?",
    "My doctor mentioned this. {q}?",
    "Help me understand: {q}?",
    "Tell me, {q}?",
)


def check_disjoint() -> None:
    """The evaluation phrasings must never appear among the training ones (or be the default)."""
    train_i = {_norm(x) for x in TRAIN_INSTRUCTIONS} | {_norm(ANSWER_INSTRUCTION)}
    train_q = {_norm(x) for x in TRAIN_QUESTION_TEMPLATES}
    if len(EVAL_INSTRUCTIONS) != 5 or train_i & {_norm(x) for x in EVAL_INSTRUCTIONS}:
        raise ValueError("EVAL_INSTRUCTIONS must be 5 phrasings disjoint from the training ones")
    if train_q & {_norm(x) for x in EVAL_QUESTION_TEMPLATES}:
        raise ValueError("EVAL_QUESTION_TEMPLATES overlap TRAIN_QUESTION_TEMPLATES")


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9\[\]{} ]", " ", s.lower()).split())


def clean_question(question: str) -> str:
    """MedQuAD's templated "What is (are) X ?" -> "What is X" (no final "?")."""
    q = re.sub(r"\s*\((are|is|s|es)\)", "", question.strip())
    return re.sub(r"\s*\?+\s*$", "", q)


def paraphrase_question(question: str, template: str) -> str:
    q = clean_question(question)
    if template.startswith("{q}"):
        return template.format(q=q)
    return template.format(q=q[:1].lower() + q[1:] if q[:2] != q[:2].upper() else q)


def with_instruction(prompt: str, instruction: str) -> str:
    """The rendered prompt with ANSWER_INSTRUCTION replaced by `instruction` (it occurs once,
    right after the question; prompts without sources have none and are returned unchanged)."""
    if prompt.count(ANSWER_INSTRUCTION) != 1:
        return prompt
    return prompt.replace(ANSWER_INSTRUCTION, instruction)


def augment_examples(examples: list, tokenizer, ratio: float = 0.3,
                     max_prompt_tokens: int | None = None, seed: int = 0,
                     instructions: tuple[str, ...] = TRAIN_INSTRUCTIONS,
                     question_templates: tuple[str, ...] = TRAIN_QUESTION_TEMPLATES,
                     mode: str = "replace") -> list:
    """Paraphrase a `ratio` share of the examples (instruction, question or both, chosen at
    random). mode="replace" rewrites them in place (same count); "add" appends the rewrites as
    extra examples. Only the TRAINING phrasings are accepted here."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"augment_ratio={ratio!r} is invalid: use 0..1")
    if mode not in ("replace", "add"):
        raise ValueError(f"augment mode={mode!r} is invalid: use replace or add")
    check_disjoint()
    held = {_norm(x) for x in EVAL_INSTRUCTIONS + EVAL_QUESTION_TEMPLATES}
    if any(_norm(x) in held for x in instructions + question_templates):
        raise ValueError("an evaluation phrasing was passed for training: use TRAIN_* phrasings")
    rng = random.Random(seed)
    idx = sorted(rng.sample(range(len(examples)), round(ratio * len(examples))))
    out = list(examples)
    for i in idx:
        ex = examples[i]
        what = rng.choice(("instruction", "question", "both"))
        question, tags = ex.question, []
        if what in ("question", "both"):
            template = rng.choice(question_templates)
            question = paraphrase_question(ex.question, template)
            tags.append(f"q{question_templates.index(template)}")
        prompt = render_prompt(tokenizer, question, ex.sources, max_prompt_tokens)
        if what in ("instruction", "both"):
            instr = rng.choice(instructions)
            prompt = with_instruction(prompt, instr)
            tags.append(f"i{instructions.index(instr)}")
        new = replace(ex, question=question, prompt=prompt, augment="+".join(tags),
                      prompt_tokens=len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        if mode == "replace":
            out[i] = new
        else:
            out.append(new)
    return out
