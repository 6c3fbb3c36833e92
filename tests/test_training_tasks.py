"""Single-task tuning (summarize, qa) through the instruct machinery: a few LoRA steps on one
batch make the loss fall; the adapter saves with its manifest, registers as a generator,
reloads through the registry and moves the output; --resume continues from the checkpoint;
the held-out splits are stable and never trained on; training and evaluation render the same
prompt for the same row; the metrics are right on hand-made strings; `rag eval summarize` and
`rag eval qa-gold` run end to end (2 rows, 4 new tokens) and save JSON + PNG."""
import json
from collections import Counter

import pytest

from training.common import EVENTS, RECIPES_DIR, load_config
from training.qa import QAConfig, pubmedqa_rows, qa_metrics, qa_prompt
from training.summarize import (SummarizeConfig, meqsum_rows, mediqa_rows, summary_metrics,
                                summary_prompt)

TASKS = {"summarize": (SummarizeConfig, "summarize-tiny.yaml"), "qa": (QAConfig, "qa-tiny.yaml")}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from training.qa import run as run_qa
    from training.summarize import run as run_sum

    out, res = tmp_path_factory.mktemp("tasks"), {}
    for kind, run in (("summarize", run_sum), ("qa", run_qa)):
        cls, recipe = TASKS[kind]
        cfg = load_config(cls, RECIPES_DIR / recipe, [f"name={kind}-tiny"])
        res[kind] = (cfg, run(cfg, output=str(out / kind), progress_file=str(
            out / f"{kind}.jsonl")), out)
    return res


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint

    return AutoTokenizer.from_pretrained(ensure_base_checkpoint())


@pytest.fixture(scope="module")
def causal_lm():
    """The base generator as policy.load_causal loads it (left padding, a pad token), with its
    own tokenizer, so the `tokenizer` fixture stays as it is; plus a chat-prompt maker."""
    from rag_app.generate import ensure_base_checkpoint
    from training.policy import load_causal

    model, tok = load_causal(str(ensure_base_checkpoint()))

    def chat(*questions):
        return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                        add_generation_prompt=True) for q in questions]
    return model, tok, chat


@pytest.mark.parametrize("kind", ["summarize", "qa"])
def test_loss_falls_and_adapter_registers(tiny_runs, kind):
    from rag_app.models import ModelRegistry

    cfg, res, out = tiny_runs[kind]
    after = res["manifest"]["metrics_after"]
    assert after["train_loss_last"] < after["train_loss_first"], after  # same batch each step
    entry = res["entry"]
    assert entry["kind"] == "generator" and entry["name"] == f"{kind}-tiny"
    assert ModelRegistry().get(f"{kind}-tiny")["training_type"] == kind
    man = json.loads(open(f"{entry['path']}/manifest.json").read())
    assert man["training_type"] == kind and man["seed"] == cfg.seed
    assert man["data"]["prompt"]["module"] == "training.tasks"
    assert man["data"]["train"]["n"] == cfg.n_examples
    events = [json.loads(x) for x in open(out / f"{kind}.jsonl")]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert all(e["event"] in EVENTS for e in events)
    assert sum(e["event"] == "step" for e in events) == cfg.max_steps
    assert all(e.completion.endswith(res["tokenizer"].eos_token) for e in res["examples"])


