"""RLHF on the real small models and data: preference pairs (data-derived, human from the
feedback store, rubric-ranked synthetic), the reward model (Bradley-Terry, TRL RewardTrainer,
packaged MiniLM), PPO's maths and a few real PPO updates of SmolLM2 + LoRA against that reward
model (resumable), and DPO (TRL DPOTrainer) on the same pairs."""
import json
import math

import pytest
import torch

from training.common import load_config


# ---------------------------------------------------------------- preference data -----------
def test_data_pairs_have_their_origins_and_held_out_groups_are_disjoint():
    from rag_app.prompts import NO_ANSWER
    from training.data import data_pairs, describe_preferences

    train, held = data_pairs("train", 60, 0, bare_share=0.1), data_pairs("val", 30, 1)
    d = describe_preferences(train)
    assert d["n_pairs"] == 60 and set(d["by_origin"]) == {
        "data:medquad-sibling", "data:pubmedqa-other", "data:no-answer", "data:over-refusal",
        "data:bare-decision"}
    assert d["by_origin"]["data:bare-decision"] == 6  # its stated share, 0.1
    assert "data:bare-decision" not in describe_preferences(data_pairs("train", 60, 0))["by_origin"]
    assert not {p.group for p in train} & {p.group for p in held}  # split by question group
    for p in train:
        assert p.chosen != p.rejected and p.sources
        if p.origin == "data:no-answer":
            assert p.chosen == NO_ANSWER and not p.gold_numbers
        if p.origin == "data:over-refusal":
            assert p.rejected == NO_ANSWER and p.gold_numbers
        if p.origin == "data:bare-decision":  # explained and cited over a bare yes/no/maybe
            assert p.rejected in ("Yes.", "No.", "Maybe.") and p.gold_numbers
            assert f"[{p.gold_numbers[0]}]" in p.chosen and len(p.chosen.split()) > 5
        if p.origin == "data:medquad-sibling":  # both answers cite a given source
            assert f"[{p.gold_numbers[0]}]" in p.chosen and "[" in p.rejected


def test_rubric_terms_have_the_stated_signs():
    from rag_app.prompts import NO_ANSWER
    from rag_app.types import Source
    from training.data import rubric_score

    srcs = [Source(1, "a#0", "a", "Asthma", "Asthma is treated with inhaled corticosteroids "
                                         "and bronchodilators such as salbutamol.", 0.0),
            Source(2, "b#0", "b", "Gout", "Gout is caused by uric acid crystals in joints.", 0.0)]
    good = rubric_score("Asthma is treated with inhaled corticosteroids [1].", srcs, [1])
    bad_cite = rubric_score("Asthma is treated with inhaled corticosteroids [7].", srcs, [1])
    made_up = rubric_score("Asthma is cured by drinking seawater daily [1].", srcs, [1])
    long = rubric_score(" ".join(["Asthma is treated with corticosteroids [1]."] * 30), srcs, [1])
    assert good["citation"] == 1 and bad_cite["citation"] == -1
    assert good["grounding"] > made_up["grounding"]
    assert long["length"] < 0 == good["length"]
    assert rubric_score(NO_ANSWER, srcs, [])["refusal"] == 1  # refuses when nothing answers
    assert rubric_score(NO_ANSWER, srcs, [1])["refusal"] == -1  # refuses wrongly
    assert rubric_score("Gout is caused by uric acid [2].", srcs, [])["refusal"] == -1
    assert good["total"] > max(bad_cite["total"], made_up["total"], long["total"])


def test_rubric_rating_maps_the_rubric_onto_one_to_five():
    from rag_app.types import Source
    from training.data import rubric_rating, rubric_score

    assert rubric_rating(-2.0) == 1.0 and rubric_rating(2.5) == 5.0
    assert rubric_rating(-9.0) == 1.0 and rubric_rating(9.0) == 5.0
    assert rubric_rating(0.25) == pytest.approx(3.0)
    srcs = [Source(1, "a#0", "a", "Gout", "Gout is caused by uric acid crystals in joints.", 0.0)]
    good = rubric_score("Gout is caused by uric acid crystals [1].", srcs, [1])["total"]
    bad = rubric_score("It is caused by stress [4].", srcs, [1])["total"]
    assert rubric_rating(good) > rubric_rating(bad)


