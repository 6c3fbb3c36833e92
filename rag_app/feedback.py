"""Persistent user feedback: answer ratings (1-5), base-vs-tuned preferences, eval history.

One SQLite file, `$RAG_FEEDBACK_DB` or `<models_dir>/../feedback/feedback.sqlite`. An
*interaction* is one question answered by two models on the same retrieved sources; ratings and
the preference are attached to it. `export_preferences(path)` writes reward-modelling pairs
(jsonl: prompt, chosen, rejected), where `prompt` is rendered by rag_app.prompts exactly as the
generator saw it.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .config import models_dir
from .types import Answer, Source

WHICH = ("base", "tuned")
PREFERENCES = ("base", "tuned", "tie")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS interactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    question TEXT NOT NULL,
    sources TEXT NOT NULL,            -- json list of {number, id, doc_id, title, text, score}
    base_answer TEXT, base_model TEXT,
    tuned_answer TEXT, tuned_model TEXT,
    base_rating INTEGER, tuned_rating INTEGER,
    preference TEXT,                  -- base | tuned | tie
    updated REAL
);
CREATE TABLE IF NOT EXISTS eval_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    result TEXT NOT NULL              -- json
);
"""


def feedback_db_path() -> Path:
    env = os.environ.get("RAG_FEEDBACK_DB")
    return Path(env) if env else models_dir().parent / "feedback" / "feedback.sqlite"