@pytest.mark.parametrize("kind", ["summarize", "qa"])
def test_reloads_via_registry_and_changes_output(tiny_runs, kind):
    import torch

    from training.tasks import models_to_compare

    cfg, res, _ = tiny_runs[kind]
    ex = res["examples"][0]
    last = {}
    for label, name, model, tok in models_to_compare(["base", f"{kind}-tiny"]):
        ids = tok(ex.prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            last[label] = model(**ids).logits[0, -1]
        if label != "base":
            assert name == f"{kind}-tiny" and hasattr(model, "peft_config")
    assert float((last["base"] - last[f"{kind}-tiny"]).abs().max()) > 1e-2


@pytest.mark.parametrize("kind", ["summarize", "qa"])
def test_validation_scoring_refuses_a_model_that_trained_on_it(tiny_runs, tmp_path, kind):
    """A final fit on the whole training side (val_fraction 0) cannot be scored on --split
    val: refused, naming the model, before anything loads; the held-out fold still takes it,
    and a model that kept the slice aside passes the check."""
    import shutil

    from training.qa import eval_qa_gold
    from training.summarize import eval_summarize
    from training.tasks import trained_on_val

    cfg, res, _ = tiny_runs[kind]
    kept = res["entry"]["path"]
    full = tmp_path / f"{kind}-full-fit"
    shutil.copytree(kept, full)
    man = json.loads((full / "manifest.json").read_text())
    man["config"]["val_fraction"] = 0.0
    (full / "manifest.json").write_text(json.dumps(man))
    assert trained_on_val(str(full), kind, cfg.val_fraction)
    assert not trained_on_val(kept, kind, cfg.val_fraction)
    assert not trained_on_val(str(full), "qa" if kind == "summarize" else "summarize",
                              cfg.val_fraction)  # another task's slice is not this one
    assert not trained_on_val(None, kind, cfg.val_fraction)
    run_eval = eval_summarize if kind == "summarize" else eval_qa_gold
    with pytest.raises(ValueError, match=f"{kind}-full-fit was trained on the {kind} "
                                         "validation slice.*--split eval"):
        run_eval([kept, str(full)], cfg, limit=1, max_new_tokens=2, split="val")
    res_eval = run_eval([f"full={full}"], cfg, limit=1, max_new_tokens=2, split="eval")
    assert res_eval["n"] == 1 and "full" in res_eval["models"]


def test_resume_continues_from_the_checkpoint(tiny_runs):
    from training.summarize import run

    cfg, res, out = tiny_runs["summarize"]
    assert (out / "summarize" / f"checkpoint-{cfg.max_steps}").is_dir()
    more = load_config(SummarizeConfig, RECIPES_DIR / "summarize-tiny.yaml",
                       ["name=summarize-tiny-resumed", f"max_steps={cfg.max_steps + 1}"])
    run(more, output=str(out / "summarize"), progress_file=str(out / "resumed.jsonl"),
        resume=True)
    events = [json.loads(x) for x in open(out / "resumed.jsonl")]
    assert events[0]["event"] == "start" and events[0]["step"] == cfg.max_steps
    assert [e["step"] for e in events if e["event"] == "step"] == [cfg.max_steps + 1]


def test_heldout_splits_are_stable_and_never_trained_on(tokenizer):
    from rag_app.datasets import (MEQSUM_HELDOUT_FILE, _bucket, meqsum_heldout_files,
                                  meqsum_records, pubmedqa_heldout_pmids)
    from training.qa import build_examples as qa_examples
    from training.summarize import build_examples as sum_examples

    held = meqsum_heldout_files()
    assert MEQSUM_HELDOUT_FILE.is_file() and 100 <= len(held) <= 160
    assert held == {r["File"] for r in meqsum_records() if _bucket(r["File"], 8) == 0}
    splits = {s: [r["id"] for r in meqsum_rows(s)] for s in ("train", "val", "eval")}
    assert set(splits["eval"]) == held and sum(map(len, splits.values())) == 1000
    assert not (set(splits["train"]) & set(splits["val"])) and not (set(splits["train"]) & held)
    cfg = load_config(SummarizeConfig, "summarize.yaml",
                      ["sources=meqsum,mediqa-question,mediqa-answer", "n_examples=0"])
    train = sum_examples(cfg, tokenizer, "train")
    assert not {e.id for e in train} & held and {e.source for e in train} == set(
        cfg.source_list)
    assert [e.id for e in train] == [e.id for e in sum_examples(cfg, tokenizer, "train")]
    held_text = {" ".join(r["CHQ"].split()) for r in meqsum_records() if r["File"] in held}
    assert not {r["text"] for r in mediqa_rows("mediqa-question")} & held_text
    qcfg = load_config(QAConfig, "qa.yaml")
    qtrain = {e.id for e in qa_examples(qcfg, tokenizer, "train")}
    qval = {e.id for e in qa_examples(qcfg, tokenizer, "val")}
    qeval = {r["id"] for r in pubmedqa_rows("eval")}
    assert qeval == pubmedqa_heldout_pmids() and not (qtrain | qval) & qeval
    assert not qtrain & qval and len(qtrain) + len(qval) + len(qeval) == 500


def test_train_and_eval_prompts_are_the_same_string(tokenizer):
    from training.qa import build_examples as qa_examples
    from training.summarize import build_examples as sum_examples

    cfg = load_config(SummarizeConfig, "summarize.yaml")
    rows = {r["id"]: r for s in ("train", "eval") for r in meqsum_rows(s, cfg.val_fraction)}
    for split in ("train", "eval"):  # eval = what `rag eval summarize` generates from
        for e in sum_examples(cfg, tokenizer, split)[:20]:
            assert e.prompt == summary_prompt(tokenizer, rows[e.id], cfg.max_source_tokens)
            assert "Summarise this question" in e.prompt
            ids = tokenizer(e.prompt, add_special_tokens=True)["input_ids"]
            assert ids == tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
    qcfg = load_config(QAConfig, "qa.yaml")
    qrows = {r["id"]: r for s in ("train", "eval") for r in pubmedqa_rows(s)}
    for split in ("train", "eval"):
        for e in qa_examples(qcfg, tokenizer, split)[:20]:
            assert e.prompt == qa_prompt(tokenizer, qrows[e.id], qcfg.max_source_tokens)
            assert e.target.split(".")[0].lower() == e.label
            assert e.prompt_tokens + len(tokenizer(e.completion, add_special_tokens=False)[
                "input_ids"]) <= qcfg.max_length


def test_metrics_on_handmade_strings():
    m = summary_metrics(["what are the treatments for kidney stones", "What causes asthma?"],
                        ["what are treatments for gallstones", "What causes asthma?"])
    # pair 1: unigrams 4 common of 7 / 5 -> F 2/3; bigrams 2 of 6 / 4 -> F 0.4; LCS 4 -> 2/3
    assert m["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["rouge2"] == pytest.approx((0.4 + 1) / 2)
    assert m["rougeL"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["mean_words"] == pytest.approx((7 + 3) / 2) and m["n"] == 2
    q = qa_metrics(["Yes. It works.", "No, it does not.", "The results are unclear.", "Maybe."],
                   ["yes", "no", "no", "maybe"], ["It works.", "x", "y", "Maybe."], "yes")
    assert q["accuracy"] == pytest.approx(0.75) and q["majority_baseline"] == pytest.approx(0.25)
    assert q["predicted"] == {"yes": 1, "no": 1, "maybe": 2}
    assert q["rouge_l"] == pytest.approx((0.8 + 0 + 0 + 1) / 4)  # "yes it work" vs "it work"
    with pytest.raises(ValueError, match="references"):
        summary_metrics(["a"], [])


@pytest.mark.parametrize("what,kind", [("summarize", "summarize"), ("qa-gold", "qa")])
def test_eval_commands_end_to_end(tiny_runs, tmp_path, capsys, what, kind):
    from rag_app.cli import main

    out = tmp_path / f"{what}.json"
    beams = ["--num-beams", "2", "--length-penalty", "1.5", "--mbr"] if what == "summarize" \
        else []
    assert main(["eval", what, "--model", "base", "--model", f"tuned={kind}-tiny", "--limit",
                 "2", "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out)]
                + beams) == 0
    res = json.loads(out.read_text())
    assert list(res["models"]) == ["base", "tuned"] and res["n"] == 2
    assert out.with_suffix(".png").is_file()
    text = capsys.readouterr().out
    assert "base" in text and "tuned" in text
    if what == "qa-gold":
        assert "majority baseline" in text and res["models"]["base"]["majority_label"] == "yes"
        for m in res["models"].values():
            assert all(isinstance(r["yes_no_logodds"], float) for r in m["rows"])
    else:
        assert all(len(r["summary"].split()) <= 4 for r in res["models"]["tuned"]["rows"])
        assert res["num_beams"] == 2 and res["length_penalty"] == 1.5 and res["mbr"] is True
        assert "beam search, 2 beams, length penalty 1.5, consensus (MBR) beam" in text
    assert res["split"] == "eval" and res["split_file"].startswith("rag_app/splits/")


@pytest.mark.parametrize("what", ["summarize", "qa-gold"])
def test_eval_commands_on_the_validation_slice(tiny_runs, tmp_path, what):
    """--split val scores the training side's validation slice (to choose settings on),
    disjoint from the held-out fold; --split train is refused."""
    from rag_app.cli import main

    out = {s: tmp_path / f"{what}-{s}.json" for s in ("val", "eval")}
    for s, f in out.items():
        assert main(["eval", what, "--model", "base", "--split", s, "--limit", "2",
                     "--max-new-tokens", "2", "--batch-size", "2", "--out", str(f)]) == 0
    val, ev = (json.loads(out[s].read_text()) for s in ("val", "eval"))
    assert val["split"] == "val" and val["split_file"] is None and "val" in val["dataset"]
    ids = [{r["id"] for r in res["models"]["base"]["rows"]} for res in (val, ev)]
    assert ids[0] and not ids[0] & ids[1]
    with pytest.raises(SystemExit):
        main(["eval", what, "--model", "base", "--split", "train"])


def test_decision_auc_measures_separation_of_yes_from_no():
    from training.qa import decision_auc

    assert decision_auc([2.0, 1.0, -1.0, -2.0], ["yes", "yes", "no", "no"]) == 1.0
    assert decision_auc([2.0, 1.0, -1.0, -2.0], ["no", "no", "yes", "yes"]) == 0.0
    assert decision_auc([1.0, 1.0, 3.0, 0.0], ["yes", "no", "yes", "no"]) == 0.875
    assert decision_auc([1.0, 2.0], ["yes", "maybe"]) is None


def test_cli_ui_recipes_and_errors():
    from rag_app.cli import build_parser
    from rag_app.jobs import JobRunner, list_recipes

    p = build_parser()
    for kind in ("summarize", "qa"):
        a = p.parse_args(["train", kind, "--set", "max_steps=2", "--resume", "--activate"])
        assert a.kind == kind and a.resume and a.activate
    recipes = list_recipes()
    assert {"summarize.yaml", "summarize-tiny.yaml"} == {r.split("/")[-1]
                                                          for r in recipes["summarize"]}
    assert {"qa.yaml", "qa-tiny.yaml"} == {r.split("/")[-1] for r in recipes["qa"]}
    assert JobRunner.default_command("qa", "qa-tiny.yaml", "p", "o")[3:5] == ["train", "qa"]
    for kind, (cls, recipe) in TASKS.items():
        load_config(cls, recipe[:-len("-tiny.yaml")] + ".yaml")  # the real recipes validate
    with pytest.raises(ValueError, match="sources"):
        load_config(SummarizeConfig, "summarize.yaml", ["sources=meqsum,bogus"])
    with pytest.raises(ValueError, match="sources"):
        load_config(QAConfig, "qa.yaml", ["sources=medquad"])
    with pytest.raises(ValueError, match="leave no room"):
        load_config(QAConfig, "qa.yaml", ["max_source_tokens=400"])
    with pytest.raises(ValueError, match="no --model"):
        from training.tasks import models_to_compare
        next(models_to_compare([]))


def test_balanced_labels_repeat_minority_rows_to_the_majority_count():
    from training.qa import balanced

    rows = pubmedqa_rows("train")
    counts = Counter(r["decision"] for r in rows)
    out = balanced(rows, 0)
    top = max(counts.values())
    assert Counter(r["decision"] for r in out) == {d: top for d in counts}
    ids = Counter(r["id"] for r in out)
    assert set(ids) == {r["id"] for r in rows}  # every row kept
    for d, n in counts.items():  # repeats spread evenly: all rows once before any twice
        reps = [ids[r["id"]] for r in rows if r["decision"] == d]
        assert max(reps) - min(reps) <= 1 and sum(reps) == top
    assert balanced(rows, 0) == out and balanced(rows, 1) != out


def test_conclusion_share_adds_bare_decision_reading_examples(tokenizer):
    from training.qa import build_examples

    cfg = load_config(QAConfig, "qa.yaml", ["conclusion_share=0.5"])
    rows = {r["id"]: r for r in pubmedqa_rows("train")}
    plain = build_examples(load_config(QAConfig, "qa.yaml"), tokenizer)
    out = build_examples(cfg, tokenizer)
    extra = [e for e in out if e.id.endswith(":conclusion")]
    assert len(extra) == round(0.5 * len(rows)) and len(out) == len(plain) + len(extra)
    for e in extra:  # the row's own conclusion as the context, the bare decision as target
        r = rows[e.id.split(":")[0]]
        assert e.prompt == qa_prompt(tokenizer, {**r, "context": r["long_answer"]},
                                     cfg.max_source_tokens)
        assert e.target == f"{r['decision'].capitalize()}." and e.label == r["decision"]
    assert sorted(e.id for e in out if e not in extra) == sorted(e.id for e in plain)
    assert not any(e.id.endswith(":conclusion") for e in build_examples(cfg, tokenizer, "val"))
    with pytest.raises(ValueError, match="conclusion_share"):
        load_config(QAConfig, "qa.yaml", ["conclusion_share=1.5"])


def test_first_step_logits_come_from_the_generation_pass(causal_lm):
    """The decision log-odds are read from generate()'s own first step (no second forward
    pass): under batching with left padding they equal a lone forward pass of each prompt,
    and the answer is unchanged by asking for them."""
    import torch

    from training.policy import generate
    from training.qa import decision_logodds

    model, tokenizer, chat = causal_lm
    prompts = chat("Is aspirin an anticoagulant? Answer yes or no.",
                   "Does smoking raise the risk of lung cancer, according to decades of "
                   "cohort studies? Answer yes or no.")
    first: list = []
    ids = generate(model, tokenizer, prompts, 3, batch_size=2, first_logits=first)
    assert ids == generate(model, tokenizer, prompts, 3, batch_size=2)
    assert len(first) == 2
    for p, row in zip(prompts, first):
        x = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            alone = model(input_ids=x).logits[0, -1]
        assert torch.allclose(row, alone, atol=1e-3)
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    assert decision_logodds(tokenizer, first) == pytest.approx(
        [float(r[yes] - r[no]) for r in first])


def test_first_step_bias_moves_the_first_token_only(causal_lm):
    """first_step_bias adds its offsets at the first step alone: a large one on "Yes" makes
    every answer start with it, the raw first-step logits are unchanged, and the next tokens
    are what the model says after "Yes" (not "Yes" again); a zero bias changes nothing."""
    import torch

    from training.policy import generate
    from training.qa import yes_no_ids

    model, tokenizer, chat = causal_lm
    prompts = chat("Is aspirin an anticoagulant? Answer yes or no.",
                   "Does smoking raise the risk of lung cancer? Answer yes or no.")
    yes = yes_no_ids(tokenizer)[0]
    raw, biased = [], []
    plain = generate(model, tokenizer, prompts, 4, batch_size=2, first_logits=raw)
    forced = generate(model, tokenizer, prompts, 4, batch_size=2, first_logits=biased,
                      first_step_bias={yes: 50.0})
    assert all(ids[0] == yes for ids in forced) and any(ids[0] != yes for ids in plain)
    assert all(torch.equal(a, b) for a, b in zip(raw, biased))
    for p, ids in zip(prompts, forced):  # later steps: greedy continuation of "Yes", unbiased
        x = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            nxt = model(input_ids=torch.cat([x, torch.tensor([[yes]])], 1)).logits[0, -1]
        assert ids[1] == int(nxt.argmax())
    assert generate(model, tokenizer, prompts, 4, batch_size=2, first_step_bias={yes: 0.0}) == \
        plain


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(causal_lm):
    """Over two new tokens the greedy pair is among the candidates beam search ranks, so the
    beam's pair is at least as likely; a length penalty favouring length gives longer answers
    than one favouring brevity; beams refuse sampling and first-step logits, and a length
    penalty needs beams."""
    import torch

    from training.policy import generate

    model, tokenizer, chat = causal_lm
    prompts = chat("Summarize: my father has had a cough for three weeks, what should we do?",
                   "Name two symptoms of anaemia.")

    def logprob(prompt, ids):
        x = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        full = torch.cat([x, torch.tensor([ids])], dim=1)
        with torch.inference_mode():
            lp = model(input_ids=full).logits[0, x.shape[1] - 1:-1].log_softmax(-1)
        return float(lp[torch.arange(len(ids)), torch.tensor(ids)].sum())

    greedy = generate(model, tokenizer, prompts, 2, batch_size=2)
    beam = generate(model, tokenizer, prompts, 2, batch_size=2, num_beams=4)
    assert beam == generate(model, tokenizer, prompts, 2, batch_size=2, num_beams=4)
    assert all(len(g) == 2 and len(b) == 2 for g, b in zip(greedy, beam))
    for p, g, b in zip(prompts, greedy, beam):
        assert logprob(p, b) >= logprob(p, g) - 1e-4
    # the length penalty ranks the finished beams: favouring length never gives shorter answers
    short = chat("Name one symptom of anaemia, in one word.",
                 "What organ does hepatitis affect? One word.",
                 "Summarize in one short question: my father has had a cough for three weeks, "
                 "what should we do?")
    longer, shorter = (generate(model, tokenizer, short, 24, batch_size=3, num_beams=4,
                                length_penalty=lp) for lp in (4.0, -4.0))
    assert all(len(a) >= len(b) for a, b in zip(longer, shorter))
    assert sum(map(len, longer)) > sum(map(len, shorter))
    for bad in (dict(num_beams=0), dict(num_beams=2, do_sample=True),
                dict(num_beams=2, first_logits=[]), dict(length_penalty=2.0)):
        with pytest.raises(ValueError):
            generate(model, tokenizer, prompts, 2, **bad)


def test_mbr_decoding_keeps_one_of_the_finished_beams(causal_lm):
    """generate_texts(mbr=True) returns one text per prompt, chosen by mbr_select among that
    prompt's finished beams (in the beam order generate returns them); without beam search
    there is nothing to choose from."""
    from rag_app.evaluate import mbr_select
    from training.policy import generate
    from training.tasks import generate_texts

    model, tokenizer, chat = causal_lm
    prompts = chat("Summarize in one short question: my father has had a cough for three "
                   "weeks, what should we do?", "Name two symptoms of anaemia.")
    tokenizer.padding_side = "left"
    beams = [tokenizer.decode(ids, skip_special_tokens=True).strip()
             for ids in generate(model, tokenizer, prompts, 12, batch_size=2, num_beams=4,
                                 num_return_sequences=4)]
    per_prompt = [beams[:4], beams[4:]]
    chosen = generate_texts(model, tokenizer, prompts, 12, batch_size=2, num_beams=4, mbr=True)
    assert chosen == [c[mbr_select(c)] for c in per_prompt]
    assert generate_texts(model, tokenizer, prompts, 12, batch_size=2, num_beams=4) == \
        [c[0] for c in per_prompt]
    with pytest.raises(ValueError, match="num_beams"):
        generate_texts(model, tokenizer, prompts, 12, mbr=True)
