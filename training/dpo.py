"""DPO of the generator (LoRA) on the same preference pairs as the reward model: the light
alternative to reward model + PPO (no sampling, no value head, no reward model at train time).

TRL's DPOTrainer with a peft LoRA config and ref_model=None: the reference is the starting
policy with the adapter disabled. The prompt is THE serving prompt (rag_app.prompts) over the
pair's numbered sources, so the tuned model is trained on what the app sends it. Before/after:
DPO's implicit-reward pairwise accuracy and margin on held-out pairs (other questions: the val
split); `rag eval policy` compares it with PPO on the reward model and the rubric.

    rag train dpo --recipe training/recipes/dpo.yaml [--set k=v] [--resume] [--activate]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .common import RunManifest, TrainConfig, finish_run, set_seed, start_run, trainer_args_common


@dataclass
class DPOConfig(TrainConfig):
    base_model: str = "tuned"  # the starting policy: the active tuned generator (else base)
    max_steps: int = 30
    batch_size: int = 2
    learning_rate: float = 5e-5
    max_length: int = 400  # prompt + answer tokens (TRL keeps the start)
    max_prompt_tokens: int = 300
    beta: float = 0.1
    loss_type: str = "sigmoid"
    n_pairs: int = 240
    n_heldout_pairs: int = 32
    n_sources: int = 2
    answer_words: int = 40
    use_feedback: bool = True
    feedback_db: str = ""
    feedback_heldout: float = 0.3
    synthetic_file: str = ""  # `rag train synthetic-prefs` pairs (20% held out by question)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_layers: int = 8
    target_modules: str = "q_proj,v_proj"


def to_dataset(pairs, tok, max_prompt_tokens: int):
    from datasets import Dataset

    from rag_app.prompts import render_prompt

    return Dataset.from_list([{"prompt": render_prompt(tok, p.question, p.sources,
                                                       max_prompt_tokens),
                               "chosen": p.chosen, "rejected": p.rejected} for p in pairs])


def build_pairs(cfg: DPOConfig):
    from .data import (HELDOUT_BARE_SHARE, data_pairs, describe_preferences, feedback_pairs,
                       split_by_group, synthetic_split)

    train = data_pairs("train", cfg.n_pairs, cfg.seed, cfg.n_sources, cfg.answer_words) \
        if cfg.n_pairs else []
    held = data_pairs("val", cfg.n_heldout_pairs, cfg.seed + 1, cfg.n_sources, cfg.answer_words,
                      bare_share=HELDOUT_BARE_SHARE)
    human = feedback_pairs(cfg.feedback_db or None) if cfg.use_feedback else []
    h_train, h_held = split_by_group(human, cfg.feedback_heldout, cfg.seed)
    s_train, s_held = synthetic_split(cfg.synthetic_file, cfg.seed)
    train, held = train + h_train + s_train, held + h_held + s_held
    return train, held, {"train": describe_preferences(train),
                         "heldout": describe_preferences(held)}


def run(cfg: DPOConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False) -> dict:
    from peft import LoraConfig
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    from .policy import load_causal, start_policy

    t0, out, progress, last = start_run("dpo", cfg, output, progress_file, resume)
    try:
        start, start_name = start_policy(cfg.base_model)
        model, tok = load_causal(start)
        tok.padding_side = "right"
        train, held, desc = build_pairs(cfg)
        manifest = RunManifest("dpo", start, asdict(cfg), cfg.seed,
                               data=desc | {"start_policy": start_name,
                                            "heldout_split": "val split groups"})
        n = model.config.num_hidden_layers
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM",
                          target_modules=[m.strip() for m in cfg.target_modules.split(",")],
                          layers_to_transform=list(range(max(n - cfg.lora_layers, 0), n))
                          if cfg.lora_layers else None)
        set_seed(cfg.seed)
        args = trainer_args_common(cfg, out, True)
        args.update(eval_strategy="no", eval_steps=None,
                    per_device_eval_batch_size=cfg.batch_size)
        dc = TRLDPOConfig(**args, beta=cfg.beta, loss_type=[cfg.loss_type],
                          max_length=cfg.max_length, dataset_num_proc=None,
                          gradient_checkpointing=False)
        trainer = DPOTrainer(model=model, ref_model=None, args=dc, processing_class=tok,
                             train_dataset=to_dataset(train, tok, cfg.max_prompt_tokens),
                             eval_dataset=to_dataset(held, tok, cfg.max_prompt_tokens),
                             peft_config=lora, callbacks=[progress])

        def heldout():
            m = trainer.evaluate()
            return {"pairwise_accuracy": m.get("eval_rewards/accuracies"),
                    "margin": m.get("eval_rewards/margins"), "loss": m.get("eval_loss"),
                    "n": len(held)}

        manifest.metrics_before = {"heldout": heldout()}
        trainer.train(resume_from_checkpoint=last)
        after = heldout()
        manifest.metrics_after = {"heldout": after, "train_loss_log": progress.losses}
        summary = {"heldout_pairwise_accuracy": after["pairwise_accuracy"],
                   "heldout_pairwise_accuracy_before":
                       manifest.metrics_before["heldout"]["pairwise_accuracy"],
                   "heldout_margin": after["margin"], "start_policy": start_name}
        return finish_run(trainer.model, trainer, progress, manifest, "generator", "dpo", cfg,
                          activate, out, t0, summary)
    except Exception as e:
        progress.error(f"{type(e).__name__}: {e}")
        raise
