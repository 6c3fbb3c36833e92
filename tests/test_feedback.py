"""The SQLite feedback store: ratings, preferences, persistence, preference-pair export."""
import json

import pytest

from rag_app.feedback import FeedbackStore, feedback_db_path
from rag_app.types import Answer, Source

SOURCES = [Source(1, "gout#0", "gout", "Gout", "Gout causes sudden joint pain.", 0.7),
           Source(2, "flu#0", "flu", "Flu", "Flu causes fever.", 0.4)]


def _answers():
    return (Answer("What is gout?", "Gout causes joint pain [1].", SOURCES, ["gout#0"], "base"),
            Answer("What is gout?", "It is flu [2].", SOURCES, ["flu#0"], "tuned-v1"))


def test_default_location_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAG_FEEDBACK_DB", str(tmp_path / "x.sqlite"))
    assert feedback_db_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("RAG_FEEDBACK_DB")
    monkeypatch.setenv("RAG_MODELS_DIR", str(tmp_path / "models"))
    assert feedback_db_path() == tmp_path / "feedback" / "feedback.sqlite"


def test_ratings_and_preferences_persist(tmp_path):
    db = tmp_path / "fb.sqlite"
    store = FeedbackStore(db)
    base, tuned = _answers()
    iid = store.record("What is gout?", SOURCES, base, tuned)
    store.rate(iid, "base", 5)
    store.rate(iid, "tuned", 2)
    store.prefer(iid, "base")
    row = FeedbackStore(db).get(iid)  # a new store = an app restart
    assert (row["base_rating"], row["tuned_rating"], row["preference"]) == (5, 2, "base")
    assert row["base_model"] == "base" and row["tuned_model"] == "tuned-v1"
    assert row["sources"][0]["id"] == "gout#0" and row["sources"][0]["text"].startswith("Gout")
    assert row["created"] > 0 and row["updated"] >= row["created"]
    s = FeedbackStore(db).summary()
    assert s["n"] == 1 and s["ratings"] == 2 and s["prefer_base"] == 1


@pytest.mark.parametrize("which,rating,msg", [("base", 0, "1..5"), ("base", "x", "integer"),
                                              ("other", 3, "which=")])
def test_bad_ratings_are_refused(tmp_path, which, rating, msg):
    store = FeedbackStore(tmp_path / "fb.sqlite")
    iid = store.record("q?", SOURCES, _answers()[0], None)
    with pytest.raises(ValueError, match=msg):
        store.rate(iid, which, rating)


def test_no_tuned_answer_no_preference(tmp_path):
    store = FeedbackStore(tmp_path / "fb.sqlite")
    iid = store.record("q?", SOURCES, _answers()[0], None)
    with pytest.raises(ValueError, match="no tuned answer"):
        store.rate(iid, "tuned", 3)
    with pytest.raises(ValueError, match="needs two answers"):
        store.prefer(iid, "base")
    with pytest.raises(ValueError, match="does not exist"):
        store.rate(999, "base", 3)


def test_a_later_answer_is_added_to_the_recorded_interaction(tmp_path):
    """The Ask tab records the question once the base answer is complete (so it can be rated
    at once) and adds the tuned answer when that one completes."""
    store = FeedbackStore(tmp_path / "fb.sqlite")
    base, tuned = _answers()
    iid = store.record("q?", SOURCES, base, None)
    assert store.rate(iid, "base", 4)["base_rating"] == 4
    row = store.add_answer(iid, "tuned", tuned)
    assert row["tuned_answer"] == tuned.text and row["tuned_model"] == "tuned-v1"
    assert row["base_rating"] == 4 and store.prefer(iid, "tuned")["preference"] == "tuned"
    with pytest.raises(ValueError, match="which="):
        store.add_answer(iid, "other", tuned)
    with pytest.raises(ValueError, match="does not exist"):
        store.add_answer(999, "tuned", tuned)


class _Tok:
    """Stands in for the chat tokenizer: the export must call render_prompt with it."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


def test_export_preference_pairs(tmp_path):
    store = FeedbackStore(tmp_path / "fb.sqlite")
    base, tuned = _answers()
    a = store.record("What is gout?", SOURCES, base, tuned)
    store.prefer(a, "base")
    b = store.record("What is gout?", SOURCES, base, tuned)
    store.rate(b, "base", 1)
    store.rate(b, "tuned", 4)  # ratings alone imply tuned > base
    c = store.record("What is gout?", SOURCES, base, tuned)
    store.prefer(c, "tie")  # ties are not pairs
    n = store.export_preferences(tmp_path / "prefs.jsonl", tokenizer=_Tok())
    rows = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert n == 2 == len(rows)
    assert rows[0]["chosen"] == base.text and rows[0]["rejected"] == tuned.text
    assert rows[1]["chosen"] == tuned.text and rows[1]["chosen_model"] == "tuned-v1"
    assert "[1] Gout\nGout causes sudden joint pain." in rows[0]["prompt"]
    assert "Question: What is gout?" in rows[0]["prompt"]
    assert rows[0]["prompt"].endswith("|assistant:")


@pytest.mark.slow
def test_export_uses_the_real_generator_prompt(tmp_path):
    from transformers import AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint
    from rag_app.prompts import render_prompt

    store = FeedbackStore(tmp_path / "fb.sqlite")
    base, tuned = _answers()
    store.prefer(store.record("What is gout?", SOURCES, base, tuned), "tuned")
    assert store.export_preferences(tmp_path / "p.jsonl") == 1
    row = json.loads((tmp_path / "p.jsonl").read_text())
    tok = AutoTokenizer.from_pretrained(ensure_base_checkpoint())
    assert row["prompt"] == render_prompt(tok, "What is gout?", SOURCES)
