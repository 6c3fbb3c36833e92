"""Synthetic preference pairs for the reward model, when there is too little human feedback.

For each training-split prompt (question + numbered sources, rendered with THE serving prompt;
some without the gold passage), the policy samples k answers; `training.data.rubric_score`
ranks them (grounding in the cited sources, citation validity, refusal when the evidence is
missing, length) and the best and the worst make a pair when their totals differ by >= margin.
Every pair is labelled `synthetic:rubric`, so reward figures report it apart from human and
data-derived pairs. The pairs are written as JSON lines that `rag train reward --set
synthetic_file=PATH` reads (split by question there: 20% held out).

    rag train synthetic-prefs --recipe training/recipes/synthetic-prefs.yaml [--set k=v]
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from .common import RunManifest, TrainConfig, run_dir, set_seed


@dataclass
class SyntheticPrefsConfig(TrainConfig):
    policy: str = "tuned"  # the generator that samples: tuned | base | registered name | path
    split: str = "train"  # never val/eval: those are the reward model's held-out questions
    n_prompts: int = 48
    k: int = 4  # sampled answers per prompt
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 48
    margin: float = 0.25  # min rubric difference between chosen and rejected
    all_pairs: bool = False  # every two answers apart by >= margin, not only best vs worst
    n_sources: int = 2
    p_no_answer: float = 0.25  # prompts without the gold passage (refusal is right there)
    max_prompt_tokens: int = 280
    batch_size: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.split != "train":
            raise ValueError(f"split={self.split!r} is invalid: synthetic training pairs come "
                             "from the train split only (val/eval are held out)")
        if self.k < 2 or self.n_prompts < 1:
            raise ValueError("k >= 2 and n_prompts >= 1 are required")
        if not 0.0 < self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature} is invalid: use 0 < t <= 2")


def sampler(model, tok, cfg: SyntheticPrefsConfig):
    """generate(prompt dict, k) -> k sampled answer texts (what `synthetic_pairs` calls)."""
    from .policy import answer_text, generate

    def sample(p: dict, k: int) -> list[str]:
        ids = generate(model, tok, [p["prompt"]], cfg.max_new_tokens, do_sample=True,
                       temperature=cfg.temperature, top_p=cfg.top_p, batch_size=1,
                       num_return_sequences=k)
        return [answer_text(tok, x) for x in ids]

    return sample


def run(cfg: SyntheticPrefsConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False) -> dict:
    from tqdm.auto import tqdm

    from .common import ProgressCallback
    from .data import describe_preferences, synthetic_pairs
    from .policy import load_causal, rl_prompts, start_policy

    if resume:
        raise ValueError("rag train synthetic-prefs has no checkpoints: run it again")
    if activate:
        raise ValueError("rag train synthetic-prefs writes pairs, not a model: nothing to "
                         "activate (use them with `rag train reward --set synthetic_file=...`)")
    t0 = time.time()
    set_seed(cfg.seed)
    out = run_dir("synthetic-prefs", output)
    progress = ProgressCallback(progress_file)
    try:
        path, name = start_policy(cfg.policy)
        model, tok = load_causal(path)
        prompts = rl_prompts(tok, cfg.split, cfg.n_prompts, cfg.seed, cfg.n_sources,
                             cfg.p_no_answer, cfg.max_prompt_tokens)[:cfg.n_prompts]
        progress.emit("start", 0, len(prompts), output=str(out))
        sample = sampler(model, tok, cfg)
        pairs = []
        for i, p in enumerate(tqdm(prompts, desc="sampling answers", unit="prompt")):
            pairs += synthetic_pairs([p], sample, cfg.k, cfg.margin, cfg.all_pairs)
            progress.emit("step", i + 1, len(prompts), metrics={"pairs": len(pairs)})
        path_out = out / "synthetic_pairs.jsonl"
        with open(path_out, "w", encoding="utf-8") as f:
            for pr in pairs:
                f.write(json.dumps(pr.to_dict(), ensure_ascii=False) + "\n")
        stats = describe_preferences(pairs) | {
            "prompts": len(prompts), "k": cfg.k, "yield": round(len(pairs) / len(prompts), 3),
            "file": str(path_out)}
        manifest = RunManifest("synthetic-prefs", path, asdict(cfg), cfg.seed,
                               data=stats | {"policy": name, "rubric": "training.data."
                                             "rubric_score (RUBRIC weights)"})
        manifest.wall_time_s = round(time.time() - t0, 1)
        manifest.write(out)
        progress.done(str(path_out), stats, len(prompts), len(prompts))
        print(f"{len(pairs)} synthetic:rubric pairs from {len(prompts)} prompts -> {path_out}\n"
              f"use them: rag train reward --set synthetic_file={path_out}")
        return {"entry": None, "manifest": manifest.to_dict(), "run_dir": str(out),
                "pairs": pairs}
    except Exception as e:
        progress.error(f"{type(e).__name__}: {e}")
        raise
