"""The Gradio app end to end through its HTTP API (gradio_client), on the real small index and
the real packaged models; the fine-tune test runs the real `rag train relevance` with
training/recipes/relevance-tiny.yaml in the job worker."""
import re
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from rag_app.config import GenerationConfig  # noqa: E402
from rag_app.feedback import FeedbackStore  # noqa: E402
from rag_app.jobs import JobRunner, list_recipes  # noqa: E402
from rag_app.models import ModelRegistry  # noqa: E402
from test_jobs import fake_runner  # noqa: E402

pytestmark = pytest.mark.slow
GOUT = "What are the symptoms of gout?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(**kw):
    from app import make_app

    demo = make_app("small", generation=GenerationConfig(max_new_tokens=12), **kw)
    port = free_port()
    demo.queue(default_concurrency_limit=2).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, Client(f"http://127.0.0.1:{port}/", verbose=False)


@pytest.fixture(scope="module")
def app(small_index, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    db = tmp / "feedback.sqlite"
    demo, client = launch(feedback_db=str(db), jobs=JobRunner(root=tmp / "jobs"),
                          max_upload_mb=0.01)
    yield demo, client, db
    demo.close()


def ask(client, question=GOUT, k=3):
    status, sources, base, tuned = client.predict(question, k, api_name="/ask")
    return status, sources, base, tuned


def test_every_event_has_an_api_name(app):
    info = app[1].view_api(print_info=False, return_format="dict")
    names = set(info["named_endpoints"])
    assert {"/ask", "/rate", "/prefer", "/upload", "/start_job", "/job_status", "/cancel_job",
            "/promote", "/rollback", "/run_eval", "/run_qa_eval", "/set_index", "/rebuild",
            "/export_preferences"} <= names
    with pytest.raises(Exception, match="no training job is running"):
        app[1].predict(api_name="/cancel_job")


def test_ask_returns_both_answers_and_sources(app):
    demo, client, _ = app
    status, sources, base, tuned = ask(client)
    assert "index <b>small</b>" in status and "no relevance model" in status
    assert 'data-model="base"' in base and "latency" in base and "first token" in base
    assert re.sub(r"<[^>]+>", "", base).strip()
    assert "No tuned model yet" in tuned and "Fine-tune tab" in tuned
    assert sources.count('class="src"') == 3 and 'id="src-1"' in sources
    assert "<b>[1] Gout</b>" in sources and "score 0." in sources
    assert "Weak evidence" not in status


def test_weak_evidence_is_flagged(app):
    status, _, base, _ = ask(app[1], "Who won the football world cup in 1998?")
    assert "Weak evidence" in status and "Weak evidence" in base


def test_rating_persists_across_an_app_restart(app, tmp_path):
    demo, client, db = app
    ask(client)
    msg, summary = client.predict("base", 4, api_name="/rate")
    assert "rated 4/5" in msg
    with pytest.raises(Exception, match="needs two answers"):
        client.predict("base", api_name="/prefer")
    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict("base", 9, api_name="/rate")
    demo2, client2 = launch(feedback_db=str(db), jobs=fake_runner(tmp_path))
    try:
        _, summary2 = client2.predict(api_name="/export_preferences")
        assert re.search(r"[1-9]\d* ratings \(base avg", summary2)
    finally:
        demo2.close()
    rows = FeedbackStore(db).interactions()
    rated = [r for r in rows if r["base_rating"] == 4]
    assert rated and rated[0]["question"] == GOUT and rated[0]["base_model"] == "base"
    assert rated[0]["sources"] and rated[0]["sources"][0]["text"]


def test_bad_uploads_are_refused_with_a_clear_message(app, tmp_path):
    client = app[1]
    exe = tmp_path / "run.exe"
    exe.write_text("MZ")
    with pytest.raises(Exception, match="Invalid file type"):
        client.predict([handle_file(str(exe))], "uploads", api_name="/upload")
    big = tmp_path / "big.txt"
    big.write_text("gout " * 5000)  # 25 kB > the 0.01 MB limit of this app
    with pytest.raises(Exception, match=r"big.txt: 0.0 MB is over the 0.01 MB limit"):
        client.predict([handle_file(str(big))], "uploads", api_name="/upload")
    ok = tmp_path / "note.txt"
    ok.write_text("Gout is treated with colchicine.")
    with pytest.raises(Exception, match="index name '../x' is invalid"):
        client.predict([handle_file(str(ok))], "../x", api_name="/upload")


def test_upload_builds_a_new_index(app, tmp_path):
    client = app[1]
    doc = tmp_path / "My Notes (v2)!.md"
    doc.write_text("# Tinnitus\n\nTinnitus is ringing in the ears. <script>alert(1)</script>\n")
    msg, table, _ = client.predict([handle_file(str(doc))], "notes", api_name="/upload")
    assert "built a new index" in msg and "notes" in msg
    assert "notes" in [r[1] for r in table["data"]]
    from rag_app.ui_admin import uploads_dir

    assert [p.name for p in uploads_dir("notes").rglob("*.md")] == ["My_Notes_v2.md"]
    msg, *_ = client.predict("notes", api_name="/rebuild")
    assert "rebuilt **notes**" in msg
    with pytest.raises(Exception, match="does not exist"):
        client.predict("nope", api_name="/set_index")


@pytest.mark.skipif("relevance-tiny.yaml" not in str(list_recipes()),
                    reason="training/recipes/relevance-tiny.yaml is missing")
def test_finetune_job_promote_and_next_answer_uses_it(app):
    demo, client, _ = app
    state = demo.rag_state
    msg = client.predict("relevance", "relevance-tiny.yaml", 3, 0, 0, api_name="/start_job")
    assert "started job" in msg
    seen, deadline = [], time.time() + 400
    while time.time() < deadline:
        md, curve, metrics = client.predict(api_name="/job_status")
        seen.append(md)
        if re.search(r"status \*\*(done|failed|error)\*\*", md):
            break
        time.sleep(0.5)
    assert "status **done**" in md, md
    assert any(re.search(r"step [0-2]/3 \(\d+%\)", m) for m in seen), seen  # live progress
    steps = [row[0] for row in curve["data"]]
    assert steps and steps == sorted(steps) and steps[-1] == 3  # the override reached it
    rows = {r[0]: r for r in metrics["data"]}
    assert "auc" in rows and isinstance(rows["auc"][2], float)
    name = re.search(r"model `([^`]+)`", md).group(1)
    msg, models = client.predict(api_name="/promote")
    assert name in msg and ModelRegistry().active("relevance")["name"] == name
    assert name in [r[1] for r in models["data"] if r[0] == "✔"]
    assert state.base._reranker is None  # the cached reranker was dropped, no restart
    status, *_ = ask(client)
    assert f"relevance model {name}" in status
    assert state.base.reranker.kind == "cross-encoder"
    assert Path(state.base.reranker.model_ref) == Path(ModelRegistry().get(name)["path"])
    msg, _ = client.predict("relevance", api_name="/rollback")
    assert "rolled back" in msg and ModelRegistry().active("relevance") is None
    status, *_ = ask(client, "Who won the football world cup in 1998?")
    assert "no relevance model" in status


def test_tuned_generator_answers_beside_base_and_preference_is_stored(app):
    """A registered generator (here: a copy of the base checkpoint) fills the tuned column."""
    demo, client, db = app
    reg = ModelRegistry()
    base_dir = reg.root / "base" / "smollm2-135m-instruct"
    reg.register("gen-test", "generator", base_dir, activate=True)
    try:
        status, sources, base, tuned = ask(client)
        assert 'data-model="gen-test"' in tuned and "latency" in tuned
        assert 'data-model="base"' in base
        msg, _ = client.predict("tuned", api_name="/prefer")
        assert "preferred tuned" in msg
        row = FeedbackStore(db).interactions(1)[0]
        assert row["preference"] == "tuned" and row["tuned_model"] == "gen-test"
    finally:
        reg.rollback("generator")


def test_run_eval_shows_a_table_a_plot_and_keeps_history(app):
    client = app[1]
    table, plot, history = client.predict("medquad-test", 5, ["bm25", "hybrid"],
                                          api_name="/run_eval")
    assert table["headers"][:3] == ["mode", "recall@1", "recall@5"]
    assert [r[0] for r in table["data"]] == ["bm25", "hybrid"]
    assert all(0 <= v <= 1 for r in table["data"] for v in r[1:])
    assert plot is not None
    assert {r[1] for r in history["data"]} == {"medquad-test"} and len(history["data"]) >= 2
    with pytest.raises(Exception, match="limit=0 is invalid"):
        client.predict("medquad-test", 0, ["bm25"], api_name="/run_eval")


def test_qa_eval_scores_base_and_tuned_and_joins_the_history(app):
    """The Evaluate tab answers held-out PubMedQA questions with both generators."""
    demo, client, _ = app
    reg = ModelRegistry()
    reg.register("gen-qa", "generator", reg.root / "base" / "smollm2-135m-instruct",
                 activate=True)
    try:
        table, plot, history = client.predict("pubmedqa-heldout", 2, api_name="/run_qa_eval")
    finally:
        reg.rollback("generator")
    cols = table["headers"]
    rows = {r[0]: dict(zip(cols, r)) for r in table["data"]}
    assert set(rows) == {"base", "tuned"} and rows["tuned"]["model"] == "gen-qa"
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["rouge_l"] <= 1 and r["mean_words"] > 0
    # the same checkpoint with greedy decoding gives the same answers, so the same scores
    assert rows["base"]["rouge_l"] == rows["tuned"]["rouge_l"]
    assert plot is not None
    assert {"qa: base", "qa: tuned"} <= {r[4] for r in history["data"]}
    with pytest.raises(Exception, match="limit=0 is invalid"):
        client.predict("pubmedqa-heldout", 0, api_name="/run_qa_eval")
