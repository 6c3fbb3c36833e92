"""The training job runner, driven by a small fake trainer that follows the progress contract
and registers its (stand-in) model like `rag train` does. The real trainer runs in
test_app.py::test_finetune_job_promote_and_next_answer_uses_it."""
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rag_app.jobs import JobRunner, apply_overrides, list_recipes, read_events
from rag_app.models import ModelRegistry

FAKE_TRAINER = textwrap.dedent('''
    """Fake `rag train KIND`: emits the progress contract, saves a folder, registers it."""
    import argparse, json, sys, time
    from pathlib import Path
    import yaml

    ap = argparse.ArgumentParser()
    ap.add_argument("kind")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--progress-file", required=True)
    ap.add_argument("--output", required=True)
    a = ap.parse_args()
    cfg = yaml.safe_load(open(a.recipe))
    steps, delay = int(cfg["max_steps"]), float(cfg.get("delay", 0.05))

    def emit(**ev):
        with open(a.progress_file, "a") as f:
            f.write(json.dumps(dict(ev, time=time.time())) + "\\n")

    emit(event="start", step=0, total=steps)
    for s in range(1, steps + 1):
        time.sleep(delay)
        emit(event="step", step=s, total=steps, loss=round(1.0 / s, 4),
             eta_s=round((steps - s) * delay, 2), epoch=s / steps)
    emit(event="eval", step=steps, total=steps, metrics={"mrr@10": 0.61})
    from rag_app.models import ModelRegistry
    Path(a.output).mkdir(parents=True)
    (Path(a.output) / "model.txt").write_text("a stand-in model")
    metrics = {"before": {"mrr@10": 0.5, "ndcg@10": 0.55}, "after": {"mrr@10": 0.61,
               "ndcg@10": 0.64}}
    ModelRegistry().register(Path(a.output).name, a.kind, a.output, training_type=a.kind,
                             metrics=metrics, manifest={"recipe": a.recipe,
                             "learning_rate": cfg.get("learning_rate")})
    emit(event="done", step=steps, total=steps, metrics=metrics, output=a.output)
''')


def fake_runner(tmp: Path, steps: int = 6, delay: float = 0.1) -> JobRunner:
    """A JobRunner whose trainer is FAKE_TRAINER, with one recipe relevance-test.yaml."""
    tmp.mkdir(parents=True, exist_ok=True)
    script = tmp / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    recipes = tmp / "recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / "relevance-test.yaml").write_text(
        f"max_steps: {steps}\nlearning_rate: 2.0e-5\nbatch_size: 8\ndelay: {delay}\n")

    def command(kind, recipe, progress, output):
        return [sys.executable, str(script), kind, "--recipe", recipe,
                "--progress-file", progress, "--output", output]

    return JobRunner(root=tmp / "jobs", command=command, recipes_dir=recipes)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"


def test_recipes_and_overrides(tmp_path):
    runner = fake_runner(tmp_path)
    assert list(list_recipes(runner.recipes_dir)) == ["relevance"]
    out = apply_overrides(runner.recipes_dir / "relevance-test.yaml",
                          {"steps": 3, "learning_rate": 1e-4, "batch_size": 0},
                          tmp_path / "r.yaml")
    import yaml

    cfg = yaml.safe_load(out.read_text())
    assert cfg["max_steps"] == 3 and cfg["learning_rate"] == 1e-4 and cfg["batch_size"] == 8
    with pytest.raises(ValueError, match="no batch_size setting"):
        (tmp_path / "bare.yaml").write_text("max_steps: 2\n")
        apply_overrides(tmp_path / "bare.yaml", {"batch_size": 4}, tmp_path / "x.yaml")
    with pytest.raises(ValueError, match="not a relevance recipe"):
        runner.start("relevance", "../../etc/passwd")
    with pytest.raises(ValueError, match="has no recipe"):
        runner.start("ppo", "relevance-test.yaml")


def test_torn_progress_lines_are_ignored(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"event": "start", "total": 3}\n{"event": "step", "st')
    assert [e["event"] for e in read_events(f)] == ["start"]


@pytest.mark.slow
def test_job_runs_to_completion_and_registers_the_model(tmp_path, _isolated_dirs):
    runner = fake_runner(tmp_path, steps=5, delay=0.05)
    st = runner.start("relevance", "relevance-test.yaml", {"steps": 4})
    assert st["status"] in ("starting", "running")
    with pytest.raises(ValueError, match="one job at a time"):
        runner.start("relevance", "relevance-test.yaml")
    # state survives a new runner (= a page reload or an app restart)
    st = JobRunner(root=runner.root, recipes_dir=runner.recipes_dir).wait(120)
    assert st["status"] == "done", st.get("log_tail")
    assert st["total"] == 4 and st["step"] == 4  # the override reached the trainer
    assert [s for s, _ in st["curve"]] == [1, 2, 3, 4]
    assert st["metrics"]["after"]["mrr@10"] == 0.61
    entry = ModelRegistry().get(st["name"])
    assert entry["kind"] == "relevance" and Path(entry["path"]).is_dir()
    assert ModelRegistry().active("relevance") is None  # promotion is a separate step


def test_cancel_kills_the_process_group_and_leaves_the_registry(tmp_path):
    runner = fake_runner(tmp_path, steps=100_000, delay=0.05)  # cannot finish first
    before = json.dumps(ModelRegistry().list(), sort_keys=True)
    st = runner.start("relevance", "relevance-test.yaml")
    deadline = time.time() + 30
    while runner.status()["status"] != "running" and time.time() < deadline:
        time.sleep(0.1)
    assert runner.status()["status"] == "running"
    st = runner.cancel()
    assert st["status"] == "cancelled"
    assert _pid_gone(st["pid"])
    assert not Path(st["output"]).exists()
    assert json.dumps(ModelRegistry().list(), sort_keys=True) == before
    with pytest.raises(ValueError, match="no training job is running"):
        runner.cancel()


def test_recipe_kinds_group_variants():
    from rag_app.jobs import recipe_kind

    stems = {"relevance", "relevance-tiny", "synthetic-queries", "synthetic-queries-tiny",
             "retriever-tiny"}
    assert [recipe_kind(s, stems) for s in sorted(stems)] == [
        "relevance", "relevance", "retriever", "synthetic-queries", "synthetic-queries"]


def test_shipped_recipes_group_under_their_training_types():
    """Every shipped recipe lands under a `rag train` type; synthetic-prefs(-tiny) is its own
    type, not a variant of synthetic.yaml (synthetic-queries)."""
    from rag_app.jobs import list_recipes
    from training.cli import TRAIN_TYPES

    groups = list_recipes()
    assert set(groups) <= set(TRAIN_TYPES)
    names = {k: sorted(Path(p).stem for p in v) for k, v in groups.items()}
    assert names["synthetic-prefs"] == ["synthetic-prefs", "synthetic-prefs-tiny"]
    assert names["synthetic-queries"] == ["synthetic", "synthetic-tiny"]
    assert "pretrain-ewc-tiny" in names["pretrain"]
