"""Instruction tuning (LoRA + TRL SFTTrainer): a few steps on one batch make the loss fall; the
adapter saves with its manifest, registers as a generator, reloads through the registry
("tuned") and changes the output; the training prompt IS the serving prompt; the data respect
the held-out splits and the gold-absent share."""
import json

import pytest

from rag_app.config import GenerationConfig
from rag_app.datasets import medquad_test_titles, pubmedqa_heldout_pmids
from rag_app.prompts import ANSWER_INSTRUCTION, NO_ANSWER
from training.common import EVENTS, RECIPES_DIR, load_config
from training.instruct import InstructConfig, run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("instruct")
    cfg = load_config(InstructConfig, RECIPES_DIR / "instruct-tiny.yaml",
                      ["name=instruct-tiny", "generated_instructions=1"])
    res = run(cfg, output=str(out / "run"), progress_file=str(out / "progress.jsonl"),
              activate=True)
    return cfg, res, out


@pytest.fixture(scope="module")
def base_gen(tiny_run):
    from rag_app.generate import HFGenerator

    cfg = tiny_run[0]
    return HFGenerator("base", config=GenerationConfig(max_new_tokens=16,
                                                       max_prompt_tokens=cfg.max_prompt_tokens))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint

    return AutoTokenizer.from_pretrained(ensure_base_checkpoint())


def test_loss_falls_and_adapter_registers(tiny_run):
    from rag_app.models import ModelRegistry

    cfg, res, out = tiny_run
    after = res["manifest"]["metrics_after"]
    assert after["train_loss_last"] < after["train_loss_first"], after  # same batch each step
    entry = res["entry"]
    assert entry["kind"] == "generator" and entry["name"] == "instruct-tiny"
    assert ModelRegistry().active("generator")["name"] == "instruct-tiny"
    man = json.loads(open(f"{entry['path']}/manifest.json").read())
    assert man["training_type"] == "instruct" and man["seed"] == cfg.seed
    assert man["data"]["prompt"]["module"] == "rag_app.prompts"
    assert man["config"]["max_steps"] == cfg.max_steps and "trl" not in man["config"]
    made = man["data"]["generated_instructions"]  # the base model's paraphrase, recorded
    assert len(made) == 1 and made[0] not in ANSWER_INSTRUCTION
    events = [json.loads(x) for x in open(out / "progress.jsonl")]
    assert events[0]["event"] in ("eval", "start") and events[-1]["event"] == "done"
    assert all(set(e) == {"event", "step", "total", "loss", "eta_s", "epoch", "metrics",
                          "output", "time"} and e["event"] in EVENTS for e in events)
    assert sum(e["event"] == "step" for e in events) == cfg.max_steps


def test_tuned_reloads_via_registry_and_changes_output(tiny_run, base_gen):
    from rag_app.generate import HFGenerator
    from rag_app.models import ModelRegistry

    cfg, res, _ = tiny_run
    base, adapter, name = ModelRegistry().resolve_generator("tuned")
    assert adapter == res["entry"]["path"] and name == "instruct-tiny"
    import torch

    tuned = HFGenerator("tuned", config=base_gen.config)
    ex = res["examples"][0]
    ids = base_gen.tokenizer(ex.prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():  # the next-token distribution on a training prompt moved
        la = base_gen.model(**ids).logits[0, -1]
        lb = tuned.model(**ids).logits[0, -1]
    assert tuned.adapter_path == adapter
    assert float((la - lb).abs().max()) > 1e-2
    text = tuned.generate_from_prompt(ex.prompt)  # greedy text may or may not move in 3 steps
    assert isinstance(text, str) and tuned.last_usage["new_tokens"] > 0


def test_training_prompt_is_the_serving_prompt(tiny_run, base_gen):
    cfg, res, _ = tiny_run
    for ex in res["examples"]:
        served = base_gen.prompt(ex.question, ex.sources)
        if "i" not in ex.augment:  # no instruction paraphrase: byte-identical
            assert ex.prompt == served
        else:
            assert ANSWER_INSTRUCTION in served and ANSWER_INSTRUCTION not in ex.prompt
        assert ex.completion.endswith(base_gen.tokenizer.eos_token)
        ids = base_gen.tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        assert ids == base_gen.tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]


