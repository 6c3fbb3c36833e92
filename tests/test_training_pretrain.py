"""Continued pre-training, few-step runs on the real packaged models:
- SmolLM2, causal LM, LoRA (merged on save) + EWC: the LM loss on the repeated batch falls, the
  held-out domain perplexity moves, the penalty is 0 at the starting weights and > 0 once they
  moved, before/after JSON + PNG are written, the result registers as a "base" that reloads
  (same perplexity), generates, and that instruction tuning resolves as its base model;
- MiniLM, masked LM, full fine-tuning + SI: a NEW head tied to the word embeddings, stated in
  the manifest; resumable from its checkpoint; `rag eval lm` on the registered result."""
import json

import pytest
import torch

from rag_app.config import models_dir
from training.common import EVENTS, load_config
from training.pretrain import PretrainConfig, run


def lm_losses(manifest: dict) -> list[tuple[float, float]]:
    """(training loss without the penalty, penalty) per logged step."""
    return [(r["loss"] - r.get("penalty", 0.0), r.get("penalty", 0.0))
            for r in manifest["train_log"] if "loss" in r]


@pytest.fixture(scope="module")
def ewc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(PretrainConfig, "pretrain-ewc-tiny.yaml", ["name=pretrain-ewc-tiny"])
    res = run(cfg, output=str(out / "run"), progress_file=str(out / "progress.jsonl"))
    return cfg, res, out


def test_clm_lora_ewc_trains_with_penalty_and_registers(ewc_run):
    cfg, res, out = ewc_run
    man = res["manifest"]
    steps = lm_losses(man)
    assert len(steps) == cfg.max_steps
    assert steps[-1][0] < steps[0][0], steps  # the same 2 blocks every step
    assert steps[0][1] == 0.0 and steps[-1][1] > 0  # penalty: 0 at theta0, > 0 once moved
    before, after = res["before"]["domain-heldout"], res["after"]["domain-heldout"]
    assert before["blocks"] == after["blocks"] == cfg.eval_blocks
    assert after["nll"] != before["nll"]
    reg = man["data"]["regularizer"]
    assert reg["kind"] == "ewc" and "Fisher" in reg["how"] and reg["penalised"]["mean"] == \
        pytest.approx(1.0, rel=1e-4)
    assert man["data"]["training"].startswith("LoRA") and man["data"]["objective"] == "clm"
    assert man["data"]["split"]["by"].startswith("document")
    assert man["data"]["lineage"][-1]["training_type"] == "pretrain"
    entry = res["entry"]
    assert entry["kind"] == "base" and entry["training_type"] == "pretrain"
    assert entry["path"] == str(models_dir() / "pretrained" / "pretrain-ewc-tiny")
    report = json.loads((out / "run" / "lm_eval.json").read_text())
    assert set(report["models"]) == {"before", "after"}
    assert set(report["models"]["after"]) == {"domain-heldout", "general"}
    assert (out / "run" / "lm_eval.png").stat().st_size > 1000
    events = [json.loads(x) for x in open(out / "progress.jsonl")]
    assert all(set(e) == {"event", "step", "total", "loss", "eta_s", "epoch", "metrics",
                          "output", "time"} and e["event"] in EVENTS for e in events)
    assert events[-1]["event"] == "done" and events[-1]["output"] == entry["path"]
    assert sum(e["event"] == "step" for e in events) == cfg.max_steps


def test_saved_base_reloads_generates_and_is_an_instruct_base(ewc_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rag_app.models import ModelRegistry
    from training.instruct import resolve_base_generator
    from training.lm_eval import eval_blocks, perplexity

    cfg, res, _ = ewc_run
    path = res["entry"]["path"]
    assert resolve_base_generator("pretrain-ewc-tiny") == path
    assert ModelRegistry().resolve_generator("pretrain-ewc-tiny") == (path, None,
                                                                      "pretrain-ewc-tiny")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    blocks = eval_blocks("domain-heldout", tok, cfg.block_size, cfg.eval_blocks,
                         cfg.heldout_fraction, cfg.split_seed)
    again = perplexity(model, tok, blocks, "clm", cfg.eval_batch_size)
    assert again["nll"] == pytest.approx(res["after"]["domain-heldout"]["nll"], abs=1e-4)
    prompt = tok("Diabetes is", return_tensors="pt")
    with torch.inference_mode():
        gen = model.generate(**prompt, max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 3


def test_mlm_minilm_full_si_new_tied_head_resume_and_eval_cli(tmp_path):
    from transformers import AutoModelForMaskedLM

    from rag_app.cli import main

    sets = ["base_model=minilm", "lora=false", "learning_rate=1e-4", "save_steps=1",
            "name=mlm-si-tiny"]
    cfg = load_config(PretrainConfig, "pretrain-si-tiny.yaml", sets + ["max_steps=2"])
    res = run(cfg, output=str(tmp_path / "run"), progress_file=str(tmp_path / "p.jsonl"))
    man = res["manifest"]
    head = man["data"]["mlm_head"]
    assert man["data"]["objective"] == "mlm" and man["data"]["training"] == "full"
    assert head["new_head"] and head["tied_to_word_embeddings"] and "tied" in head["note"]
    assert any(k.startswith("cls.predictions") for k in head["newly_initialised"])
    assert "SI" in man["data"]["regularizer"]["how"]
    steps = lm_losses(man)
    assert steps[0][1] == 0.0 and steps[1][1] > 0
    assert res["after"]["domain-heldout"]["nll"] != res["before"]["domain-heldout"]["nll"]
    # resume: one more step from checkpoint-2; before-metrics and importance are reused
    cfg3 = load_config(PretrainConfig, "pretrain-si-tiny.yaml", sets + ["max_steps=3"])
    res3 = run(cfg3, output=str(tmp_path / "run"), progress_file=str(tmp_path / "p3.jsonl"),
               resume=True)
    events = [json.loads(x) for x in open(tmp_path / "p3.jsonl")]
    assert [e["step"] for e in events if e["event"] == "step"] == [3]
    assert res3["before"] == res["before"]
    model = AutoModelForMaskedLM.from_pretrained(res3["entry"]["path"])
    assert model.get_output_embeddings().weight.data_ptr() == \
        model.get_input_embeddings().weight.data_ptr()
    out = tmp_path / "lm.json"
    assert main(["eval", "lm", "--model", "mlm-si-tiny", "--model", "minilm", "--text",
                 "general", "--limit", "1", "--block-size", "64", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["models"]
    assert got["mlm-si-tiny"]["general"]["objective"] == "mlm"
    assert got["mlm-si-tiny"]["general"]["nll"] == pytest.approx(  # same blocks, same masks
        res3["after"]["general"]["nll"], abs=1e-4)
    assert got["minilm"]["general"]["new_mlm_head"] is True
    assert out.with_suffix(".png").exists()


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Two seeds launched together once shared runs/pretrain-<second> (and would have shared
    its checkpoints); each run now gets a folder of its own, and --output is kept as given."""
    import time

    from training import common

    monkeypatch.setattr(common, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261204-221833")
    a, b, c = (common.run_dir("pretrain", None) for _ in range(3))
    assert len({a, b, c}) == 3 and all(p.is_dir() for p in (a, b, c))
    assert [p.name for p in (a, b, c)] == ["pretrain-20261204-221833",
                                           "pretrain-20261204-221833-2",
                                           "pretrain-20261204-221833-3"]
    given = tmp_path / "mine"
    assert common.run_dir("pretrain", str(given)) == given == common.run_dir("pretrain",
                                                                            str(given))