def test_synthetic_pairs_rank_sampled_answers_by_the_rubric_and_are_labelled():
    from rag_app.types import Source
    from training.data import synthetic_pairs

    srcs = [Source(1, "a#0", "a", "Gout", "Gout is caused by uric acid crystals in joints.", 0.0)]
    candidates = ["Gout is caused by uric acid crystals [1].", "It is caused by stress [4].",
                  "Gout is caused by uric acid crystals in joints [1]."]
    prompts = [{"question": "What causes gout?", "sources": srcs, "gold_numbers": [1],
                "group": "g"}]
    pairs = synthetic_pairs(prompts, lambda p, k: candidates[:k], k=3)
    assert len(pairs) == 1 and pairs[0].origin == "synthetic:rubric"
    assert pairs[0].rejected == "It is caused by stress [4]."
    assert "uric acid" in pairs[0].chosen
    assert synthetic_pairs(prompts, lambda p, k: [candidates[0]] * k) == []  # nothing to rank
    # all_pairs: both grounded answers beat the ungrounded one; the two grounded ones are
    # within the margin of each other, so they make no pair
    every = synthetic_pairs(prompts, lambda p, k: candidates[:k], k=3, all_pairs=True)
    assert sorted(p.chosen for p in every) == sorted([candidates[0], candidates[2]])
    assert {p.rejected for p in every} == {"It is caused by stress [4]."}