def test_gold_absent_share_and_targets(tokenizer):
    from training.data import instruction_examples

    exs = instruction_examples(tokenizer, 40, p_no_answer=0.15, n_sources=3,
                               max_prompt_tokens=None, seed=5)
    absent = [e for e in exs if e.gold_absent]
    assert len(absent) == round(0.15 * 40)
    assert all(e.answer == NO_ANSWER for e in absent)
    for e in exs:
        if e.gold_absent:
            continue
        assert all(f"[{n}]" in e.answer for n in e.gold_numbers)
        if e.source == "pubmedqa":
            assert e.answer.split(".")[0] in ("Yes", "No", "Maybe")
        doc_groups = {s.doc_id.split("_")[0] if e.source == "pubmedqa" else s.title
                      for s in e.sources}
        assert e.group in doc_groups


def test_heldout_never_in_training_examples(tokenizer):
    from training.data import instruction_examples

    exs = instruction_examples(tokenizer, 300, n_sources=3, max_prompt_tokens=None, seed=1)
    held, test_titles = pubmedqa_heldout_pmids(), medquad_test_titles()
    assert {e.source for e in exs} == {"pubmedqa", "medquad"}
    for e in exs:
        assert e.group not in held and e.group not in test_titles
        for s in e.sources:
            assert s.doc_id.split("_")[0] not in held and s.title not in test_titles


def test_recipe_overrides_and_errors():
    cfg = load_config(InstructConfig, "instruct.yaml", ["sampling=curriculum", "max_steps=7"])
    assert cfg.sampling == "curriculum" and cfg.max_steps == 7
    with pytest.raises(ValueError, match="no room"):
        load_config(InstructConfig, "instruct.yaml", ["max_prompt_tokens=600"])
    with pytest.raises(ValueError, match="unknown InstructConfig"):
        load_config(InstructConfig, "instruct.yaml", ["bogus=1"])


def test_robustness_phrasings_and_metrics(tokenizer):
    """Each held-out question once, gold present, never a training pmid; every unseen phrasing
    replaces the serving instruction; accuracy/spread on hand-made answers."""
    from rag_app.datasets import pubmedqa_heldout_pmids
    from rag_app.prompts import ANSWER_INSTRUCTION
    from training.augment import EVAL_INSTRUCTIONS
    from training.robustness import (PHRASINGS, phrased_prompt, phrasing_metrics,
                                     robustness_items, spread)

    cfg = load_config(InstructConfig, RECIPES_DIR / "instruct.yaml")
    items = robustness_items(cfg, tokenizer)
    held = pubmedqa_heldout_pmids()
    assert len(items) > 80 and len({e.group for e, _ in items}) == len(items)
    assert all(e.group in held and e.gold_numbers for e, _ in items)
    assert {g for _, g in items} <= {"yes", "no", "maybe"}
    val = robustness_items(cfg, tokenizer, split="val")  # where settings are chosen
    assert len(val) > 20 and not {e.group for e, _ in val} & held
    with pytest.raises(ValueError, match="split"):
        robustness_items(cfg, tokenizer, split="train")
    prompt = items[0][0].prompt
    assert len(PHRASINGS) == 6 and phrased_prompt(prompt, "serving") == prompt
    for k, p in enumerate(PHRASINGS[1:]):
        new = phrased_prompt(prompt, p)
        assert EVAL_INSTRUCTIONS[k] in new and ANSWER_INSTRUCTION not in new
        assert new.replace(EVAL_INSTRUCTIONS[k], ANSWER_INSTRUCTION) == prompt
    with pytest.raises(ValueError, match="exactly once"):
        phrased_prompt("no instruction here", "unseen-1")
    m = phrasing_metrics(["Yes. It does [1].", "No.", "It is unclear", "Based on [1], yes."],
                         ["yes", "yes", "maybe", "no"])
    assert m["accuracy"] == pytest.approx(0.5) and m["yes_share"] == pytest.approx(0.5)
    assert m["decision_stated"] == pytest.approx(0.75)  # "unclear" is not a stated decision
    per = {p: {"accuracy": a} for p, a in zip(PHRASINGS, (0.9, 0.5, 0.6, 0.55, 0.7, 0.52))}
    assert spread(per) == pytest.approx(0.2)  # the serving phrasing is not counted


