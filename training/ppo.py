"""PPO of the generator (LoRA) against the reward model, with a KL penalty to the reference.

TRL removed its PPO trainer after 1.12.0 (../shared/TRAINING_NOTES.md); this is a compact PPO
in the style of Ziegler et al. (2019) / TRL's old PPOTrainer, its maths in small tested
functions:

    per-token reward  r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))
                      + [t = last] * (score + shaping)      (score: normalised reward model)
    advantages        GAE(gamma, lambda) over r_t and the value head's V(s_t), whitened
    policy loss       max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = pi/pi_old
    value loss        0.5 * max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)
    beta              fixed, or adaptive: beta *= 1 + clip(KL / target - 1, -.2, .2) * n / horizon

The policy is the starting generator (training/policy.py: start_policy) with a fresh LoRA
adapter; the reference is the same model with the adapter disabled (no second copy); the value
head is a linear layer on the policy's last hidden state. Reward shaping terms (length,
citation validity, refusal when the evidence is missing, grounding: training/data.py
rubric_score) are
added to the score with their own coefficients and logged separately. Rewards are normalised
by running moments; training stops early when the mean KL passes `kl_stop`. Checkpoints
(adapter, value head, optimiser, KL controller, moments, step, log) every `save_steps`;
--resume continues from the last.

    rag train ppo --recipe training/recipes/ppo.yaml [--set k=v] [--resume] [--activate]
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import RunManifest, TrainConfig, save_and_register, set_seed

log = logging.getLogger(__name__)


@dataclass
class PPOConfig(TrainConfig):
    base_model: str = "tuned"  # the starting policy: the active tuned generator (else base)
    reward_model: str = "reward"  # the active reward model, a registered name or a path
    max_steps: int = 12  # PPO iterations (one batch of rollouts each)
    batch_size: int = 4  # rollouts per iteration
    mini_batch_size: int = 2
    ppo_epochs: int = 2
    learning_rate: float = 5e-5
    n_prompts: int = 64  # training prompts (train split), cycled
    n_eval_prompts: int = 16  # held-out prompts (val split) for before/after
    n_sources: int = 2
    p_no_answer: float = 0.2
    max_prompt_tokens: int = 280
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    # KL
    kl_coef: float = 0.1
    adaptive_kl: bool = True
    target_kl: float = 4.0  # per sequence (sum over tokens), nats
    kl_horizon: int = 1000
    kl_stop: float = 20.0  # early stop when the mean sequence KL passes this
    # GAE / clipping
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    normalize_score: bool = True
    # shaping (added to the reward model's score; 0 switches a term off)
    length_coef: float = 0.2
    citation_coef: float = 0.3
    refusal_coef: float = 0.5
    grounding_coef: float = 0.0  # x (grounding - 1): minus the share of ungrounded content words
    # LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_layers: int = 8  # LoRA on the last N decoder layers (0 = all)
    target_modules: str = "q_proj,v_proj"


# ---------------------------------------------------------------- the maths (tested) ---------
def token_logprobs(logits, ids):
    """log p(ids[t]) under logits[t] (logits already aligned: logits[:, t] predicts ids[:, t])."""
    import torch

    return torch.gather(logits.log_softmax(-1), 2, ids.unsqueeze(-1)).squeeze(-1)


def masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, shift_mean: bool = True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * (var + 1e-8).rsqrt()
    return (out if shift_mean else out + mean) * mask


def kl_per_token(logp, ref_logp):
    """k1 estimator log pi - log pi_ref: exactly 0 when the policy equals the reference."""
    return logp - ref_logp


def per_token_rewards(score, kl, kl_coef: float, mask):
    """-kl_coef * KL on every answer token, plus the sequence score on the last one."""
    import torch

    rewards = -kl_coef * kl * mask
    last = (mask.sum(1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(score)), last] += score
    return rewards


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """(advantages, returns): generalised advantage estimation, masked positions zero."""
    import torch

    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        nxt = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros(rewards.shape[0])
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)
        adv[:, t] = last * mask[:, t]
    return adv, (adv + values) * mask


def ppo_losses(logp, old_logp, adv, values, old_values, returns, mask, cliprange: float,
               cliprange_value: float) -> dict:
    import torch

    ratio = torch.exp(logp - old_logp)
    pg = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange)),
                     mask)
    v_clip = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clip - returns) ** 2), mask)
    clipfrac = masked_mean(((ratio - 1).abs() > cliprange).float(), mask)
    approx_kl = 0.5 * masked_mean((logp - old_logp) ** 2, mask)
    return {"pg_loss": pg, "vf_loss": vf, "clipfrac": clipfrac, "approx_kl": approx_kl}


class AdaptiveKL:
    """Ziegler et al.: nudges beta so that the per-sequence KL tracks `target`."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target:
            err = min(max(kl / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + err * n_steps / self.horizon
        return self.coef


class RunningMoments:
    """Running mean / std of the scores (Chan et al. parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, xs: list[float]) -> None:
        n = len(xs)
        if not n:
            return
        m = sum(xs) / n
        v = sum((x - m) ** 2 for x in xs) / n
        delta, tot = m - self.mean, self.count + n
        self.mean += delta * n / tot
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / tot) / tot
        self.count = tot

    def normalise(self, x: float) -> float:
        return (x - self.mean) / math.sqrt(self.var + 1e-8)


def shaping_terms(answer: str, sources: list, gold_numbers: list | None, cfg: PPOConfig) -> dict:
    """The configurable shaping terms, each coefficient x rubric term (training/data.py):
    length (<= 0: words beyond 60), citation (+ cites given sources, - cites missing ones),
    refusal (+ refuses when no source answers, - refuses wrongly or answers without evidence),
    grounding (<= 0: minus the share of the answer's content words absent from its sources)."""
    from .data import rubric_score

    r = rubric_score(answer, sources, gold_numbers)
    return {"length": cfg.length_coef * r["length"],
            "citation": cfg.citation_coef * r["citation"],
            "refusal": cfg.refusal_coef * r["refusal"],
            "grounding": cfg.grounding_coef * (r["grounding"] - 1.0)}


# ---------------------------------------------------------------- the model ------------------
class ValueHead:
    """A linear value head on the policy's last hidden state (its own small module)."""

    def __init__(self, hidden: int):
        import torch

        self.linear = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def __call__(self, hidden_states):
        return self.linear(hidden_states).squeeze(-1)


def forward(model, head, input_ids, attention_mask, n_prompt: int, with_values: bool = True):
    """(logprobs, values) of the answer tokens input_ids[:, n_prompt:]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                output_hidden_states=with_values)
    logits = out.logits[:, n_prompt - 1:-1].float()
    logp = token_logprobs(logits, input_ids[:, n_prompt:])
    values = head(out.hidden_states[-1][:, n_prompt - 1:-1].float()) if with_values else None
    return logp, values


def make_policy(start: str, cfg: PPOConfig):
    from peft import LoraConfig, get_peft_model

    from .policy import load_causal

    model, tok = load_causal(start)
    n = model.config.num_hidden_layers
    layers = list(range(max(n - cfg.lora_layers, 0), n)) if cfg.lora_layers else None
    model = get_peft_model(model, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
        target_modules=[m.strip() for m in cfg.target_modules.split(",") if m.strip()],
        layers_to_transform=layers, task_type="CAUSAL_LM"))
    return model, tok


# ---------------------------------------------------------------- scoring --------------------
class Scorer:
    """Reward model score + shaping for (prompt record, answer text)."""

    def __init__(self, reward_path: str, cfg: PPOConfig):
        from .reward import load_reward_model, reward_settings

        self.settings = reward_settings(reward_path)
        self.model, self.tok = load_reward_model(reward_path, self.settings["max_length"])
        self.cfg = cfg

    def __call__(self, recs: list[dict], answers: list[str]) -> tuple[list[float], list[dict]]:
        from .reward import reward_text, score_texts

        st = self.settings
        texts = [reward_text(r["question"], r["sources"], a, st["source_words"],
                             st["answer_words"]) for r, a in zip(recs, answers)]
        scores = score_texts(self.model, self.tok, texts, max_length=st["max_length"])
        shaping = [shaping_terms(a, r["sources"], r["gold_numbers"], self.cfg)
                   for r, a in zip(recs, answers)]
        return scores, shaping


def collate(tok, prompts: list[str], answers: list[list[int]]):
    """Left-padded prompts + right-padded answers -> (input_ids, attention_mask, answer_mask,
    n_prompt). Every answer has at least one token (EOS when empty)."""
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    answers = [a or [tok.eos_token_id] for a in answers]
    T = max(len(a) for a in answers)
    ans = torch.full((len(answers), T), tok.pad_token_id, dtype=torch.long)
    amask = torch.zeros((len(answers), T))
    for i, a in enumerate(answers):
        ans[i, :len(a)] = torch.tensor(a)
        amask[i, :len(a)] = 1
    ids = torch.cat([enc["input_ids"], ans], 1)
    att = torch.cat([enc["attention_mask"], amask.long()], 1)
    return ids, att, amask, enc["input_ids"].shape[1]


# ---------------------------------------------------------------- the loop -------------------
def ppo_step(model, head, opt, tok, recs, scorer, kl_ctl, moments, cfg: PPOConfig) -> dict:
    """One iteration: rollouts -> scores -> KL-penalised rewards -> GAE -> PPO epochs."""
    import torch

    from .policy import answer_text, generate

    prompts = [r["prompt"] for r in recs]
    gen = generate(model, tok, prompts, cfg.max_new_tokens, True, cfg.temperature, cfg.top_p,
                   batch_size=len(prompts))
    texts = [answer_text(tok, g) for g in gen]
    scores, shaping = scorer(recs, texts)
    if cfg.normalize_score:
        moments.update(scores)
        norm = [moments.normalise(s) for s in scores]
    else:
        norm = scores
    total = torch.tensor([n + sum(s.values()) for n, s in zip(norm, shaping)])
    ids, att, mask, P = collate(tok, prompts, gen)
    model.eval()
    with torch.no_grad():
        old_logp, old_values = forward(model, head, ids, att, P)
        with model.disable_adapter():
            ref_logp, _ = forward(model, None, ids, att, P, with_values=False)
    kl = kl_per_token(old_logp, ref_logp) * mask
    rewards = per_token_rewards(total, kl, kl_ctl.coef, mask)
    adv, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
    adv = masked_whiten(adv, mask)
    model.train()
    stats: dict[str, list] = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": []}
    n = len(recs)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n)
        for j in range(0, n, cfg.mini_batch_size):
            b = order[j:j + cfg.mini_batch_size]
            logp, values = forward(model, head, ids[b], att[b], P)
            losses = ppo_losses(logp, old_logp[b], adv[b], values, old_values[b], returns[b],
                                mask[b], cfg.cliprange, cfg.cliprange_value)
            loss = losses["pg_loss"] + cfg.vf_coef * losses["vf_loss"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                           1.0)
            opt.step()
            for k in stats:
                stats[k].append(float(losses[k]))
    seq_kl = float(kl.sum(1).mean())
    kl_ctl.update(seq_kl, n)
    words = [len(t.split()) for t in texts]
    return {"score": sum(scores) / n, "reward": float(total.mean()), "kl": seq_kl,
            "kl_coef": kl_ctl.coef, "words": sum(words) / n,
            **{f"shaping_{k}": sum(s[k] for s in shaping) / n for k in shaping[0]},
            **{k: sum(v) / len(v) for k, v in stats.items()}, "sample": texts[0][:200]}


def _save_checkpoint(out: Path, step: int, model, head, opt, kl_ctl, moments, history) -> None:
    import os
    import shutil

    import torch

    tmp = out / f".checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    torch.save({"value_head": head.linear.state_dict(), "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state()}, tmp / "ppo_state.pt")
    (tmp / "ppo_state.json").write_text(json.dumps({
        "step": step, "kl_coef": kl_ctl.coef, "moments": [moments.mean, moments.var,
                                                          moments.count],
        "history": history}))
    final = out / f"checkpoint-{step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _last_checkpoint(out: Path) -> Path | None:
    cps = sorted((p for p in out.glob("checkpoint-*") if (p / "ppo_state.json").exists()),
                 key=lambda p: int(p.name.split("-")[1]))
    return cps[-1] if cps else None


def evaluate_policy(model, tok, recs, scorer, max_new_tokens: int) -> dict:
    """Greedy answers on held-out prompts: mean reward-model score, rubric total, words,
    refusal accuracy; KL of the answers to the reference (the adapter disabled)."""
    import torch

    from .data import rubric_score
    from .policy import answer_text, generate

    gen = generate(model, tok, [r["prompt"] for r in recs], max_new_tokens, batch_size=4)
    texts = [answer_text(tok, g) for g in gen]
    scores, _ = scorer(recs, texts)
    rub = [rubric_score(t, r["sources"], r["gold_numbers"]) for t, r in zip(texts, recs)]
    kls = []
    if hasattr(model, "disable_adapter"):
        with torch.no_grad():
            for i in range(0, len(recs), 4):
                ids, att, mask, P = collate(tok, [r["prompt"] for r in recs[i:i + 4]],
                                            gen[i:i + 4])
                lp, _ = forward(model, None, ids, att, P, with_values=False)
                with model.disable_adapter():
                    ref, _ = forward(model, None, ids, att, P, with_values=False)
                kls += (kl_per_token(lp, ref) * mask).sum(1).tolist()
    n = max(len(recs), 1)
    return {"score": sum(scores) / n, "rubric": sum(r["total"] for r in rub) / n,
            "words": sum(len(t.split()) for t in texts) / n,
            "kl": sum(kls) / len(kls) if kls else 0.0, "n": len(recs),
            "scores": scores, "rubric_each": [r["total"] for r in rub], "answers": texts}


def plot_curves(history: list[dict], path: str) -> None:
    """Reward, score, KL and the shaping terms per PPO iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for k in ("reward", "score"):
        axes[0].plot(steps, [h[k] for h in history], marker=".", label=k)
    axes[0].set_title("reward (total) and reward-model score", fontsize=9)
    axes[1].plot(steps, [h["kl"] for h in history], marker=".", label="KL (nats/answer)")
    axes[1].plot(steps, [h["kl_coef"] for h in history], marker=".", label="beta")
    axes[1].set_title("KL to the reference", fontsize=9)
    for k in [k for k in history[0] if k.startswith("shaping_")]:
        axes[2].plot(steps, [h[k] for h in history], marker=".", label=k[8:])
    axes[2].set_title("shaping terms", fontsize=9)
    for a in axes:
        a.set_xlabel("PPO iteration")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: PPOConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False) -> dict:
    import torch
    from tqdm.auto import tqdm

    from .policy import rl_prompts, start_policy
    from .reward import resolve_reward

    t0 = time.time()
    set_seed(cfg.seed)
    from .common import ProgressCallback, run_dir

    out = run_dir("ppo", output)
    progress = ProgressCallback(progress_file)
    try:
        last = _last_checkpoint(out) if resume else None
        if resume and last is None:
            raise ValueError(f"--resume: no PPO checkpoint in {out}: pass the --output of the "
                             "interrupted run, or drop --resume")
        start, start_name = start_policy(cfg.base_model)
        reward_path = resolve_reward(cfg.reward_model)
        model, tok = make_policy(start, cfg)
        head = ValueHead(model.config.hidden_size)
        scorer = Scorer(reward_path, cfg)
        train = rl_prompts(tok, "train", cfg.n_prompts, cfg.seed, cfg.n_sources,
                           cfg.p_no_answer, cfg.max_prompt_tokens)
        held = rl_prompts(tok, "val", cfg.n_eval_prompts, cfg.seed + 1, cfg.n_sources,
                          cfg.p_no_answer, cfg.max_prompt_tokens)
        params = [p for p in model.parameters() if p.requires_grad] + \
            list(head.linear.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
        kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl if cfg.adaptive_kl else None,
                            cfg.kl_horizon)
        moments = RunningMoments()
        history: list[dict] = []
        step = 0
        manifest = RunManifest("ppo", start, asdict(cfg), cfg.seed,
                               data={"start_policy": start_name, "reward_model": reward_path,
                                     "train_prompts": len(train), "heldout_prompts": len(held),
                                     "heldout_split": "val (other foci / pmids)"})
        if last is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(last / "adapter_model.safetensors")))
            st = torch.load(last / "ppo_state.pt", weights_only=False)
            head.linear.load_state_dict(st["value_head"])
            opt.load_state_dict(st["optimizer"])
            torch.set_rng_state(st["rng"])
            js = json.loads((last / "ppo_state.json").read_text())
            step, kl_ctl.coef, history = js["step"], js["kl_coef"], js["history"]
            moments.mean, moments.var, moments.count = js["moments"]
            manifest.metrics_before = js.get("before", {})
        progress.emit("start", step, cfg.max_steps, output=str(out))
        if not manifest.metrics_before:  # the start policy = the adapter disabled
            with model.disable_adapter():
                before = evaluate_policy(model, tok, held, scorer, cfg.max_new_tokens)
            manifest.metrics_before = before
            progress.emit("eval", step, cfg.max_steps, metrics={
                "before_" + k: v for k, v in before.items() if isinstance(v, float)})
        stopped = ""
        t_loop = time.time()
        first = step
        bar = tqdm(total=cfg.max_steps, initial=step, desc="PPO iterations", unit="it")
        while step < cfg.max_steps:
            recs = [train[(step * cfg.batch_size + i) % len(train)]
                    for i in range(cfg.batch_size)]
            stats = ppo_step(model, head, opt, tok, recs, scorer, kl_ctl, moments, cfg)
            step += 1
            stats["step"] = step
            history.append(stats)
            eta = (time.time() - t_loop) / (step - first) * (cfg.max_steps - step)
            progress.loss = stats["pg_loss"]
            progress.losses.append((step, stats["pg_loss"]))
            progress.emit("step", step, cfg.max_steps, stats["pg_loss"], eta,
                          metrics={k: v for k, v in stats.items() if k != "sample"})
            log.info("ppo step %d: %s", step, {k: round(v, 3) for k, v in stats.items()
                                               if isinstance(v, float)})
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.2f}", kl=f"{stats['kl']:.2f}",
                            words=f"{stats['words']:.0f}")
            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                _save_checkpoint(out, step, model, head, opt, kl_ctl, moments, history)
                js = json.loads((out / f"checkpoint-{step}" / "ppo_state.json").read_text())
                js["before"] = {k: v for k, v in manifest.metrics_before.items()}
                (out / f"checkpoint-{step}" / "ppo_state.json").write_text(json.dumps(js))
            if stats["kl"] > cfg.kl_stop:
                stopped = f"KL {stats['kl']:.2f} > kl_stop {cfg.kl_stop}"
                log.warning("early stop: %s", stopped)
                break
        bar.close()
        after = evaluate_policy(model, tok, held, scorer, cfg.max_new_tokens)
        wins = [a > b for a, b in zip(after["scores"], manifest.metrics_before["scores"])]
        rwins = [a > b for a, b in zip(after["rubric_each"], manifest.metrics_before["rubric_each"])]
        summary = {"score_before": manifest.metrics_before["score"], "score_after": after["score"],
                   "rubric_before": manifest.metrics_before["rubric"],
                   "rubric_after": after["rubric"], "kl_after": after["kl"],
                   "words_before": manifest.metrics_before["words"], "words_after": after["words"],
                   "win_rate_reward": sum(wins) / max(len(wins), 1),
                   "win_rate_rubric": sum(rwins) / max(len(rwins), 1),
                   "steps": step, "early_stop": stopped}
        manifest.metrics_after = after | {"summary": summary}
        manifest.train_log = history
        manifest.wall_time_s = round(time.time() - t0, 1)
        plot_curves(history, str(out / "ppo_curves.png"))
        entry = save_and_register(model, "generator", "ppo", manifest, cfg.name, activate)
        manifest.write(out)
        progress.done(entry["path"], summary, step, cfg.max_steps)
        return {"entry": entry, "manifest": manifest.to_dict(), "run_dir": str(out),
                "model": model, "history": history}
    except Exception as e:
        progress.error(f"{type(e).__name__}: {e}")
        raise
