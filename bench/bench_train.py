"""Training throughput of our trainers against a bare `transformers.Trainer` step on the same
batch, in the same run (SmolLM2-135M, fp32, CPU): training tokens/s and the ratio ours/bare.

Rows (each: one warm-up step, then --steps timed steps; median step time):
  bare Trainer            plain transformers.Trainer, full fine-tuning, causal-LM loss
  pretrain                training/pretrain.py's trainer (full FT, no penalty)
  pretrain + EWC          the same with the EWC penalty in compute_loss
  instruct LoRA (ours)    training/instruct.py's SFTTrainer: LoRA on the last 8 layers, fp32
  instruct LoRA, TRL bf16 the same SFTTrainer with TRL's default bf16=True (emulated on CPUs
                          without bf16 units: the reason training/common.py turns it off)

    python bench/bench_train.py [--steps 3] [--batch 4] [--block 128] [--skip-bf16]
"""
from __future__ import annotations

import argparse
import tempfile
import time

from common import median, peak_rss_mb, save


def step_times(trainer, n: int) -> list[float]:
    from transformers import TrainerCallback

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.args.max_steps = n + 1
    trainer.train()
    return times[1:]  # the first step warms up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args()
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from training.common import load_config
    from training.instruct import InstructConfig, build_examples, load_base, make_trainer
    from training.lmdata import pack, text_split
    from training.pretrain import PretrainConfig, make_trainer as pretrain_trainer
    from training.regularizers import QuadraticPenalty
    from rag_app.generate import ensure_base_checkpoint

    base = str(ensure_base_checkpoint())
    _, tok = load_base(base)
    train, _ = text_split("domain", 0.05, 0)
    blocks = pack([d.text for d in train[:400]], tok, args.block, args.batch * (args.steps + 2))
    tokens = args.batch * args.block
    rows: dict[str, dict] = {}
    tmp = tempfile.mkdtemp(prefix="bench-train-")

    def record(name, times, n_tokens):
        m = median(times)
        rows[name] = {"step_s": round(m, 3), "tokens_per_s": round(n_tokens / m, 1),
                      "steps": [round(t, 3) for t in times]}
        print(f"{name:28s} {m:7.2f} s/step  {n_tokens / m:8.1f} tokens/s", flush=True)

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}

    ds = Dataset.from_dict({"input_ids": blocks})
    model, _ = load_base(base)
    bare = Trainer(model=model, data_collator=collate, train_dataset=ds, args=TrainingArguments(
        output_dir=f"{tmp}/bare", per_device_train_batch_size=args.batch, learning_rate=1e-4,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, logging_steps=1000))
    record("bare Trainer (full FT)", step_times(bare, args.steps), tokens)

    cfg = load_config(PretrainConfig, "pretrain.yaml", [f"batch_size={args.batch}",
                                                         f"block_size={args.block}"])
    cfg.save_steps = 10_000
    for name, penalty in (("pretrain (full FT)", None), ("pretrain + EWC", "ewc")):
        model, _ = load_base(base)
        pen = None
        if penalty:
            imp = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
            pen = QuadraticPenalty(model, imp, 0.01)
        tr = pretrain_trainer(cfg, model, tok, "clm", blocks, f"{tmp}/{name[:8]}",
                              _NoProgress(), pen)
        tr.args.disable_tqdm = True
        record(name, step_times(tr, args.steps), tokens)

    icfg = load_config(InstructConfig, "instruct.yaml", [f"batch_size={args.batch}",
                                                         "n_val_examples=0", "save_steps=10000"])
    exs = build_examples(icfg, tok, "train", args.batch * (args.steps + 2))
    ex_tokens = sum(len(tok(e.prompt + e.completion, add_special_tokens=False)["input_ids"])
                    for e in exs) / len(exs) * args.batch
    variants = [("instruct LoRA (ours, fp32)", False)] + \
        ([] if args.skip_bf16 else [("instruct LoRA, TRL bf16", True)])
    for name, bf16 in variants:
        model, _ = load_base(base)
        icfg.bf16 = bf16
        tr = make_trainer(icfg, model, tok, exs, [], f"{tmp}/{name[:8]}", _NoProgress())
        tr.args.disable_tqdm = True
        record(name, step_times(tr, args.steps), ex_tokens)
    b = rows["bare Trainer (full FT)"]["tokens_per_s"]
    print(f"\n{'ratio tokens/s vs bare Trainer':28s}")
    for name, r in rows.items():
        r["ratio_vs_bare"] = round(r["tokens_per_s"] / b, 3)
        print(f"  {name:26s} {r['ratio_vs_bare']:.3f}")
    if "instruct LoRA, TRL bf16" in rows:
        sp = rows["instruct LoRA (ours, fp32)"]["tokens_per_s"] / \
            rows["instruct LoRA, TRL bf16"]["tokens_per_s"]
        print(f"  fp32 vs TRL's bf16 default : {sp:.2f}x faster")
    print(f"batch {args.batch} x {args.block} tokens (instruct: {ex_tokens:.0f} tokens/batch); "
          f"peak RSS {peak_rss_mb():.0f} MB; torch threads {torch.get_num_threads()}")
    save("train", {"batch": args.batch, "block": args.block, "rows": rows,
                   "peak_rss_mb": peak_rss_mb()})


class _NoProgress:
    """A stand-in for training.common.ProgressCallback (no progress file in a benchmark)."""

    def __new__(cls):
        from training.common import ProgressCallback

        return ProgressCallback(None)


if __name__ == "__main__":
    main()
