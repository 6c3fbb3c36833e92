"""Paraphrase augmentation: eval phrasings are disjoint from training phrasings; rewrites keep
the serving prompt's structure."""
import pytest

from rag_app.prompts import ANSWER_INSTRUCTION
from training.augment import (EVAL_INSTRUCTIONS, EVAL_QUESTION_TEMPLATES, TRAIN_INSTRUCTIONS,
                              TRAIN_QUESTION_TEMPLATES, _norm, augment_examples, check_disjoint,
                              clean_question, generated_instructions, noise_instructions,
                              paraphrase_question, usable_instruction, with_instruction)


def test_eval_phrasings_disjoint_from_training():
    check_disjoint()
    assert len(EVAL_INSTRUCTIONS) == 5
    train = {_norm(x) for x in TRAIN_INSTRUCTIONS + TRAIN_QUESTION_TEMPLATES}
    train.add(_norm(ANSWER_INSTRUCTION))
    assert not train & {_norm(x) for x in EVAL_INSTRUCTIONS + EVAL_QUESTION_TEMPLATES}
    assert not set(TRAIN_INSTRUCTIONS) & set(EVAL_INSTRUCTIONS)


def test_question_paraphrase():
    assert clean_question("What is (are) Asthma ?") == "What is Asthma"
    assert paraphrase_question("What is (are) Asthma ?", "Please answer: {q}?") == \
        "Please answer: what is Asthma?"
    assert paraphrase_question("DBE: is it safe?", "{q}?") == "DBE: is it safe?"


def test_with_instruction_replaces_once():
    p = f"...Question: x\n\n{ANSWER_INSTRUCTION}<|im_end|>"
    assert with_instruction(p, TRAIN_INSTRUCTIONS[0]).endswith(TRAIN_INSTRUCTIONS[0] + "<|im_end|>")
    assert with_instruction("no sources", TRAIN_INSTRUCTIONS[0]) == "no sources"


def test_augment_ratio_and_refuses_eval_phrasings(tiny_examples, tokenizer):
    exs = augment_examples(tiny_examples, tokenizer, ratio=0.5, max_prompt_tokens=240, seed=1)
    assert len(exs) == len(tiny_examples)
    assert sum(bool(e.augment) for e in exs) == round(0.5 * len(tiny_examples))
    for e in exs:
        assert not any(x in e.prompt for x in EVAL_INSTRUCTIONS)
        assert e.completion == next(t.completion for t in tiny_examples if t.qid == e.qid)
    added = augment_examples(tiny_examples, tokenizer, ratio=0.5, seed=1, mode="add")
    assert len(added) == len(tiny_examples) + round(0.5 * len(tiny_examples))
    with pytest.raises(ValueError, match="evaluation phrasing"):
        augment_examples(tiny_examples, tokenizer, 0.5, instructions=EVAL_INSTRUCTIONS[:1])


def test_instruction_noise_empties_or_replaces_only_the_instruction(tiny_examples, tokenizer):
    exs = augment_examples(tiny_examples, tokenizer, ratio=0.5, max_prompt_tokens=240, seed=1)
    noised = noise_instructions(exs, tokenizer, share=0.5, seed=3, max_prompt_tokens=240)
    held = [i for i, e in enumerate(exs) if e.sources]
    changed = [i for i in range(len(exs)) if noised[i] is not exs[i]]
    assert set(changed) <= set(held) and len(changed) == round(0.5 * len(held)) > 1
    tags = [noised[i].augment.split("+")[-1] for i in changed]
    assert {"drop", "prose"} == set(tags)
    for i in changed:
        old, new = exs[i], noised[i]
        assert new.completion == old.completion and new.question == old.question
        assert not any(x in new.prompt for x in TRAIN_INSTRUCTIONS + (ANSWER_INSTRUCTION,))
        head = new.prompt.split(f"Question: {old.question}")
        assert len(head) == 2 and old.prompt.startswith(head[0])
        slot = head[1].split("<|im_end|>")[0]
        assert (slot == "") if new.augment.endswith("drop") else \
            (slot.startswith("\n\n") and len(slot.split()) >= 6 and "source" not in slot)
    assert [e.prompt for e in noise_instructions(exs, tokenizer, 0.5, 3, 240)] == \
        [e.prompt for e in noised]
    assert noise_instructions(exs, tokenizer, 0.0) == exs
    with pytest.raises(ValueError, match="instruction_noise"):
        noise_instructions(exs, tokenizer, 1.5)


def test_usable_instruction_keeps_instructions_only():
    assert usable_instruction('"Use the provided sources to answer the question and cite them."') \
        == "Use the provided sources to answer the question and cite them."
    assert usable_instruction("Answer briefly from the text above, citing [1]") == \
        "Answer briefly from the text above, citing [1]."
    for bad in ("To answer, I will use the sources above and cite them as [1].",  # a reply
                "What do the sources above say about the question asked?",  # a question
                "Use the sources above.\nThen cite them as [1].",  # two lines
                "Cite the sources.",  # too short
                "Answer the question in a few short and friendly sentences please.",  # no sources
                "Answer from the sources above and cite them as [1.",  # broken bracket
                "[1] The answer to the question is in the sources above.",
                EVAL_INSTRUCTIONS[3],  # a held-out phrasing, or a near copy of one
                EVAL_INSTRUCTIONS[3].replace("Be brief", "Be short")):
        assert usable_instruction(bad) is None, bad


@pytest.fixture(scope="module")
def base_model():
    from training.instruct import load_base, resolve_base_generator

    return load_base(resolve_base_generator("default"))


def test_generated_instructions_are_new_usable_and_seeded(base_model, tiny_examples):
    model, tok = base_model
    side = tok.padding_side
    kw = dict(seed=3, per_prompt=4, max_rounds=2, seeds=TRAIN_INSTRUCTIONS[:2])
    made = generated_instructions(model, tok, 2, **kw)
    assert 1 <= len(made) <= 2 and tok.padding_side == side
    known = {_norm(x) for x in TRAIN_INSTRUCTIONS + EVAL_INSTRUCTIONS + (ANSWER_INSTRUCTION,)}
    assert all(usable_instruction(x) == x and _norm(x) not in known for x in made)
    assert generated_instructions(model, tok, 2, **kw) == made  # a resumed run gets the same
    assert generated_instructions(model, tok, 0) == []
    exs = augment_examples(tiny_examples, tok, 1.0, seed=0, instructions=tuple(made))
    assert any(x in e.prompt for e in exs for x in made)
