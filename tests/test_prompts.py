"""The shared prompt module: message layout, citation parsing, NO_ANSWER detection, truncation."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rag_app.pipeline import WEAK_EVIDENCE_TEXT  # noqa: E402
from rag_app.prompts import (NO_ANSWER, SYSTEM_PROMPT, build_messages, format_sources,  # noqa: E402
                             is_no_answer, parse_answer, render_prompt)
from rag_app.types import Source  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def make_sources(n: int, words: int = 20) -> list[Source]:
    return [Source(i, f"doc{i}#0", f"doc{i}", f"Title {i}",
                   " ".join(f"word{i}_{j}" for j in range(words)), 1.0 / i)
            for i in range(1, n + 1)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint

    return AutoTokenizer.from_pretrained(ensure_base_checkpoint(REPO / "models"))


def test_format_sources_numbers_and_titles():
    text = format_sources(make_sources(2, words=3))
    assert text == "[1] Title 1\nword1_0 word1_1 word1_2\n\n[2] Title 2\nword2_0 word2_1 word2_2"


def test_format_sources_rejects_misnumbered():
    sources = make_sources(2)
    sources[1].number = 5
    with pytest.raises(ValueError, match="numbered 1..2"):
        format_sources(sources)


def test_build_messages_has_explicit_system_prompt():
    msgs = build_messages("  What is glaucoma? ", make_sources(2))
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == SYSTEM_PROMPT
    assert NO_ANSWER in SYSTEM_PROMPT and "[1]" in SYSTEM_PROMPT
    user = msgs[1]["content"]
    assert user.index("[1] Title 1") < user.index("[2] Title 2") < user.index("What is glaucoma?")
    with pytest.raises(ValueError, match="question"):
        build_messages("   ", make_sources(1))


@pytest.mark.parametrize("raw, text, cited, dropped", [
    ("Glaucoma damages the optic nerve [1].", "Glaucoma damages the optic nerve [1].",
     ["doc1#0"], []),
    ("A [2]. B [1, 2].", "A [2]. B [1][2].", ["doc2#0", "doc1#0"], []),
    ("A [1][3].", "A [1][3].", ["doc1#0", "doc3#0"], []),
    ("A [1-3].", "A [1][2][3].", ["doc1#0", "doc2#0", "doc3#0"], []),
    ("A [1 – 2] and [3;1].", "A [1][2] and [3][1].", ["doc1#0", "doc2#0", "doc3#0"], []),
    ("A [Source 2].", "A [2].", ["doc2#0"], []),
    ("A [7]. B [1].", "A. B [1].", ["doc1#0"], [7]),
    ("A [0, 2, 9] and [9].", "A [2] and.", ["doc2#0"], [0, 9]),
    ("A [2-5].", "A [2][3].", ["doc2#0", "doc3#0"], [4, 5]),
    ("No citations   here .\n\n\n\nNext  line", "No citations here.\n\nNext line", [], []),
    ("Years [1990] are dropped too", "Years are dropped too", [], [1990]),
])
def test_parse_answer(raw, text, cited, dropped):
    assert parse_answer(raw, make_sources(3)) == (text, cited, dropped)


def test_parse_answer_huge_range_does_not_explode():
    text, cited, dropped = parse_answer("X [1-100000].", make_sources(2))
    assert text == "X [1]." and cited == ["doc1#0"] and dropped == [100000]


def test_parse_answer_without_sources_drops_everything():
    assert parse_answer("Answer [1].", []) == ("Answer.", [], [1])


@pytest.mark.parametrize("text", [
    NO_ANSWER, NO_ANSWER.upper(), f"  {NO_ANSWER.lower()}  ",
    "I'm sorry, the sources do not answer this question.",
    "The provided sources don't contain information about this.",
    "The context does not mention the dosage.",
    "I cannot answer this from the provided sources.",
    WEAK_EVIDENCE_TEXT,  # what the app serves when its weak-evidence gate fires
])
def test_is_no_answer_true(text):
    assert is_no_answer(text)


@pytest.mark.parametrize("text", [
    "Glaucoma is a group of diseases that damage the optic nerve [1].",
    "High blood pressure often has no symptoms [2].",
    "",
])
def test_is_no_answer_false(text):
    assert not is_no_answer(text)


def test_render_prompt_uses_chat_template(tokenizer):
    prompt = render_prompt(tokenizer, "What is glaucoma?", make_sources(2))
    assert prompt.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
    assert "You are a helpful AI assistant named SmolLM" not in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_render_prompt_untouched_when_it_fits(tokenizer):
    sources = make_sources(2)
    full = render_prompt(tokenizer, "q?", sources)
    assert render_prompt(tokenizer, "q?", sources, max_prompt_tokens=5000) == full


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("limit", [300, 500, 800])
def test_render_prompt_truncates_to_fit(tokenizer, limit):
    sources = make_sources(3, words=60)
    sources[1].text = " ".join(f"long{j}" for j in range(500))  # the longest source
    full = render_prompt(tokenizer, "What is glaucoma?", sources)
    assert n_tokens(tokenizer, full) > limit
    prompt = render_prompt(tokenizer, "What is glaucoma?", sources, max_prompt_tokens=limit)
    assert limit - 40 <= n_tokens(tokenizer, prompt) <= limit
    for s in sources:  # every source keeps its number, title and head
        assert f"[{s.number}] {s.title}\n{s.text.split()[0]} {s.text.split()[1]}" in prompt
    assert "What is glaucoma?" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_render_prompt_cuts_longest_first(tokenizer):
    sources = make_sources(3, words=40)
    sources[2].text = " ".join(f"long{j}" for j in range(400))
    full = render_prompt(tokenizer, "q?", sources)
    limit = n_tokens(tokenizer, full) - 200
    prompt = render_prompt(tokenizer, "q?", sources, max_prompt_tokens=limit)
    assert n_tokens(tokenizer, prompt) <= limit
    assert sources[0].text in prompt and sources[1].text in prompt  # short ones untouched
    assert "long0 long1" in prompt and "long399" not in prompt and " ..." in prompt


def test_render_prompt_real_passages(tokenizer):
    import json

    path = REPO.parent / "shared" / "data" / "medquad" / "medquad_passages.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    rows = []
    with open(path) as fh:
        for line in fh:
            row = json.loads(line)
            if len(row["text"]) > 3000:
                rows.append(row)
            if len(rows) == 5:
                break
    sources = [Source(i, r["pid"] + "#0", r["pid"], r["title"], r["text"], 0.5)
               for i, r in enumerate(rows, start=1)]
    prompt = render_prompt(tokenizer, "What are the symptoms?", sources, max_prompt_tokens=1024)
    assert 900 <= n_tokens(tokenizer, prompt) <= 1024
    assert all(f"[{s.number}] {s.title}" in prompt for s in sources)


def test_trim_generation_drops_loops_and_a_cut_off_tail():
    from rag_app.prompts import trim_generation

    text = ("Gout causes joint pain [1]. It often starts at night. Gout causes joint pain [1]. "
            "The pain can be described as")
    assert trim_generation(text) == "Gout causes joint pain [1]. It often starts at night."
    assert trim_generation("Only an unfinished") == "Only an unfinished"
    assert trim_generation("Yes [2]. It helped [1].") == "Yes [2]. It helped [1]."
