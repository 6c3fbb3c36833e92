"""The generator as an RL policy (shared by DPO, PPO and `rag eval policy`).

- `start_policy(ref)`: the model alignment starts from - "tuned" (the active instruction-tuned
  generator, the default; the base when none is active), a registered generator, or a path. A
  LoRA start is merged first (`rag model merge`, kept as `<name>-merged`), so the new adapter
  sits on a standalone checkpoint and the reference model is simply that checkpoint with the
  adapter disabled.
- `rl_prompts(split, n)`: held-out-safe prompts (question, numbered sources, gold numbers) from
  the RAFT example builder, rendered with THE serving prompt.
- `generate(model, tok, prompts, ...)`: batched sampling / greedy answers.
"""
from __future__ import annotations

from pathlib import Path


def start_policy(ref: str = "tuned") -> tuple[str, str]:
    """(standalone checkpoint path, display name) of the starting policy."""
    from rag_app.models import ModelRegistry, merge_adapter

    reg = ModelRegistry()
    if ref == "tuned" and reg.active("generator") is None:
        ref = "base"
    base, adapter, name = reg.resolve_generator(ref)
    if adapter is None:
        return base, name
    merged = f"{name}-merged"
    try:
        return reg.get(merged)["path"], merged
    except ValueError:
        pass
    if name not in {e["name"] for e in reg.list("generator")}:
        raise ValueError(f"{ref!r} is an unregistered LoRA adapter: register it or merge it "
                         "into a standalone checkpoint first")
    return merge_adapter(name, new_name=merged, registry=reg)["path"], merged


def load_causal(path: str, adapter: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation and rollouts: prompts end at the same column
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model, tok


def rl_prompts(tok, split: str, n: int, seed: int = 0, n_sources: int = 2,
               p_no_answer: float = 0.15, max_prompt_tokens: int = 280) -> list[dict]:
    """[{question, sources, gold_numbers, group, prompt}] from `split` (train for training;
    val / eval for held-out measurement)."""
    from .data import instruction_examples

    exs = instruction_examples(tok, n, split, ("pubmedqa", "medquad"), 0.5, n_sources, 1,
                               p_no_answer, max_prompt_tokens, 40, seed)
    return [{"question": e.question, "sources": e.sources, "gold_numbers": e.gold_numbers,
             "group": e.group, "prompt": e.prompt, "source": e.source,
             "reference": e.answer} for e in exs]


def generate(model, tok, prompts: list[str], max_new_tokens: int = 48, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 4,
             num_return_sequences: int = 1, first_logits: list | None = None,
             num_beams: int = 1, length_penalty: float = 1.0,
             first_step_bias: dict[int, float] | None = None) -> list[list[int]]:
    """Token ids of each answer, up to and including its EOS (padding removed),
    `num_return_sequences` per prompt, in prompt order. A `first_logits` list receives each
    answer's raw next-token logits at its first step (what the prompt alone predicts), from
    the same pass, in the same order. `num_beams` > 1: beam search (deterministic; no
    sampling, no first-step logits), ranking finished beams by their log-probability divided by
    length ** `length_penalty` (raising it favours longer answers, lowering it shorter ones;
    1 is transformers' default). `first_step_bias` {token id: b} adds b to those tokens' logits
    at the first step only (a decision calibration; `first_logits` stay the raw ones)."""
    import torch

    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} is invalid: use 1 (greedy) or more (beam search)")
    if num_beams > 1 and (do_sample or first_logits is not None):
        raise ValueError("beam search (num_beams > 1) goes with neither sampling nor first_logits")
    if length_penalty != 1.0 and num_beams == 1:
        raise ValueError(f"length_penalty={length_penalty} needs beam search (num_beams > 1)")
    out: list[list[int]] = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            kw = dict(do_sample=do_sample, max_new_tokens=max_new_tokens,
                      pad_token_id=tok.pad_token_id, num_return_sequences=num_return_sequences)
            if do_sample:
                kw |= dict(temperature=temperature, top_p=top_p, top_k=0)
            if num_beams > 1:
                kw |= dict(num_beams=num_beams, early_stopping=True,
                           length_penalty=length_penalty)
            if first_logits is not None:
                kw |= dict(output_logits=True, return_dict_in_generate=True)
            if first_step_bias:
                from transformers import LogitsProcessorList

                kw["logits_processor"] = LogitsProcessorList(
                    [_FirstStepBias(first_step_bias, enc["input_ids"].shape[1])])
            gen = model.generate(**enc, **kw)
            if first_logits is not None:
                first_logits.extend(gen.logits[0].float())
                gen = gen.sequences
            gen = gen[:, enc["input_ids"].shape[1]:]
            for row in gen.tolist():
                ids = []
                for t in row:
                    ids.append(t)
                    if t == tok.eos_token_id:
                        break
                if ids and ids[-1] == tok.pad_token_id != tok.eos_token_id:
                    ids.pop()
                out.append(ids)
    return out


class _FirstStepBias:
    """A logits processor: adds `bias` to the given tokens' scores when the first new token is
    chosen (the batch's left-padded prompts all end at `prompt_len`)."""

    def __init__(self, bias: dict[int, float], prompt_len: int):
        self.bias, self.prompt_len = bias, prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] != self.prompt_len:
            return scores
        scores = scores.clone()
        for token, b in self.bias.items():
            scores[:, token] += b
        return scores


def answer_text(tok, ids: list[int]) -> str:
    from rag_app.prompts import trim_generation

    return trim_generation(tok.decode(ids, skip_special_tokens=True).strip())