def test_read_pairs_round_trips_and_names_a_malformed_line(tmp_path):
    import json

    from rag_app.types import Source
    from training.data import PreferencePair, read_pairs

    srcs = [Source(1, "a#0", "a", "Gout", "Gout is caused by uric acid crystals.", 0.0)]
    pair = PreferencePair("What causes gout?", srcs, "Uric acid [1].", "Stress.",
                          "synthetic:rubric", "g", [1])
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair.to_dict()) + "\n\n")
    assert read_pairs(str(path)) == [pair]
    path.write_text(json.dumps(pair.to_dict()) + "\n" + '{"question": "x"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:2"):
        read_pairs(str(path))


def test_synthetic_prefs_run_samples_ranks_and_feeds_the_reward_data(tmp_path):
    """`rag train synthetic-prefs` on the real packaged generator: the pairs file reloads as
    synthetic:rubric pairs whose chosen answer scores >= the rejected one by the rubric; only
    the train split is allowed."""
    from training.data import rubric_score
    from training.reward import RewardConfig, build_pairs
    from training.synthetic_prefs import SyntheticPrefsConfig, run

    cfg = load_config(SyntheticPrefsConfig, "synthetic-prefs-tiny.yaml", [])
    res = run(cfg, output=str(tmp_path / "run"), progress_file=str(tmp_path / "p.jsonl"))
    path = tmp_path / "run" / "synthetic_pairs.jsonl"
    assert res["manifest"]["data"]["prompts"] == cfg.n_prompts
    assert len(path.read_text().splitlines()) == len(res["pairs"]) >= 1
    for p in res["pairs"]:
        assert p.origin == "synthetic:rubric" and p.chosen != p.rejected
        assert rubric_score(p.chosen, p.sources, p.gold_numbers)["total"] >= \
            rubric_score(p.rejected, p.sources, p.gold_numbers)["total"] + cfg.margin
    rc = RewardConfig(n_pairs=4, n_heldout_pairs=4, use_feedback=False,
                      synthetic_file=str(path))
    train, held, desc = build_pairs(rc)
    n_syn = sum(p.origin == "synthetic:rubric" for p in train + held)
    assert n_syn == len(res["pairs"])
    # DPO reads the same file, split by question the same way (n_pairs 0: synthetic only)
    from training.dpo import DPOConfig, build_pairs as dpo_pairs

    d_train, d_held, _ = dpo_pairs(DPOConfig(n_pairs=0, n_heldout_pairs=4, use_feedback=False,
                                             synthetic_file=str(path)))
    assert [p.chosen for p in d_train] == [p.chosen for p in train
                                           if p.origin == "synthetic:rubric"]
    assert len([p for p in d_held if p.origin == "synthetic:rubric"]) == n_syn - len(d_train)
    events = [json.loads(x)["event"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "done"
    with pytest.raises(ValueError, match="train split"):
        SyntheticPrefsConfig(split="eval")


def test_human_pairs_come_from_the_feedback_store(tmp_path):
    from rag_app.feedback import FeedbackStore
    from rag_app.types import Answer, Source
    from training.data import feedback_pairs

    store = FeedbackStore(tmp_path / "fb.sqlite")
    src = [Source(1, "a#0", "a", "Gout", "Gout is caused by uric acid.", 0.5)]
    def ans(q, text, model):
        return Answer(q, text, src, model=model)

    i = store.record("What causes gout?", src, ans("What causes gout?", "Stress. [1]", "base"),
                     ans("What causes gout?", "Uric acid crystals [1].", "tuned"))
    store.rate(i, "base", 2)
    store.rate(i, "tuned", 5)
    j = store.record("Is gout hereditary?", src, ans("Is gout hereditary?", "Yes [1]", "base"),
                     ans("Is gout hereditary?", "Maybe", "tuned"))
    store.prefer(j, "base")
    pairs = feedback_pairs(tmp_path / "fb.sqlite")
    assert [(p.chosen, p.rejected, p.origin) for p in pairs] == [
        ("Uric acid crystals [1].", "Stress. [1]", "human"), ("Yes [1]", "Maybe", "human")]
    assert pairs[0].sources[0].text == "Gout is caused by uric acid."


# ---------------------------------------------------------------- reward model --------------
def test_bradley_terry_loss_is_the_formula_and_what_the_trainer_minimises():
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    from training.reward import bradley_terry_loss, load_reward_model

    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, -1.0])
    want = -(math.log(1 / (1 + math.exp(-2))) + math.log(1 / (1 + math.exp(1))) + math.log(.5)) / 3
    assert float(bradley_terry_loss(c, r)) == pytest.approx(want, rel=1e-6)
    model, tok = load_reward_model("default", 64)
    ds = Dataset.from_list([{"prompt": "Question: what causes gout?\nAnswer: ",
                             "chosen": "Uric acid crystals.", "rejected": "Stress."}])
    trainer = RewardTrainer(model=model, processing_class=tok, train_dataset=ds,
                            args=TRLRewardConfig(output_dir="/tmp/bt", use_cpu=True,
                                                 report_to="none", eos_token=tok.sep_token,
                                                 max_length=None, gradient_checkpointing=False,
                                                 bf16=False))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    model.eval()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        rewards = model(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    assert float(loss.detach()) == pytest.approx(float(bradley_terry_loss(rewards[:1], rewards[1:])),
                                        abs=1e-5)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    from training.reward import RewardConfig, run

    out = tmp_path_factory.mktemp("reward")
    cfg = load_config(RewardConfig, "reward-tiny.yaml", ["name=reward-tiny", "use_feedback=false"])
    res = run(cfg, output=str(out / "run"), progress_file=str(out / "p.jsonl"), activate=True)
    return cfg, res, out


def test_reward_model_learns_held_out_pairs_and_registers(reward_run):
    from rag_app.models import ModelRegistry
    from training.reward import load_reward_model, pairwise_accuracy, reward_text, score_texts

    cfg, res, out = reward_run
    m = res["manifest"]
    before = m["metrics_before"]["heldout"]["accuracy"]
    after = m["metrics_after"]["heldout"]["accuracy"]
    assert after >= before + 0.1, (before, after)
    assert m["metrics_after"]["heldout"]["n"] == cfg.n_heldout_pairs
    entry = ModelRegistry().active("reward")
    assert entry["name"] == "reward-tiny" and entry["kind"] == "reward"
    model, tok = load_reward_model(entry["path"])  # reloads from its folder
    assert score_texts(model, tok, ["Question: q\nAnswer: a"])[0] == pytest.approx(
        score_texts(res["model"].model, tok, ["Question: q\nAnswer: a"])[0], abs=1e-4)
    assert (out / "run" / "reward.png").exists() and reward_text("q", [], "a").endswith("a")
    assert pairwise_accuracy(model, tok, [])["n"] == 0


# ---------------------------------------------------------------- PPO maths -----------------
def test_reward_model_can_start_from_the_active_relevance_classifier(reward_run, tmp_path,
                                                                   monkeypatch):
    from rag_app.models import ModelRegistry
    from training.reward import load_reward_model, score_texts

    _, res, _ = reward_run
    monkeypatch.setenv("RAG_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(ValueError, match="rag train relevance"):
        load_reward_model("relevance")
    ModelRegistry().register("rel-x", "relevance", res["entry"]["path"], activate=True)
    for ref in ("relevance", "rel-x"):
        model, tok = load_reward_model(ref)
        assert score_texts(model, tok, ["Question: q\nAnswer: a"])[0] == pytest.approx(
            score_texts(res["model"].model, tok, ["Question: q\nAnswer: a"])[0], abs=1e-4)


def test_kl_is_zero_when_policy_equals_reference_and_rewards_sit_on_the_last_token():
    from training.ppo import kl_per_token, per_token_rewards

    logp = torch.log(torch.tensor([[0.2, 0.5, 0.9], [0.3, 0.3, 1.0]]))
    assert torch.equal(kl_per_token(logp, logp), torch.zeros_like(logp))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]]) * mask
    r = per_token_rewards(torch.tensor([1.0, -2.0]), kl, 0.5, mask)
    assert torch.allclose(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 - 2.0, 0.0]]))


