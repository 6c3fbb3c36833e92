"""Reward model: a sequence classifier with ONE output trained on preference pairs with the
Bradley-Terry loss, -log sigmoid(r(chosen) - r(rejected)), by TRL's RewardTrainer.

Read top to bottom: config -> pairs (training/data.py: data-derived from the train split, plus
the app's feedback store, plus optional rubric-ranked synthetic pairs) -> held-out pairs from
OTHER questions (the val split's groups; human pairs split by question) -> pairwise accuracy
before -> RewardTrainer -> pairwise accuracy after, per origin -> saved, registered as kind
"reward" (the PPO recipe and `rag eval policy` load it).

The model reads a compact text, not the generator's chat prompt, so that an encoder (the
packaged MiniLM, 512 positions) sees the question, the start of each numbered source and the
whole answer: `reward_text`.

    rag train reward --recipe training/recipes/reward.yaml [--set k=v] [--activate]
    rag eval reward --model NAME [--model ...] [--out results/reward.json]
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import RunManifest, TrainConfig, finish_run, set_seed, start_run, trainer_args_common
from .pretrain import SavedLM

log = logging.getLogger(__name__)


@dataclass
class RewardConfig(TrainConfig):
    base_model: str = "default"  # default = the packaged MiniLM encoder; relevance = the
    # active relevance classifier (a MiniLM cross-encoder: question/answer matching is what the
    # data pairs test); a registered name; HF id; path
    max_steps: int = 80
    batch_size: int = 16
    learning_rate: float = 5e-5
    max_length: int = 160  # tokens of reward_text(prompt + answer); the sources are cut to fit
    n_pairs: int = 1200  # data-derived training pairs (train split)
    n_heldout_pairs: int = 300  # data-derived held-out pairs (val split: other questions)
    source_words: int = 24  # words of each source the reward model sees
    answer_words: int = 40
    n_sources: int = 2
    bare_decision_share: float = 0.0  # training pairs only (held-out: HELDOUT_BARE_SHARE):
    # the explained, cited answer over a bare "Yes."/"No."; 0.1 was worse on validation
    use_feedback: bool = True  # add the app's human pairs (split by question)
    feedback_db: str = ""  # "" = the app's store
    feedback_heldout: float = 0.3
    synthetic_file: str = ""  # jsonl of synthetic pairs (`rag train synthetic-prefs`), optional
    center_rewards: float = 0.01  # TRL center_rewards_coefficient (keeps rewards near 0)
    train_layers: int = 3  # train only the top N transformer layers + head (0 = all): on
    # 2 cores the backward pass through the frozen lower layers is skipped


def reward_prompt(question: str, sources: list, source_words: int = 40) -> str:
    """What the reward model reads before the answer (ends with a newline: TRL concatenates
    prompt and answer with no separator)."""
    lines = [f"Question: {' '.join(question.split())}"]
    for s in sources:
        words = " ".join(f"{s.title}. {s.text}".split()).split()
        lines.append(f"[{s.number}] {' '.join(words[:source_words])}")
    return "\n".join(lines) + "\nAnswer: "


def reward_text(question: str, sources: list, answer: str, source_words: int = 40,
                answer_words: int = 80) -> str:
    return reward_prompt(question, sources, source_words) + " ".join(answer.split()[:answer_words])


def to_rows(pairs, cfg: RewardConfig) -> list[dict]:
    return [{"prompt": reward_prompt(p.question, p.sources, cfg.source_words),
             "chosen": " ".join(p.chosen.split()[:cfg.answer_words]),
             "rejected": " ".join(p.rejected.split()[:cfg.answer_words]),
             "origin": p.origin} for p in pairs]


def load_reward_model(path: str, max_length: int = 160):
    """(model, tokenizer) of a reward model folder, or a fresh one-output head on an encoder /
    causal LM (`default` = the packaged MiniLM)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .common import resolve_base

    if path == "relevance":  # start from the active relevance classifier (a cross-encoder)
        from rag_app.models import ModelRegistry

        entry = ModelRegistry().active("relevance")
        if entry is None:
            raise ValueError("base_model=relevance needs an active relevance classifier: "
                             "`rag train relevance --activate`, or pass a registered name")
        path = entry["path"]
    path = resolve_base(path)  # default -> the packaged MiniLM; a registered name -> its folder
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                   dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a reward model from {path!r}: {exc}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    tok.model_max_length = max_length
    return model, tok


