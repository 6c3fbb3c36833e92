"""Paraphrase augmentation: eval phrasings are disjoint from training phrasings; rewrites keep
the serving prompt's structure."""
import pytest

from rag_app.prompts import ANSWER_INSTRUCTION
from training.augment import (EVAL_INSTRUCTIONS, EVAL_QUESTION_TEMPLATES, TRAIN_INSTRUCTIONS,
                              TRAIN_QUESTION_TEMPLATES, _norm, augment_examples, check_disjoint,
                              clean_question, paraphrase_question, with_instruction)


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