def test_gae_matches_the_recursion_and_ppo_clips():
    from training.ppo import gae, ppo_losses

    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.1
    d1 = 0.0 + 0.9 * 0.1 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2, a1 = d2, d1 + 0.72 * d2
    assert torch.allclose(adv, torch.tensor([[d0 + 0.72 * a1, a1, a2]]))
    assert torch.allclose(ret, adv + values)
    old = torch.zeros(1, 3)
    out = ppo_losses(torch.full((1, 3), 1.0), old, torch.ones(1, 3), values, values, ret, mask,
                     0.2, 0.2)  # ratio e >> 1 + eps with positive advantage: clipped to 1.2
    assert float(out["pg_loss"]) == pytest.approx(-1.2) and float(out["clipfrac"]) == 1.0
    same = ppo_losses(old, old, torch.ones(1, 3), values, values, ret, mask, 0.2, 0.2)
    assert float(same["pg_loss"]) == pytest.approx(-1.0) and float(same["approx_kl"]) == 0.0


def test_adaptive_kl_and_shaping_signs():
    from rag_app.prompts import NO_ANSWER
    from rag_app.types import Source
    from training.ppo import AdaptiveKL, PPOConfig, RunningMoments, shaping_terms

    ctl = AdaptiveKL(0.1, 4.0, 100)
    assert ctl.update(8.0, 10) > 0.1  # KL above target: stronger penalty
    ctl = AdaptiveKL(0.1, 4.0, 100)
    assert ctl.update(1.0, 10) < 0.1
    assert AdaptiveKL(0.1, None, 100).update(50.0, 10) == 0.1  # fixed
    m = RunningMoments()
    m.update([1.0, 3.0])
    assert m.mean == pytest.approx(2.0, abs=1e-3) and m.normalise(2.0) == pytest.approx(0, abs=1e-3)
    cfg = PPOConfig()
    srcs = [Source(1, "a#0", "a", "Gout", "Gout is caused by uric acid crystals.", 0.0)]
    assert shaping_terms(NO_ANSWER, srcs, [], cfg)["refusal"] > 0
    assert shaping_terms("Gout is caused by uric acid [1].", srcs, [], cfg)["refusal"] < 0
    assert shaping_terms("Gout is caused by uric acid [1].", srcs, [1], cfg)["citation"] > 0
    assert shaping_terms("Gout is caused by uric acid [3].", srcs, [1], cfg)["citation"] < 0
    assert shaping_terms("gout " * 200, srcs, [1], cfg)["length"] < 0
    assert shaping_terms("Yes.", srcs, [1], cfg)["grounding"] == 0  # off by default
    cfg = PPOConfig(grounding_coef=0.5)
    grounded = shaping_terms("Gout is caused by uric acid crystals [1].", srcs, [1], cfg)
    assert grounded["grounding"] == pytest.approx(0.0)
    assert shaping_terms("Yes.", srcs, [1], cfg)["grounding"] == pytest.approx(-0.5)
    half = shaping_terms("Gout is caused by sunlight exposure [1].", srcs, [1], cfg)
    assert -0.5 < half["grounding"] < 0