def test_spread_noise_tells_a_wording_lean_from_per_question_flips():
    """Identical decisions under every wording: no spread, no flips. One wording that says yes
    to everything: the spread (0.5) is far above what shuffling each question's outcomes among
    the wordings gives, and 1 in 10 decisions differ from serving's on average."""
    from training.robustness import PHRASINGS, spread_noise

    gold = ["yes"] * 10 + ["no"] * 10
    right = [{"gold": g, "answer": f"{g.capitalize()}. [1]"} for g in gold]
    same = spread_noise({p: {"rows": right} for p in PHRASINGS})
    assert same["ci95"] == [0.0, 0.0] and same["if_no_wording_effect"] == 0.0
    assert same["flip_share"] == 0.0
    lean = {p: {"rows": right} for p in PHRASINGS} | {
        "unseen-5": {"rows": [{"gold": g, "answer": "Yes, it does."} for g in gold]}}
    res = spread_noise(lean, seed=1)
    assert 0.0 < res["if_no_wording_effect"] < res["ci95"][0] <= 0.5 <= res["ci95"][1]
    assert res["flip_share"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same"):
        spread_noise(lean | {"unseen-2": {"rows": right[:3]}})


def test_robustness_and_curves_commands(tiny_run, tmp_path, capsys):
    from rag_app.cli import main

    out = tmp_path / "rob.json"
    assert main(["eval", "robustness", "--model", "base", "--model", "tuned=instruct-tiny",
                 "--limit", "2", "--max-new-tokens", "2", "--batch-size", "6", "--out",
                 str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 2 and list(res["models"]) == ["base", "tuned"]
    for m in res["models"].values():
        assert len(m["phrasings"]) == 6 and all(len(v["rows"]) == 2
                                                for v in m["phrasings"].values())
        assert all("decision_auc" in v and all(isinstance(r["yes_no_logodds"], float)
                                               for r in v["rows"])
                   for v in m["phrasings"].values())
    printed = capsys.readouterr().out
    assert out.with_suffix(".png").is_file() and "spread" in printed
    assert "AUC yes-vs-no" in printed and "with no wording effect" in printed
    assert all(0 <= m["spread_noise"]["flip_share"] <= 1 for m in res["models"].values())
    yes = next(ln for ln in printed.splitlines() if ln.startswith("  share yes")).split()[2:]
    assert [float(v) for v in yes] == pytest.approx(
        [res["models"]["base"]["phrasings"][p]["yes_share"] for p in res["models"]["base"][
            "phrasings"]], abs=5e-4)
    import subprocess
    import sys

    again = subprocess.run([sys.executable, "-m", "training.robustness", str(out)],
                           capture_output=True, text=True, check=True).stdout
    assert again.strip() and again.strip() in printed
    cur = tmp_path / "curves.json"
    assert main(["eval", "curves", "--model", "a=instruct-tiny", "--out", str(cur)]) == 0
    c = json.loads(cur.read_text())["models"]["a"]
    assert c["sampling"] == "random" and len(c["log"]) == tiny_run[0].max_steps
    assert cur.with_suffix(".png").is_file()
    capsys.readouterr()
    assert main(["eval", "curves"]) == 2 and "no --model" in capsys.readouterr().err


def test_robustness_calibrated_on_content_free_prompts(tmp_path, capsys):
    """--calibrate: under each phrasing the content-free prompt's yes-vs-no log-odds (what the
    wording alone leans to) is measured, saved and printed; it differs between wordings, and
    decision_bias offsets "Yes"/"No" by it. "relative" leaves the serving answers as they
    are (its offset there is 0); an unknown mode is refused."""
    import torch

    from rag_app.cli import main
    from training.common import load_config
    from training.policy import load_causal
    from training.qa import decision_logodds
    from training.robustness import (PHRASINGS, content_free_logodds, decision_bias,
                                     eval_robustness)

    out = tmp_path / "cal.json"
    assert main(["eval", "robustness", "--calibrate", "relative", "--model", "base",
                 "--limit", "2", "--max-new-tokens", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    per = res["models"]["base"]["phrasings"]
    assert res["calibrate"] == "relative" and list(per) == list(PHRASINGS)
    cf = [per[p]["content_free_logodds"] for p in PHRASINGS]
    assert len(set(cf)) > 1 and "content-free log-odds" in capsys.readouterr().out
    cfg = load_config(InstructConfig, RECIPES_DIR / "instruct.yaml", [])
    plain = eval_robustness(["base"], cfg, 2, 3)["models"]["base"]["phrasings"]
    assert plain["serving"]["rows"] == per["serving"]["rows"]
    with pytest.raises(ValueError, match="calibrate"):
        eval_robustness(["base"], cfg, 2, 3, calibrate="yes")
    from rag_app.generate import ensure_base_checkpoint

    model, tok = load_causal(str(ensure_base_checkpoint()))
    c = content_free_logodds(model, tok, "unseen-3", res["n_sources"])
    assert c == pytest.approx(per["unseen-3"]["content_free_logodds"], abs=1e-3)
    logits = torch.zeros(1, len(tok))
    for t, b in decision_bias(tok, c).items():
        logits[0, t] += b
    assert decision_logodds(tok, list(logits))[0] + c == pytest.approx(0, abs=1e-6)


def test_matched_offsets_equalise_the_yes_share_on_the_pool():
    """Each wording's offset makes as many pool questions get "Yes" as under the serving
    instruction (whose offset is 0), halfway between neighbouring pool values; all-yes and
    all-no serving pools and mismatched pools are handled."""
    from training.robustness import matched_offsets

    pool = {"serving": [-1.0, 0.5, 2.0, 3.0], "unseen-1": [-2.0, -5.0, -3.0, -4.0],
            "unseen-2": [9.0, 7.0, 8.0, 6.0]}
    off = matched_offsets(pool)
    assert off == {"serving": 0.0, "unseen-1": -4.5, "unseen-2": 6.5}
    for p, xs in pool.items():
        assert sum(x - off[p] > 0 for x in xs) == 3
    assert matched_offsets({"serving": [1.0, 2.0], "a": [5.0, -1.0]})["a"] == -2.0
    assert matched_offsets({"serving": [-1.0, -2.0], "a": [5.0, -1.0]})["a"] == 6.0
    with pytest.raises(ValueError, match="same"):
        matched_offsets({"serving": [1.0, 2.0], "a": [1.0]})


def test_robustness_matched_on_unlabelled_training_questions(tokenizer, tmp_path, capsys):
    """--calibrate matched reads each wording's lean on training-side questions only (never a
    validation or held-out one), saves and prints the offsets and the raw pool shares, and
    leaves the serving answers as an uncalibrated run gives them."""
    from rag_app.cli import main
    from rag_app.datasets import pubmedqa_heldout_pmids
    from training.data import _val_bucket
    from training.robustness import PHRASINGS, eval_robustness, pool_items

    cfg = load_config(InstructConfig, RECIPES_DIR / "instruct.yaml", [])
    pool = pool_items(cfg, tokenizer, 6)
    ids = {e.group for e in pool}
    assert len(ids) == 6 and len({e.prompt for e in pool}) == 6
    assert not ids & pubmedqa_heldout_pmids() and not any(_val_bucket(i, 0.1) for i in ids)
    with pytest.raises(ValueError, match="pool"):
        pool_items(cfg, tokenizer, 0)
    out = tmp_path / "matched.json"
    assert main(["eval", "robustness", "--calibrate", "matched", "--pool", "4", "--model",
                 "base", "--limit", "2", "--max-new-tokens", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    per = res["models"]["base"]["phrasings"]
    assert res["calibrate"] == "matched" and res["pool"] == {"split": "train", "n": 4,
                                                             "labels_used": False}
    assert per["serving"]["offset"] == 0 and len({per[p]["offset"] for p in PHRASINGS}) > 1
    assert all(per[p]["pool_yes_share"] in (0, 0.25, 0.5, 0.75, 1) for p in PHRASINGS)
    printed = capsys.readouterr().out
    assert "log-odds offset" in printed and "pool yes share" in printed
    plain = eval_robustness(["base"], cfg, 2, 3)["models"]["base"]["phrasings"]
    assert plain["serving"]["rows"] == per["serving"]["rows"]


def test_consistency_pairs_differ_only_in_the_instruction(tokenizer):
    """Each example is followed by its twin: the same prompt under another TRAINING
    instruction, the same completion; no evaluation phrasing is accepted; an example without
    an instruction is paired with itself."""
    from dataclasses import replace

    from rag_app.prompts import ANSWER_INSTRUCTION
    from training.augment import EVAL_INSTRUCTIONS, TRAIN_INSTRUCTIONS, consistency_pairs
    from training.data import instruction_examples

    exs = instruction_examples(tokenizer, 6, "train", ("pubmedqa", "medquad"), 0.5, 2, 1, 0.0,
                               300, 30, 0)
    bare = replace(exs[0], prompt="a prompt without the instruction")
    pairs = consistency_pairs(exs + [bare], tokenizer, seed=3)
    assert len(pairs) == 2 * (len(exs) + 1) and pairs[-1] is pairs[-2] is bare
    wordings = (ANSWER_INSTRUCTION,) + TRAIN_INSTRUCTIONS
    for e, t in zip(pairs[0:-2:2], pairs[1:-2:2]):
        held = [w for w in wordings if w in e.prompt]
        new = [w for w in wordings if w in t.prompt]
        assert len(held) == len(new) == 1 and held != new and t.completion == e.completion
        assert t.prompt.replace(new[0], held[0]) == e.prompt and t.augment.endswith("twin")
        assert t.prompt_tokens == len(tokenizer(t.prompt, add_special_tokens=False)["input_ids"])
    assert consistency_pairs(exs, tokenizer, max_length=exs[0].prompt_tokens) == []
    with pytest.raises(ValueError, match="evaluation phrasing"):
        consistency_pairs(exs, tokenizer, EVAL_INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match="even batch"):
        load_config(InstructConfig, RECIPES_DIR / "instruct-tiny.yaml",
                    ["consistency=1", "batch_size=3"])


def test_pair_divergence_compares_the_answer_tokens_of_each_pair():
    """Zero when the two rows give the same distributions at their answer tokens (whatever
    the prompts' lengths), positive and differentiable when they differ, blind to prompt
    positions."""
    import torch

    from training.instruct import pair_divergence

    torch.manual_seed(0)
    answer = torch.randn(3, 11)
    logits = torch.randn(2, 8, 11)
    logits[0, 3:6], logits[1, 4:7] = answer, answer  # row 1's prompt is one token longer
    labels = torch.full((2, 8), -100)
    labels[0, 4:7], labels[1, 5:8] = 1, 1
    assert float(pair_divergence(logits, labels)) == pytest.approx(0, abs=1e-6)
    logits[1, 0:3] += 5.0  # prompt positions do not count
    assert float(pair_divergence(logits, labels)) == pytest.approx(0, abs=1e-6)
    moved = logits.clone().requires_grad_()
    with torch.no_grad():
        moved[1, 5] += torch.randn(11)
    div = pair_divergence(moved, labels)
    div.backward()
    assert float(div.detach()) > 0.01 and float(moved.grad.abs().sum()) > 0


def test_consistency_training_runs_on_twin_pairs(tmp_path):
    """A tiny instruct run with consistency > 0 trains on [example, twin] pairs, logs the
    pair KL at every step, and saves an adapter."""
    import json as _json
    from pathlib import Path

    cfg = load_config(InstructConfig, RECIPES_DIR / "instruct-tiny.yaml",
                      ["name=instruct-consistency-tiny", "consistency=1.0", "max_steps=4",
                       "n_examples=4"])
    res = run(cfg, output=str(tmp_path / "run"))
    exs = res["examples"]
    assert len(exs) == 8 and all(t.augment.endswith("twin") or t is e
                                 for e, t in zip(exs[::2], exs[1::2]))
    state = _json.loads(next((tmp_path / "run").glob("checkpoint-*/trainer_state.json"))
                        .read_text())
    kls = [h["pair_kl"] for h in state["log_history"] if "pair_kl" in h]
    assert len(kls) == state["global_step"] >= 2 and min(kls) >= 0 and max(kls) > 0
    assert (Path(res["entry"]["path"]) / "adapter_config.json").is_file()


def _trainer_on(tokenizer, examples, out, overrides):
    """A fresh packaged model in make_trainer, on instruct-tiny.yaml + `overrides`."""
    import torch
    from transformers import AutoModelForCausalLM

    from rag_app.generate import ensure_base_checkpoint
    from training.common import ProgressCallback
    from training.instruct import make_trainer

    cfg = load_config(InstructConfig, RECIPES_DIR / "instruct-tiny.yaml", overrides)
    model = AutoModelForCausalLM.from_pretrained(ensure_base_checkpoint(), dtype=torch.float32)
    return make_trainer(cfg, model, tokenizer, examples, [], out, ProgressCallback(None))


def test_label_smoothing_mixes_the_uniform_cross_entropy_into_the_loss(tokenizer, tmp_path):
    """label_smoothing=eps makes the trainer's loss (1 - eps) x the answer tokens' NLL + eps x
    their mean cross-entropy against the uniform distribution (transformers' LabelSmoother),
    on the same batch; out-of-range values are refused."""
    import torch

    from training.data import instruction_examples

    examples = instruction_examples(tokenizer, 4, n_sources=1, max_prompt_tokens=120, seed=0)
    losses, manual = {}, None
    for eps in (0.0, 0.1):
        trainer = _trainer_on(tokenizer, examples, tmp_path / str(eps),
                              [f"label_smoothing={eps}"])
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.eval()
        with torch.no_grad():
            losses[eps] = float(trainer.compute_loss(trainer.model, dict(batch)))
            if manual is None:
                logp = trainer.model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]
                                     ).logits[:, :-1].float().log_softmax(-1)
                labels = batch["labels"][:, 1:]
                mask = labels != -100
                nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][mask].mean()
                manual = (float(nll), float(-logp.mean(-1)[mask].mean()))
    assert losses[0.0] == pytest.approx(manual[0], rel=1e-3)
    assert losses[0.1] == pytest.approx(0.9 * manual[0] + 0.1 * manual[1], rel=1e-3)
    assert losses[0.1] > losses[0.0] + 0.1  # the uniform term is large for a 49k vocabulary
    for bad in ("-0.1", "1.0"):
        with pytest.raises(ValueError, match="label_smoothing"):
            load_config(InstructConfig, "instruct.yaml", [f"label_smoothing={bad}"])


def test_neftune_noises_the_embeddings_while_training_only(tokenizer, tmp_path):
    """neftune_noise_alpha > 0 hands transformers' NEFTune the scale: the same first step on
    the same batch and seed logs a different loss than alpha 0 (noised input embeddings),
    and after training the embeddings are the plain lookup again; negative values are
    refused."""
    import torch

    from training.data import instruction_examples

    examples = instruction_examples(tokenizer, 2, n_sources=1, max_prompt_tokens=120, seed=0)
    first_loss = {}
    for alpha in (0.0, 5.0):
        trainer = _trainer_on(tokenizer, examples, tmp_path / str(alpha),
                              [f"neftune_noise_alpha={alpha}", "max_steps=1", "save_steps=10"])
        assert trainer.args.neftune_noise_alpha == (alpha or None)
        trainer.train()
        first_loss[alpha] = trainer.state.log_history[0]["loss"]
        embed = trainer.model.get_input_embeddings()
        ids = torch.tensor([[1, 2, 3, 4]])
        trainer.model.train()
        with torch.no_grad():
            assert torch.equal(embed(ids), embed.weight[ids])
    assert first_loss[0.0] != first_loss[5.0]
    assert abs(first_loss[0.0] - first_loss[5.0]) < 1.0  # noise, not a different model
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        load_config(InstructConfig, "instruct.yaml", ["neftune_noise_alpha=-1"])
