"""Instruction tuning of the generator: LoRA (peft) + TRL's SFTTrainer on RAFT-style examples.

Read top to bottom: config -> base model -> examples rendered with THE serving prompt
(training/data.py) -> paraphrases (augment.py) -> order (sampling.py) -> SFTTrainer with
prompt/completion columns and completion_only_loss (only the answer + EOS is supervised)
-> eval loss before/after on validation examples -> adapter saved with its manifest and
registered as a "generator" in the ModelRegistry (`rag ask --model tuned` after --activate).

    rag train instruct --recipe training/recipes/instruct.yaml [--set k=v] [--output DIR]
        [--progress-file F] [--resume] [--activate]
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import (ProgressCallback, RunManifest, TrainConfig, finish_run, set_seed,
                     start_run, trainer_args_common)

log = logging.getLogger(__name__)


@dataclass
class LoraSFTConfig(TrainConfig):
    """What every LoRA tuning of the generator shares (instruct here; summarize / qa in
    training/tasks.py): the base model, the batch, the sequence budget and the LoRA."""
    base_model: str = "default"  # default/base = packaged SmolLM2-135M-Instruct; HF id; path
    batch_size: int = 4
    learning_rate: float = 2e-4
    max_length: int = 512  # prompt + completion tokens (examples are built to fit)
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lora_layers: int = 0  # LoRA on the last N decoder layers only (0 = all): backward stops
    # there, so a step costs little more than a forward pass (CPU budgets)
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False  # saves memory, costs one more forward per step
    label_smoothing: float = 0.0  # > 0: cross-entropy against (1 - eps) one-hot + eps uniform
    # (transformers' LabelSmoother, as in BART's summarisation recipes). TRL 1.16 then spends
    # one more no-grad forward per step on its token metrics, and warns that it will drop
    # label_smoothing_factor in TRL 2.0
    neftune_noise_alpha: float = 0.0  # > 0: NEFTune (Jain et al. 2023), transformers' uniform
    # noise of scale alpha / sqrt(length x width) on the input embeddings while training only

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing!r} is invalid: use 0 (off) "
                             "up to below 1 (e.g. 0.1)")
        if self.neftune_noise_alpha < 0:
            raise ValueError(f"neftune_noise_alpha={self.neftune_noise_alpha!r} is invalid: use 0 "
                             "(off) or a positive scale (the NEFTune paper uses 5 to 15)")


@dataclass
class InstructConfig(LoraSFTConfig):
    sources: str = "pubmedqa,medquad"
    # data (training/data.py: instruction_examples)
    n_examples: int = 400
    n_val_examples: int = 16  # from the validation slice of the TRAINING groups
    pubmedqa_share: float = 0.5
    n_sources: int = 3  # passages per prompt (gold + distractors)
    max_gold: int = 2  # gold PubMedQA sections per prompt
    p_no_answer: float = 0.15  # share of examples without the gold passage -> NO_ANSWER
    max_prompt_tokens: int = 400  # same truncation as GenerationConfig.max_prompt_tokens
    answer_words: int = 60
    # augmentation (augment.py) and ordering (sampling.py)
    augment_ratio: float = 0.3
    augment_mode: str = "replace"  # replace | add
    generated_instructions: int = 0  # > 0: the base model paraphrases this many more instructions
    # share of the training examples whose instruction slot is emptied or holds unrelated prose
    # (augment.noise_instructions), applied after the paraphrases; 0 = off
    instruction_noise: float = 0.0
    sampling: str = "random"  # random | curriculum | hard
    difficulty: str = "heuristic"  # heuristic | loss (base-model loss: one forward/example)
    hard_power: float = 1.0
    # > 0: every example is followed by its twin under another instruction wording
    # (augment.consistency_pairs) and this weight x the symmetric KL between the pair's
    # answer-token distributions joins the loss (pair_divergence); batch_size must be even
    consistency: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.max_prompt_tokens + 24 > self.max_length:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} leaves no room for the "
                             f"answer within max_length={self.max_length}: lower it")
        if self.difficulty not in ("heuristic", "loss"):
            raise ValueError(f"difficulty={self.difficulty!r} is invalid: use heuristic or loss")
        if self.n_examples < 1 or self.lora_r < 1:
            raise ValueError("n_examples and lora_r must be >= 1")
        if self.consistency < 0 or (self.consistency and self.batch_size % 2):
            raise ValueError(f"consistency={self.consistency} with batch_size={self.batch_size} "
                             "is invalid: use 0 (off), or > 0 with an even batch (whole pairs)")
        if not 0 <= self.instruction_noise <= 1:
            raise ValueError(f"instruction_noise={self.instruction_noise} is invalid: use 0..1")
        if self.generated_instructions < 0:
            raise ValueError(f"generated_instructions={self.generated_instructions} is invalid: "
                             "use 0 (the written paraphrases only) or more")


def resolve_base_generator(model: str) -> str:
    """default/base -> the converted packaged checkpoint; a registered full model (a "base"
    from `rag train pretrain|vocab`, a merged generator) -> its folder; else a local folder or
    a HF id. A LoRA adapter cannot be a base: merge it first (`rag model merge`)."""
    from rag_app.generate import ensure_base_checkpoint
    from rag_app.models import ModelRegistry

    if model in ("default", "base"):
        return str(ensure_base_checkpoint())
    if model == "tuned":
        raise ValueError("base_model=tuned is ambiguous: pass the registered name or a path")
    path, adapter, _ = ModelRegistry().resolve_generator(model)
    if adapter is not None:
        raise ValueError(f"base_model={model!r} is a LoRA adapter: merge it first "
                         f"(`rag model merge {model}`) and start from the merged model")
    return path


def load_base(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_examples(cfg: InstructConfig, tokenizer, split: str = "train", n: int | None = None,
                   augment: bool = True, extra_instructions: tuple[str, ...] = ()) -> list:
    """Examples of `split`, each fitting max_length (the answer is cut, never the EOS).
    `extra_instructions` join TRAIN_INSTRUCTIONS as paraphrases the augmentation draws from."""
    from .augment import TRAIN_INSTRUCTIONS, augment_examples, noise_instructions
    from .data import instruction_examples

    n = cfg.n_examples if n is None else n
    exs = instruction_examples(tokenizer, n, split, cfg.source_list, cfg.pubmedqa_share,
                               cfg.n_sources, cfg.max_gold, cfg.p_no_answer,
                               cfg.max_prompt_tokens, cfg.answer_words,
                               cfg.seed + (0 if split == "train" else 1))
    if augment and cfg.augment_ratio > 0:
        exs = augment_examples(exs, tokenizer, cfg.augment_ratio, cfg.max_prompt_tokens,
                               cfg.seed, TRAIN_INSTRUCTIONS + tuple(extra_instructions),
                               mode=cfg.augment_mode)
    if augment and cfg.instruction_noise > 0:
        exs = noise_instructions(exs, tokenizer, cfg.instruction_noise, cfg.seed,
                                 cfg.max_prompt_tokens)
    for e in exs:
        room = cfg.max_length - e.prompt_tokens - 1
        ids = tokenizer(e.answer, add_special_tokens=False)["input_ids"]
        if len(ids) > room:
            e.answer = tokenizer.decode(ids[:max(room, 1)]).rstrip()
            e.completion = e.answer + tokenizer.eos_token
    return exs


def to_dataset(examples: list):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [e.prompt for e in examples],
                              "completion": [e.completion for e in examples]})


def lora_config(cfg: LoraSFTConfig, n_layers: int | None = None):
    from peft import LoraConfig

    layers = None
    if cfg.lora_layers and n_layers:
        layers = list(range(max(n_layers - cfg.lora_layers, 0), n_layers))
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=[m.strip() for m in cfg.target_modules.split(",") if m],
                      layers_to_transform=layers, bias="none", task_type="CAUSAL_LM")


def pair_divergence(logits, labels):
    """Mean over pairs (rows 2k, 2k+1) of the symmetric KL, per answer token, between the two
    rows' next-token distributions at their supervised positions (labels != -100), aligned
    from the answer's start (the shorter answer sets the length)."""
    import torch

    mask = labels[:, 1:] != -100
    terms = []
    for a in range(0, len(labels) - 1, 2):
        la, lb = logits[a, :-1][mask[a]], logits[a + 1, :-1][mask[a + 1]]
        m = min(len(la), len(lb))
        if m:
            pa = torch.log_softmax(la[:m].float(), -1)
            pb = torch.log_softmax(lb[:m].float(), -1)
            kl = (pa.exp() * (pa - pb)).sum(-1) + (pb.exp() * (pb - pa)).sum(-1)
            terms.append(kl.mean() / 2)
    return torch.stack(terms).mean() if terms else logits.sum() * 0.0