def reward_settings(path: str) -> dict:
    """How a trained reward model reads its inputs (from its manifest; defaults otherwise)."""
    import json

    cfg = RewardConfig()
    try:
        cfg_d = json.loads((Path(path) / "manifest.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        cfg_d = {}
    return {k: cfg_d.get(k, getattr(cfg, k)) for k in ("source_words", "answer_words",
                                                        "max_length", "n_sources")}


def resolve_reward(ref: str) -> str:
    """"reward"/"active" -> the active reward model; a registered name; else a path."""
    from rag_app.models import ModelRegistry

    reg = ModelRegistry()
    if ref in ("", "reward", "active"):
        entry = reg.active("reward")
        if entry is None:
            raise ValueError("no active reward model: run `rag train reward --activate` first")
        return entry["path"]
    if Path(ref).is_dir():
        return ref
    entry = reg.get(ref)
    if entry["kind"] != "reward":
        raise ValueError(f"model {ref!r} is a {entry['kind']} model, not a reward model")
    return entry["path"]


def score_texts(model, tok, texts: list[str], batch_size: int = 16, max_length: int = 160
                ) -> list[float]:
    """Reward of each full text (prompt + answer). Texts longer than max_length are cut at the
    right: build them with `reward_text` (bounded sources and answer) to keep the answer."""
    import torch

    model.eval()
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
            out += model(**enc).logits.squeeze(-1).float().tolist()
    return out


def pairwise_accuracy(model, tok, rows: list[dict], max_length: int = 160) -> dict:
    """Share of pairs whose chosen answer gets the higher reward: overall and per origin."""
    from collections import defaultdict

    if not rows:
        return {"accuracy": None, "n": 0, "by_origin": {}}
    chosen = score_texts(model, tok, [r["prompt"] + r["chosen"] for r in rows],
                         max_length=max_length)
    rejected = score_texts(model, tok, [r["prompt"] + r["rejected"] for r in rows],
                           max_length=max_length)
    wins = [c > r for c, r in zip(chosen, rejected)]
    by: dict[str, list[bool]] = defaultdict(list)
    for r, w in zip(rows, wins):
        by[r["origin"]].append(w)
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(rows)
    return {"accuracy": round(sum(wins) / len(wins), 4), "n": len(wins),
            "mean_margin": round(margin, 4),
            "by_origin": {k: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)}
                          for k, v in sorted(by.items())}}


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """-mean log sigmoid(r_chosen - r_rejected): what RewardTrainer minimises (no margin)."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def build_pairs(cfg: RewardConfig) -> tuple[list, list, dict]:
    """(train pairs, held-out pairs, description). Held-out = the val split's groups (other
    MedQuAD foci / pmids than training) + a by-question share of the human pairs."""
    from .data import (HELDOUT_BARE_SHARE, data_pairs, describe_preferences, feedback_pairs,
                       split_by_group, synthetic_split)

    train = data_pairs("train", cfg.n_pairs, cfg.seed, cfg.n_sources, cfg.answer_words,
                       bare_share=cfg.bare_decision_share)
    held = data_pairs("val", cfg.n_heldout_pairs, cfg.seed + 1, cfg.n_sources, cfg.answer_words,
                      bare_share=HELDOUT_BARE_SHARE)
    human = feedback_pairs(cfg.feedback_db or None) if cfg.use_feedback else []
    h_train, h_held = split_by_group(human, cfg.feedback_heldout, cfg.seed)
    s_train, s_held = synthetic_split(cfg.synthetic_file, cfg.seed)
    train, held = train + h_train + s_train, held + h_held + s_held
    return train, held, {"train": describe_preferences(train),
                         "heldout": describe_preferences(held),
                         "heldout_split": "val split groups (other foci / pmids); human and "
                                          "synthetic pairs split by question"}


def run(cfg: RewardConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False) -> dict:
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    t0, out, progress, last = start_run("reward", cfg, output, progress_file, resume)
    try:
        model, tok = load_reward_model(cfg.base_model, cfg.max_length)
        train, held, desc = build_pairs(cfg)
        train_rows, held_rows = to_rows(train, cfg), to_rows(held, cfg)
        manifest = RunManifest("reward", cfg.base_model, asdict(cfg), cfg.seed, data=desc)
        manifest.data["trainable"] = freeze_lower(model, cfg.train_layers)
        manifest.metrics_before = {"heldout": pairwise_accuracy(model, tok, held_rows,
                                                                cfg.max_length)}
        set_seed(cfg.seed)
        args = trainer_args_common(cfg, out, False)
        args.update(eval_strategy="no", eval_steps=None)
        rc = TRLRewardConfig(**args, max_length=None, center_rewards_coefficient=cfg.center_rewards,
                             gradient_checkpointing=False,
                             eos_token=tok.sep_token if tok.sep_token else tok.eos_token,
                             dataset_num_proc=None)
        # TRL filters over-long pairs instead of cutting them: cut here, keep the answer
        rows = [r | {"prompt": _fit(tok, r, cfg.max_length)} for r in train_rows]
        ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                for r in rows])
        trainer = RewardTrainer(model=model, args=rc, processing_class=tok, train_dataset=ds,
                                callbacks=[progress])
        trainer.train(resume_from_checkpoint=last)
        after = pairwise_accuracy(trainer.model, tok, held_rows, cfg.max_length)
        train_acc = pairwise_accuracy(trainer.model, tok, train_rows[:64], cfg.max_length)
        manifest.metrics_after = {"heldout": after, "train_sample": train_acc,
                                  "train_loss_log": progress.losses}
        summary = {"heldout_accuracy": after["accuracy"],
                   "heldout_accuracy_before": manifest.metrics_before["heldout"]["accuracy"],
                   "by_origin": {k: v["accuracy"] for k, v in after["by_origin"].items()}}
        manifest.metrics_after["summary"] = summary
        res = finish_run(SavedLM(trainer.model, tok), trainer, progress, manifest,
                         "reward", "reward", cfg, activate, out, t0, summary)
        plot_reward(manifest.to_dict(), str(out / "reward.png"))
        return res
    except Exception as e:
        progress.error(f"{type(e).__name__}: {e}")
        raise


def freeze_lower(model, train_layers: int) -> dict:
    """Freeze the embeddings and all but the top `train_layers` layers (0 = train all)."""
    import re

    if train_layers <= 0:
        return {"layers": "all"}
    n = model.config.num_hidden_layers
    keep = {str(i) for i in range(max(n - train_layers, 0), n)}
    for name, p in model.named_parameters():
        m = re.search(r"\.layers?\.(\d+)\.", name)
        if "embed" in name or (m and m.group(1) not in keep):
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"layers": sorted(keep, key=int), "trainable_params": trainable}


def _fit(tok, row: dict, max_length: int) -> str:
    """Shorten the sources part of the prompt until prompt + the longer answer fits."""
    prompt = row["prompt"]
    longer = max(row["chosen"], row["rejected"], key=len)
    n = len(tok(prompt + longer)["input_ids"]) + 1
    while n > max_length:
        head, _, tail = prompt.rpartition("\nAnswer: ")
        words = head.split(" ")
        cut = max(1, (n - max_length) + 2)
        if len(words) <= cut + 4:
            break
        prompt = " ".join(words[:-cut]) + "\nAnswer: " + tail
        n = len(tok(prompt + longer)["input_ids"]) + 1
    return prompt


def plot_reward(manifest: dict, path: str) -> None:
    """Held-out pairwise accuracy per origin, before vs after training (bars)."""
    from rag_app.ui_admin import grouped_bars

    series = {stage: {o: v["accuracy"] for o, v in
                      manifest[f"metrics_{stage}"]["heldout"]["by_origin"].items()}
              for stage in ("before", "after")}
    origins = sorted(series["after"])
    fig = grouped_bars(series, origins, "reward model: held-out pairwise accuracy",
                       figsize=(8, 3.4), fontsize=7)
    fig.savefig(path, dpi=100)