# ---------------------------------------------------------------- PPO and DPO runs ----------
def test_ppo_updates_move_the_policy_register_and_resume(reward_run, tmp_path):
    from rag_app.models import ModelRegistry
    from training.ppo import PPOConfig, run

    cfg = load_config(PPOConfig, "ppo-tiny.yaml", ["name=ppo-tiny", "base_model=base"])
    res = run(cfg, output=str(tmp_path / "ppo"), progress_file=str(tmp_path / "p.jsonl"))
    hist = res["history"]
    assert len(hist) == 2 and all(math.isfinite(h["kl"]) for h in hist)
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # first rollout: policy == reference
    lora_b = [p for n, p in res["model"].named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # the adapter moved
    entry = ModelRegistry().get("ppo-tiny")
    assert entry["kind"] == "generator" and entry["training_type"] == "ppo"
    summary = res["manifest"]["metrics_after"]["summary"]
    assert {"score_before", "score_after", "win_rate_reward", "kl_after"} <= set(summary)
    assert (tmp_path / "ppo" / "ppo_curves.png").exists()
    events = [json.loads(x)["event"] for x in open(tmp_path / "p.jsonl")]
    assert events[0] == "start" and events[-1] == "done" and events.count("step") == 2
    # resume: two more iterations on top of checkpoint-2
    cfg4 = load_config(PPOConfig, "ppo-tiny.yaml", ["name=ppo-tiny", "base_model=base",
                                                    "max_steps=3"])
    res2 = run(cfg4, output=str(tmp_path / "ppo"), resume=True)
    assert [h["step"] for h in res2["history"]] == [1, 2, 3]
    with pytest.raises(ValueError, match="no PPO checkpoint"):
        run(cfg4, output=str(tmp_path / "empty"), resume=True)


def test_dpo_starts_at_ln2_and_registers_an_adapter_that_changes_logprobs(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rag_app.generate import ensure_base_checkpoint
    from training.dpo import DPOConfig, run

    cfg = load_config(DPOConfig, "dpo-tiny.yaml", ["name=dpo-tiny", "base_model=base"])
    res = run(cfg, output=str(tmp_path / "dpo"), progress_file=str(tmp_path / "p.jsonl"))
    log = [x for x in res["manifest"]["train_log"] if "loss" in x]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # reference == policy
    assert res["manifest"]["metrics_before"]["heldout"]["n"] == 2
    entry = res["entry"]
    assert entry["kind"] == "generator" and entry["training_type"] == "dpo"
    base = AutoModelForCausalLM.from_pretrained(ensure_base_checkpoint(), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, entry["path"])
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-6)
