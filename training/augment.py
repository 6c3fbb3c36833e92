"""Paraphrase augmentation for instruction tuning: the answer instruction (the reminder after the
question, prompts.ANSWER_INSTRUCTION) and light question rewrites. Besides the hand-written
TRAIN_INSTRUCTIONS, `generated_instructions()` has a generator write more (sampled, filtered).

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


def check_training_phrasings(phrasings: tuple[str, ...]) -> None:
    """check_disjoint(), and refuse any of `phrasings` that is an evaluation phrasing."""
    check_disjoint()
    held = {_norm(x) for x in EVAL_INSTRUCTIONS + EVAL_QUESTION_TEMPLATES}
    if any(_norm(x) in held for x in phrasings):
        raise ValueError("an evaluation phrasing was passed for training: use TRAIN_* phrasings")


def augment_examples(examples: list, tokenizer, ratio: float = 0.3,
                     max_prompt_tokens: int | None = None, seed: int = 0,
                     instructions: tuple[str, ...] = TRAIN_INSTRUCTIONS,
                     question_templates: tuple[str, ...] = TRAIN_QUESTION_TEMPLATES,
                     mode: str = "replace") -> list:
    """Paraphrase a `ratio` share of the examples (instruction, question or both, chosen at
    random). mode="replace" rewrites them in place (same count); "add" appends the rewrites as
    extra examples. Only the TRAINING phrasings are accepted here."""
    from .tasks import n_tokens

    if not 0 <= ratio <= 1:
        raise ValueError(f"augment_ratio={ratio!r} is invalid: use 0..1")
    if mode not in ("replace", "add"):
        raise ValueError(f"augment mode={mode!r} is invalid: use replace or add")
    check_training_phrasings(instructions + question_templates)
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
                      prompt_tokens=n_tokens(tokenizer, prompt))
        if mode == "replace":
            out[i] = new
        else:
            out.append(new)
    return out


def noise_sentences(n: int, seed: int = 0, min_words: int = 6, max_words: int = 30) -> list[str]:
    """`n` sentences of running prose from the general-domain books (../shared/data/general):
    text that is no answer instruction, for `noise_instructions`. Seeded."""
    from .lmdata import general_documents

    pool = []
    for doc in general_documents():
        for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.text.split())):
            if min_words <= len(s.split()) <= max_words and s[:1].isupper() \
                    and not re.search(r'["\u201c\u201d\[\]]|\b(Mrs?|Dr|St)\.$', s):
                pool.append(s)
    if len(pool) < n:
        raise ValueError(f"the general-domain books hold {len(pool)} usable sentences; "
                         f"{n} are needed")
    return random.Random(seed).sample(pool, n)


def noise_instructions(examples: list, tokenizer, share: float, seed: int = 0,
                       max_prompt_tokens: int | None = None) -> list:
    """Instruction noise: in a `share` of the examples that carry an answer instruction, the
    instruction slot (after the question) is emptied (half of them) or holds a sentence of
    unrelated prose (the other half), with the completion unchanged, so that the answer's
    form and decision come from the question and sources, not from the wording of that slot.
    The question (paraphrased or not) is kept. A new list; the others are the same objects."""
    from .tasks import n_tokens

    if not 0 <= share <= 1:
        raise ValueError(f"instruction_noise={share!r} is invalid: use 0..1")
    rng = random.Random(seed + 7)
    held = [i for i, e in enumerate(examples) if e.sources]
    idx = sorted(rng.sample(held, round(share * len(held))))
    prose = noise_sentences(len(idx), seed) if idx else []
    out = list(examples)
    for k, i in enumerate(idx):
        ex = examples[i]
        prompt = render_prompt(tokenizer, ex.question, ex.sources, max_prompt_tokens)
        if prompt.count(ANSWER_INSTRUCTION) != 1:
            continue
        drop = k % 2 == 0
        prompt = prompt.replace("\n\n" + ANSWER_INSTRUCTION, "") if drop else \
            with_instruction(prompt, prose[k])
        tag = "drop" if drop else "prose"
        out[i] = replace(ex, prompt=prompt, augment="+".join(filter(None, (ex.augment, tag))),
                         prompt_tokens=n_tokens(tokenizer, prompt))
    return out


def consistency_pairs(examples: list, tokenizer, instructions: tuple[str, ...] = TRAIN_INSTRUCTIONS,
                      seed: int = 0, max_length: int | None = None) -> list:
    """[e0, t0, e1, t1, ...]: each example followed by its twin, the same prompt with another
    instruction (one of the serving instruction and `instructions`, not the one it holds) and
    the same completion, for a loss that pulls the two answers' distributions together
    (`consistency` in the instruct recipe). An example without an instruction (no sources)
    is paired with a copy of itself; a pair whose twin would not fit `max_length` is left out.
    Only TRAINING phrasings are accepted."""
    from .tasks import n_tokens

    check_training_phrasings(instructions)
    choices = (ANSWER_INSTRUCTION,) + tuple(i for i in instructions if i != ANSWER_INSTRUCTION)
    rng = random.Random(seed)
    out = []
    for e in examples:
        held_now = [i for i in choices if e.prompt.count(i) == 1]
        twin = e
        if held_now:
            new = rng.choice([i for i in choices if i != held_now[0]])
            prompt = e.prompt.replace(held_now[0], new)
            n = n_tokens(tokenizer, prompt)
            completion = n_tokens(tokenizer, e.completion)
            if max_length and n + completion > max_length:
                continue
            twin = replace(e, prompt=prompt, prompt_tokens=n,
                           augment="+".join(filter(None, (e.augment, "twin"))))
        out += [e, twin]
    return out


# Generator-made instruction paraphrases: a few-shot prompt (its example pair is none of the
# instructions above), sampled, then kept only if it reads as an answer instruction.
_PARAPHRASE_PROMPT = ('Paraphrase the sentence.\nSentence: "Answer the question using the text '
                      'above."\nParaphrase: "Use the text above to respond to the question."\n'
                      'Sentence: "{s}"\nParaphrase:')
_EVIDENCE = re.compile(r"\b(sources?|texts?|passages?|documents?|excerpts?|references?|"
                       r"evidence|material|cit\w+)\b|\[\d", re.I)
_NOT_AN_INSTRUCTION = re.compile(r"^(the |answer:|question|here|sentence|paraphrase|syntax|"
                                 r"justification|to improve|fix )|https?:|\?|\[\W|"
                                 r"\b(i|i'\w+|we|she|he|my|our)\b", re.I)


def _words(s: str) -> set[str]:
    return set(_norm(s).split())


def usable_instruction(text: str, max_eval_overlap: float = 0.5) -> str | None:
    """A generated paraphrase cleaned to one instruction sentence, or None when it is unusable:
    not one line of 6-30 words, not about the sources/citations, a question or a reply instead
    of an instruction, or too close (word-set Jaccard >= `max_eval_overlap`) to one of the
    held-out EVAL_INSTRUCTIONS, which must stay unseen in training."""
    text = text.strip()
    quoted = re.fullmatch(r'"([^"\n]+)"\.?', text.split("\n")[0].strip())
    line = (quoted.group(1) if quoted else text).strip()
    if "\n" in line or '"' in line or not 6 <= len(line.split()) <= 30 \
            or not line[0].isupper() or line.count("[") != line.count("]"):
        return None
    if not _EVIDENCE.search(line) or _NOT_AN_INSTRUCTION.search(line):
        return None
    words = _words(line)
    for held in EVAL_INSTRUCTIONS:
        if len(words & _words(held)) / len(words | _words(held)) >= max_eval_overlap:
            return None
    return line if line[-1] in ".!" else line + "."


def generated_instructions(model, tokenizer, n: int, seed: int = 0, per_prompt: int = 6,
                           max_rounds: int = 6,
                           seeds: tuple[str, ...] = TRAIN_INSTRUCTIONS) -> list[str]:
    """Up to `n` new answer instructions paraphrased by `model` (sampled at temperature 0.7,
    seeded, so a resumed run gets the same list) from the training phrasings `seeds`, each kept
    by `usable_instruction` and new (not a training or serving phrasing, no duplicates)."""
    import torch

    from .policy import generate

    if n < 0:
        raise ValueError(f"generated_instructions={n} is invalid: use 0 or more")
    seen = {_norm(x) for x in seeds + TRAIN_INSTRUCTIONS + (ANSWER_INSTRUCTION,)}
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": _PARAPHRASE_PROMPT.format(s=s)}], tokenize=False,
        add_generation_prompt=True) for s in seeds]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        for r in range(max_rounds if n else 0):
            torch.manual_seed(seed + r)
            for ids in generate(model, tokenizer, prompts, max_new_tokens=40, do_sample=True,
                                temperature=0.7, top_p=0.9, num_return_sequences=per_prompt):
                line = usable_instruction(tokenizer.decode(ids, skip_special_tokens=True))
                if line and _norm(line) not in seen and len(out) < n:
                    seen.add(_norm(line))
                    out.append(line)
            if len(out) >= n:
                break
    finally:
        tokenizer.padding_side = side
    return out
