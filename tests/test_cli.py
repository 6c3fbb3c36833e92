import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rag_app.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
COMMANDS = [[], ["index"], ["index", "build"], ["index", "add"], ["index", "info"],
            ["index", "list"], ["ask"], ["eval"], ["eval", "retrieval"], ["eval", "qa"],
            ["model"], ["model", "list"], ["model", "activate"], ["model", "rollback"],
            ["model", "merge"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "rag")
def test_help_for_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: rag" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "rag_app.cli", "--help"], capture_output=True,
                         text=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert out.returncode == 0 and "index" in out.stdout


def test_missing_index_exits_2_with_the_fix(small_index, capsys):
    assert main(["index", "info", "--name", "nothere"]) == 2
    assert "rag index build --name nothere" in capsys.readouterr().err


def test_empty_question_exits_2(small_index, capsys):
    assert main(["ask", "  ", "--index", "small"]) == 2
    assert "empty" in capsys.readouterr().err


def test_index_build_list_and_info(tmp_path, capsys, small_index):
    (tmp_path / "a.md").write_text("# Gout\n\nGout causes sudden severe joint pain.")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    assert main(["index", "build", "--name", "cli", "--source", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "bad.txt" in captured.err
    assert main(["index", "list"]) == 0
    assert "cli" in capsys.readouterr().out
    assert main(["index", "info", "--name", "cli"]) == 0
    assert json.loads(capsys.readouterr().out)["n_chunks"] == 1


@pytest.mark.slow
def test_ask_json_and_batch(small_index, tmp_path, capsys):
    assert main(["ask", "What causes gout?", "--index", "small", "--json",
                 "--max-new-tokens", "40"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["question"] == "What causes gout?" and out["sources"] and out["answer"]
    qs = tmp_path / "qs.jsonl"
    qs.write_text(json.dumps({"id": "a", "question": "What is asthma?"}) + "\n"
                  + json.dumps({"id": "b", "question": ""}) + "\n")
    res = tmp_path / "out.jsonl"
    assert main(["ask", "--questions", str(qs), "--out", str(res), "--index", "small",
                 "--max-new-tokens", "30"]) == 0
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert rows[0]["id"] == "a" and rows[0]["answer"]
    assert rows[1]["id"] == "b" and "empty" in rows[1]["error"]


@pytest.mark.slow
def test_ask_compare_base_and_tuned_on_the_same_sources(small_index, tiny_adapter, tmp_path,
                                                        monkeypatch, capsys):
    from rag_app.models import ModelRegistry

    monkeypatch.setenv("RAG_MODELS_DIR", str(tmp_path / "models"))  # a registry of its own
    monkeypatch.setenv("RAG_BASE_CACHE", str(REPO / "models"))
    ask = ["ask", "What causes gout?", "--index", "small", "--compare", "--max-new-tokens", "8"]
    assert main(ask + ["--json"]) == 2  # nothing tuned yet
    assert "rag train instruct" in capsys.readouterr().err
    ModelRegistry().register("lora-cli", "generator", tiny_adapter, activate=True)
    assert main(ask + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["question"] == "What causes gout?" and out["sources"]
    base, tuned = out["base"], out["tuned"]
    assert base["model"] == "base" and tuned["model"] == "lora-cli"
    assert not base["weak_evidence"] and base["answer"] and tuned["answer"]
    assert out["sources"] == base["sources"] == tuned["sources"]
    assert main(ask) == 0
    text = capsys.readouterr().out
    assert "=== base: base ===" in text and "=== tuned: lora-cli ===" in text
    assert main(ask + ["--questions", "q.jsonl", "--out", "o.jsonl"]) == 2


def test_eval_retrieval_on_files(small_index, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "1", "question": "What are the symptoms of gout?"}) + "\n")
    r = tmp_path / "qrels.tsv"
    r.write_text("query_id\tpassage_id\tgrade\n1\tNIHSeniorHealth_0000028_Sec3\t1\n")
    out = tmp_path / "res.json"
    assert main(["eval", "retrieval", "--queries", str(q), "--qrels", str(r), "--index", "small",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"bm25", "dense", "hybrid"}
    assert res["modes"]["hybrid"]["recall@100"] == 1.0
    assert (tmp_path / "res.png").exists()