class FeedbackStore:
    """Thread-safe (one connection per call, WAL journal) store of interactions and ratings."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else feedback_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._conn() as c:
            c.executescript(_SCHEMA)

    @contextmanager
    def _conn(self):
        conn = sqlite3.connect(self.path, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            yield conn
            conn.commit()
        finally:
            conn.close()

    # -- interactions
    def record(self, question: str, sources: list[Source], base: Answer | None,
               tuned: Answer | None) -> int:
        """Store one answered question (both answers on the same sources); returns its id."""
        src = [{"number": s.number, "id": s.id, "doc_id": s.doc_id, "title": s.title,
                "text": s.text, "score": float(s.score)} for s in sources]
        with self._lock, self._conn() as c:
            cur = c.execute(
                "INSERT INTO interactions (created, question, sources, base_answer, base_model,"
                " tuned_answer, tuned_model) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), question, json.dumps(src, ensure_ascii=False),
                 base.text if base else None, base.model if base else None,
                 tuned.text if tuned else None, tuned.model if tuned else None))
            return int(cur.lastrowid)

    def add_answer(self, interaction_id: int, which: str, answer: Answer) -> dict:
        """Store an answer that completed after the interaction was recorded (the tuned one
        streams after the base one)."""
        if which not in WHICH:
            raise ValueError(f"which={which!r} is invalid: choose one of {WHICH}")
        self.get(interaction_id)
        with self._lock, self._conn() as c:
            c.execute(f"UPDATE interactions SET {which}_answer = ?, {which}_model = ?, "
                      "updated = ? WHERE id = ?",
                      (answer.text, answer.model, time.time(), int(interaction_id)))
        return self.get(interaction_id)

    def get(self, interaction_id: int) -> dict:
        with self._conn() as c:
            row = c.execute("SELECT * FROM interactions WHERE id = ?",
                            (int(interaction_id),)).fetchone()
        if row is None:
            raise ValueError(f"interaction {interaction_id} does not exist: ask a question first")
        out = dict(row)
        out["sources"] = json.loads(out["sources"])
        return out

    def rate(self, interaction_id: int, which: str, rating: int) -> dict:
        """Rate the base or the tuned answer of an interaction 1..5."""
        if which not in WHICH:
            raise ValueError(f"which={which!r} is invalid: choose one of {WHICH}")
        try:
            rating = int(rating)
        except (TypeError, ValueError):
            raise ValueError(f"rating={rating!r} is invalid: use an integer 1..5") from None
        if not 1 <= rating <= 5:
            raise ValueError(f"rating={rating} is invalid: use an integer 1..5")
        row = self.get(interaction_id)
        if row[f"{which}_answer"] is None:
            raise ValueError(f"there is no {which} answer to rate for this question")
        with self._lock, self._conn() as c:
            c.execute(f"UPDATE interactions SET {which}_rating = ?, updated = ? WHERE id = ?",
                      (rating, time.time(), int(interaction_id)))
        return self.get(interaction_id)

    def prefer(self, interaction_id: int, preference: str) -> dict:
        """Record which answer is better: 'base', 'tuned' or 'tie'."""
        if preference not in PREFERENCES:
            raise ValueError(f"preference={preference!r} is invalid: choose one of {PREFERENCES}")
        row = self.get(interaction_id)
        if preference != "tie" and (row["base_answer"] is None or row["tuned_answer"] is None):
            raise ValueError("a preference needs two answers: train and promote a tuned "
                             "generator first (Fine-tune tab)")
        with self._lock, self._conn() as c:
            c.execute("UPDATE interactions SET preference = ?, updated = ? WHERE id = ?",
                      (preference, time.time(), int(interaction_id)))
        return self.get(interaction_id)

    def interactions(self, limit: int = 50) -> list[dict]:
        with self._conn() as c:
            rows = c.execute("SELECT * FROM interactions ORDER BY id DESC LIMIT ?",
                             (int(limit),)).fetchall()
        return [dict(r) | {"sources": json.loads(r["sources"])} for r in rows]

    def summary(self) -> dict:
        with self._conn() as c:
            r = c.execute(
                "SELECT COUNT(*) AS n, COUNT(base_rating) + COUNT(tuned_rating) AS ratings,"
                " AVG(base_rating) AS base_avg, AVG(tuned_rating) AS tuned_avg,"
                " SUM(preference = 'base') AS prefer_base,"
                " SUM(preference = 'tuned') AS prefer_tuned FROM interactions").fetchone()
        return {k: (r[k] or 0) for k in r.keys()}

    # -- preference pairs for reward modelling
    def preference_pairs(self, include_ratings: bool = True) -> list[dict]:
        """(row, chosen, rejected) for each explicit preference, and (with include_ratings)
        for each interaction whose two answers were rated differently and has no preference."""
        pairs = []
        for row in self.interactions(limit=10**9):
            if row["base_answer"] is None or row["tuned_answer"] is None:
                continue
            pref = row["preference"]
            if pref is None and include_ratings and row["base_rating"] and \
                    row["tuned_rating"] and row["base_rating"] != row["tuned_rating"]:
                pref = "base" if row["base_rating"] > row["tuned_rating"] else "tuned"
            if pref not in ("base", "tuned"):
                continue
            other = "tuned" if pref == "base" else "base"
            pairs.append({"row": row, "chosen": row[f"{pref}_answer"],
                          "rejected": row[f"{other}_answer"],
                          "chosen_model": row[f"{pref}_model"],
                          "rejected_model": row[f"{other}_model"]})
        return pairs[::-1]  # oldest first

    def export_preferences(self, path: str | Path, tokenizer=None,
                           include_ratings: bool = True) -> int:
        """Write jsonl {prompt, chosen, rejected, question, source_ids, models, interaction_id};
        returns the number of pairs. `prompt` is rag_app.prompts.render_prompt with the base
        generator's tokenizer (loaded on demand) - the exact string the models answered."""
        from .prompts import render_prompt

        pairs = self.preference_pairs(include_ratings)
        if pairs and tokenizer is None:
            from transformers import AutoTokenizer

            from .generate import ensure_base_checkpoint

            tokenizer = AutoTokenizer.from_pretrained(ensure_base_checkpoint())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for p in pairs:
                row = p["row"]
                sources = [Source(s["number"], s["id"], s["doc_id"], s["title"], s["text"],
                                  s["score"]) for s in row["sources"]]
                f.write(json.dumps({
                    "prompt": render_prompt(tokenizer, row["question"], sources),
                    "chosen": p["chosen"], "rejected": p["rejected"],
                    "question": row["question"], "source_ids": [s.id for s in sources],
                    "chosen_model": p["chosen_model"], "rejected_model": p["rejected_model"],
                    "interaction_id": row["id"]}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return len(pairs)

    # -- evaluation history
    def add_eval_run(self, result: dict) -> int:
        with self._lock, self._conn() as c:
            cur = c.execute("INSERT INTO eval_runs (created, result) VALUES (?, ?)",
                            (time.time(), json.dumps(result)))
            return int(cur.lastrowid)

    def eval_runs(self, limit: int = 20) -> list[dict]:
        with self._conn() as c:
            rows = c.execute("SELECT * FROM eval_runs ORDER BY id DESC LIMIT ?",
                             (int(limit),)).fetchall()
        return [{"id": r["id"], "created": r["created"]} | json.loads(r["result"])
                for r in rows]


def export_preferences(path: str | Path, db: str | Path | None = None, tokenizer=None) -> int:
    """Module-level shortcut: export the default store's preference pairs to `path`."""
    return FeedbackStore(db).export_preferences(path, tokenizer=tokenizer)