def _consistency_trainer(base):
    """An SFTTrainer (`base`) whose training loss adds `consistency` x pair_divergence to the
    answer tokens' cross-entropy (the rows come in twin pairs: run() builds them, the sampler is
    sequential and the batch even); evaluation keeps the plain loss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    class ConsistencySFTTrainer(base):
        consistency = 0.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not (self.consistency and model.training):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"},
                            use_cache=False)
            ce = ForCausalLMLoss(outputs.logits, labels, outputs.logits.size(-1),
                                 num_items_in_batch=num_items_in_batch)
            div = pair_divergence(outputs.logits, labels)
            self._metrics["train"]["pair_kl"].append(float(div.detach()))
            loss = ce + self.consistency * div
            return (loss, outputs) if return_outputs else loss

    return ConsistencySFTTrainer


def make_trainer(cfg: LoraSFTConfig, model, tokenizer, train_examples: list,
                 val_examples: list, output: Path, progress: ProgressCallback):
    from trl import SFTConfig, SFTTrainer

    args = trainer_args_common(cfg, output, bool(val_examples))
    args.update(eval_strategy="no", eval_steps=None, per_device_eval_batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                train_sampling_strategy="sequential",  # sampling.py already fixed the order
                gradient_checkpointing=cfg.gradient_checkpointing)
    sft = SFTConfig(**args, max_length=cfg.max_length, completion_only_loss=True,
                    packing=False, dataset_num_proc=None,
                    label_smoothing_factor=cfg.label_smoothing,
                    neftune_noise_alpha=cfg.neftune_noise_alpha or None)
    weight = getattr(cfg, "consistency", 0.0)
    trainer = (_consistency_trainer(SFTTrainer) if weight else SFTTrainer)(
        model=model, args=sft, processing_class=tokenizer,
        train_dataset=to_dataset(train_examples),
        eval_dataset=to_dataset(val_examples) if val_examples else None,
        peft_config=lora_config(cfg, getattr(model.config, "num_hidden_layers", None)),
        callbacks=[progress])
    if weight:
        if len(trainer.train_dataset) != len(train_examples):
            raise ValueError("the trainer dropped training rows, which would split the "
                             "consistency pairs: lower max_prompt_tokens or raise max_length")
        trainer.consistency = weight
    return trainer


def prompt_fingerprint() -> dict:
    from rag_app import prompts

    text = prompts.SYSTEM_PROMPT + "\n" + prompts.ANSWER_INSTRUCTION + "\n" + prompts.NO_ANSWER
    return {"module": "rag_app.prompts", "sha1": hashlib.sha1(text.encode()).hexdigest()[:12]}


def train_and_register(training_type: str, cfg: LoraSFTConfig, model, tokenizer, train: list,
                       val: list, manifest: RunManifest, out: Path, progress: ProgressCallback,
                       last: str | None, activate: bool, t0: float) -> dict:
    """The shared SFT core of instruct / summarize / qa: LoRA trainer on prompt/completion
    examples -> eval loss before -> train (resuming from `last`) -> eval loss after -> save the
    adapter with its manifest, registered as a "generator"."""
    set_seed(cfg.seed)  # LoRA init independent of the data-building path
    trainer = make_trainer(cfg, model, tokenizer, train, val, out, progress)
    if val:
        manifest.metrics_before = {"eval_loss": trainer.evaluate()["eval_loss"]}
    trainer.train(resume_from_checkpoint=last)
    after = {"eval_loss": trainer.evaluate()["eval_loss"]} if val else {}
    first = progress.losses[0][1] if progress.losses else None
    final = progress.losses[-1][1] if progress.losses else None
    manifest.metrics_after = after | {"train_loss_first": first, "train_loss_last": final,
                                      "train_loss_log": progress.losses}
    summary = {k: v for k, v in manifest.metrics_after.items() if k != "train_loss_log"}
    if manifest.metrics_before:
        summary["base_eval_loss"] = manifest.metrics_before["eval_loss"]
    return finish_run(trainer.model, trainer, progress, manifest, "generator", training_type,
                      cfg, activate, out, t0, summary)


def run(cfg: InstructConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False) -> dict:
    """The whole run: examples -> eval loss before -> train -> eval loss after -> save adapter
    + manifest -> register as a generator (active only with activate=True)."""
    from .augment import generated_instructions
    from .data import describe_instructions
    from .sampling import base_model_losses, order_examples

    t0, out, progress, last = start_run("instruct", cfg, output, progress_file, resume)
    try:
        base = resolve_base_generator(cfg.base_model)
        model, tokenizer = load_base(base)
        extra = generated_instructions(model, tokenizer, cfg.generated_instructions, cfg.seed) \
            if cfg.augment_ratio > 0 else []
        train = build_examples(cfg, tokenizer, "train", extra_instructions=tuple(extra))
        val = build_examples(cfg, tokenizer, "val", cfg.n_val_examples, augment=False) \
            if cfg.n_val_examples else []
        losses = base_model_losses(model, tokenizer, train, cfg.max_length) \
            if cfg.difficulty == "loss" else None
        train = order_examples(train, cfg.sampling, cfg.seed, losses, cfg.hard_power)
        if cfg.consistency:
            from .augment import TRAIN_INSTRUCTIONS, consistency_pairs

            train = consistency_pairs(train, tokenizer, TRAIN_INSTRUCTIONS + tuple(extra),
                                      cfg.seed, cfg.max_length)
        manifest = RunManifest("instruct", base, asdict(cfg), cfg.seed,
                               data={"train": describe_instructions(train),
                                     "val": describe_instructions(val),
                                     "generated_instructions": extra,
                                     "sampling": cfg.sampling, "prompt": prompt_fingerprint(),
                                     "excluded": "pubmedqa_heldout_pmids, medquad_test_titles"})
        return train_and_register("instruct", cfg, model, tokenizer, train, val, manifest,
                                  out, progress, last, activate, t0) | {"examples": train,
                                                                        "tokenizer": tokenizer}
    except Exception as e:
        progress.error(f"{type(e).__name__}: {e}")
        raise
