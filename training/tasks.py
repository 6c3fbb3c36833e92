"""Single-task LoRA tuning of the generator (summarisation, QA) through the instruct machinery.

A task is: rows of one held-out-safe split -> prompts rendered by `render_prompt` (THE task
prompts, `PROMPTS`, used for training AND evaluation) -> `TaskExample`s that fit max_length
-> `training.instruct.train_and_register` (the same LoRA + TRL SFTTrainer core as `rag train
instruct`, completion-only loss, resumable checkpoints, progress file, manifest, registered as a
"generator"). The tasks themselves live in training/summarize.py and training/qa.py; the
evaluation helpers here (greedy batched generation with left padding, a tqdm bar) serve
`rag eval summarize` and `rag eval qa-gold`.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import RunManifest, start_run
from .instruct import LoraSFTConfig, load_base, resolve_base_generator, train_and_register

# THE task prompts: (system prompt, user template). `{source}` is the (truncated) input text.
PROMPTS = {
    "question-summary": (
        "You are a medical assistant who summarises consumer health questions.",
        "Question:\n{source}\n\nSummarise this question as one short question that keeps its "
        "medical focus."),
    "answer-summary": (
        "You are a medical assistant who summarises answers to consumer health questions.",
        "Question: {question}\n\nAnswers:\n{source}\n\nSummarise the answers in one to three "
        "sentences that answer the question."),
    "qa": (
        "You are a biomedical research assistant. Answer the research question from the "
        "abstract only.",
        "Abstract:\n{source}\n\nQuestion: {question}\n\nStart with yes, no or maybe, then give "
        "the conclusion in one or two sentences."),
}
TRUNCATION_MARK = " ..."


@dataclass
class TaskConfig(LoraSFTConfig):
    """LoRA settings (LoraSFTConfig) + the data budget of a single task."""
    n_examples: int = 0  # training rows used, after a seeded shuffle (0 = all)
    n_val_examples: int = 16  # eval loss before/after, from the TRAINING side's val slice
    val_fraction: float = 0.1  # share of the training side kept aside as validation
    max_source_tokens: int = 160  # the input text (question / abstract) is cut to this
    max_target_tokens: int = 48  # the reference completion is cut to this (EOS always kept)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError(f"val_fraction={self.val_fraction!r} is invalid: use 0 <= f < 0.5")
        if self.max_source_tokens < 8 or self.max_target_tokens < 4:
            raise ValueError("max_source_tokens must be >= 8 and max_target_tokens >= 4")
        if self.max_source_tokens + self.max_target_tokens + 16 > self.max_length:
            raise ValueError(f"max_source_tokens={self.max_source_tokens} + max_target_tokens="
                             f"{self.max_target_tokens} leave no room for the prompt within "
                             f"max_length={self.max_length}: raise max_length or lower them")
        if self.n_examples < 0 or self.n_val_examples < 0:
            raise ValueError("n_examples and n_val_examples must be >= 0 (0 = all / none)")


@dataclass
class TaskExample:
    id: str  # the row's stable id (MeQSum File, pmid, ...): the unit of the held-out split
    source: str  # meqsum | mediqa-question | mediqa-answer | pubmedqa
    prompt: str
    completion: str  # target + EOS (what the loss sees)
    target: str  # the reference as trained on (cut to max_target_tokens)
    reference: str  # the full reference (what evaluation scores against)
    prompt_tokens: int
    label: str | None = None  # QA: the gold yes/no/maybe


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_tokens(tokenizer, text: str, n: int, mark: str = TRUNCATION_MARK) -> str:
    """`text` cut to its first `n` tokens, + `mark` when cut."""
    text = text.strip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= n:
        return text
    return tokenizer.decode(ids[:n]).rstrip() + mark


def render_prompt(tokenizer, task: str, source: str, max_source_tokens: int | None,
                  **fields) -> str:
    """THE prompt of `task` (training and evaluation call this): the chat template with the
    task's system prompt and its user template, `source` cut to max_source_tokens."""
    if task not in PROMPTS:
        raise ValueError(f"task={task!r} is invalid: choose one of {sorted(PROMPTS)}")
    if not source or not source.strip():
        raise ValueError(f"an empty input text cannot be rendered for task {task!r}")
    if max_source_tokens:
        source = truncate_tokens(tokenizer, source, max_source_tokens)
    system, user = PROMPTS[task]
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": user.format(source=source, **fields)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_fingerprint(tasks: tuple[str, ...]) -> dict:
    text = "\n".join(f"{t}\n{PROMPTS[t][0]}\n{PROMPTS[t][1]}" for t in tasks)
    return {"module": "training.tasks", "tasks": list(tasks),
            "sha1": hashlib.sha1(text.encode()).hexdigest()[:12]}


def make_example(tokenizer, cfg: TaskConfig, id: str, source: str, prompt: str, target: str,
                 label: str | None = None) -> TaskExample:
    """An example that fits max_length: the target is cut to max_target_tokens (and to the
    room the prompt leaves); the EOS is never cut."""
    p_tok = n_tokens(tokenizer, prompt)
    room = min(cfg.max_target_tokens, cfg.max_length - p_tok - 1)
    if room < 4:
        raise ValueError(f"a prompt of {p_tok} tokens ({id}) leaves no room for the target "
                         f"within max_length={cfg.max_length}: lower max_source_tokens or raise "
                         "max_length")
    cut = truncate_tokens(tokenizer, target, room, mark="")
    return TaskExample(id, source, prompt, cut + tokenizer.eos_token, cut, target.strip(),
                       p_tok, label)


def is_val(key: str, fraction: float) -> bool:
    """The fixed validation slice of the training side (same hash as training/data.py)."""
    h = int(hashlib.sha1(("val:" + key).encode()).hexdigest(), 16) % 1000
    return h < fraction * 1000


def take(rows: list, n: int, seed: int) -> list:
    """A seeded shuffle of `rows`, the first `n` (0 = all)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n] if n else rows


def describe(examples: list[TaskExample]) -> dict:
    n = max(len(examples), 1)
    return {"n": len(examples), "by_source": dict(Counter(e.source for e in examples)),
            "mean_prompt_tokens": round(sum(e.prompt_tokens for e in examples) / n, 1),
            "mean_target_words": round(sum(len(e.target.split()) for e in examples) / n, 1),
            "labels": dict(Counter(e.label for e in examples if e.label))}


def run_task(training_type: str, cfg: TaskConfig,
             build: Callable[[TaskConfig, object, str], list[TaskExample]], data: dict,
             output: str | None = None, progress_file: str | None = None, resume: bool = False,
             activate: bool = False) -> dict:
    """The whole single-task run: train / val examples from `build(cfg, tokenizer, split)` ->
    the shared SFT core (eval loss before, train, eval loss after, save + register)."""
    t0, out, progress, last = start_run(training_type, cfg, output, progress_file, resume)
    try:
        base = resolve_base_generator(cfg.base_model)
        model, tokenizer = load_base(base)
        train = build(cfg, tokenizer, "train")
        if not train:
            raise ValueError(f"no {training_type} training example: check sources={cfg.sources!r}")
        val = build(cfg, tokenizer, "val")[:cfg.n_val_examples] if cfg.n_val_examples else []
        manifest = RunManifest(training_type, base, asdict(cfg), cfg.seed,
                               data=data | {"train": describe(train), "val": describe(val)})
        return train_and_register(training_type, cfg, model, tokenizer, train, val, manifest,
                                  out, progress, last, activate, t0) | {"examples": train,
                                                                        "val": val,
                                                                        "tokenizer": tokenizer}
    except Exception as e:
        progress.error(f"{type(e).__name__}: {e}")
        raise


# ---------- evaluation ----------
def trained_on_val(path: str | None, task: str, val_fraction: float) -> bool:
    """Whether the model folder `path`, tuned for `task` (its manifest says so), saw rows of
    the validation slice that `val_fraction` defines: its recipe kept a smaller slice aside
    (0 = none, a final fit on the whole training side). is_val's slices are nested, so a
    larger or equal fraction kept every one of these rows out."""
    manifest = Path(path) / "manifest.json" if path else None
    if manifest is None or not manifest.is_file():
        return False
    man = json.loads(manifest.read_text())
    kept = (man.get("config") or {}).get("val_fraction")
    return man.get("training_type") == task and kept is not None and float(kept) < val_fraction


def val_guard(task: str, val_fraction: float, split: str):
    """A models_to_compare `check` for scoring `split`: on the validation slice, a model of
    `task` that trained on it is refused (its figures would be inflated); None otherwise."""
    if split != "val":
        return None

    def check(base: str, adapter: str | None, name: str) -> None:
        if any(trained_on_val(p, task, val_fraction) for p in (adapter, base)):
            raise ValueError(f"{name} was trained on the {task} validation slice (its recipe "
                             f"kept val_fraction < {val_fraction:g} aside): score it on the "
                             f"held-out fold (--split eval), not on --split val")
    return check


def models_to_compare(refs: list[str],
                      check: Callable[[str, str | None, str], None] | None = None):
    """Yield (label, display name, model, tokenizer) for each `--model` ref: base | tuned |
    registered generator name | path, optionally LABEL=REF; one model in memory at a time.
    `check(base path, adapter path or None, display name)` runs on every resolved ref before
    the first model loads, and raises to refuse one (e.g. val_guard)."""
    from rag_app.models import ModelRegistry

    from .policy import load_causal

    if not refs:
        raise ValueError("no --model given: pass e.g. --model base --model NAME")
    labels = [r.partition("=")[0] if "=" in r else r for r in refs]
    if len(set(labels)) < len(labels):
        raise ValueError(f"--model labels {labels} repeat: give each a LABEL=REF")
    resolved = [ModelRegistry().resolve_generator(ref.partition("=")[2] if "=" in ref else ref)
                for ref in refs]
    for base, adapter, name in resolved if check else ():
        check(base, adapter, name)
    for (base, adapter, name), label in zip(resolved, labels):
        model, tok = load_causal(base, adapter)
        yield label, name, model, tok
        del model


def generate_texts(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                   desc: str = "generating", first_logits: list | None = None,
                   num_beams: int = 1, length_penalty: float = 1.0,
                   mbr: bool = False, first_step_bias: dict[int, float] | None = None
                   ) -> list[str]:
    """Greedy (or `num_beams` beam-search) answers (new text only, special tokens dropped),
    batched with left padding; a `first_logits` list receives each answer's first-step logits
    (policy.generate). `mbr`: of all `num_beams` finished beams, keep the consensus one
    (minimum-Bayes-risk with ROUGE, rag_app.evaluate.mbr_select) instead of the most probable."""
    from tqdm.auto import tqdm

    from rag_app.evaluate import mbr_select

    from .policy import generate

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    if mbr and num_beams < 2:
        raise ValueError("mbr chooses among the finished beams: it needs num_beams >= 2")
    per = num_beams if mbr else 1
    tok.padding_side = "left"
    out: list[str] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        texts = [tok.decode(ids, skip_special_tokens=True).strip()
                 for ids in generate(model, tok, prompts[i:i + batch_size], max_new_tokens,
                                     batch_size=batch_size, first_logits=first_logits,
                                     num_beams=num_beams, length_penalty=length_penalty,
                                     num_return_sequences=per,
                                     first_step_bias=first_step_bias)]
        for j in range(0, len(texts), per):
            out.append(texts[j + mbr_select(texts[j:j + per])] if mbr else texts[j])
    return out


def held_out_outputs(refs: list[str], build, limit: int, max_new_tokens: int, batch_size: int,
                     score=None, num_beams: int = 1, length_penalty: float = 1.0,
                     mbr: bool = False, check=None):
    """Yield (label, display name, items, generated texts, scores) per `--model` ref: items =
    build(tokenizer) (the held-out examples, as that model's tokenizer renders them), the first
    `limit` of them (0 = all); scores = score(tokenizer, first-step logits of each answer)
    (None without one); `num_beams` > 1 decodes by beam search instead of greedily, with
    `length_penalty` (policy.generate), keeping the consensus beam if `mbr`; `check`:
    models_to_compare's."""
    for label, name, model, tok in models_to_compare(refs, check):
        items = build(tok)
        items = items[:limit] if limit else items
        first: list = []
        texts = generate_texts(model, tok, [e.prompt for e in items], max_new_tokens,
                               batch_size, desc=label, first_logits=first if score else None,
                               num_beams=num_beams, length_penalty=length_penalty, mbr=mbr)
        yield label, name, items, texts, score(tok, first) if score else None


def check_eval_split(split: str) -> None:
    if split not in ("val", "eval"):
        raise ValueError(f"split={split!r} is invalid: evaluate on val (to choose settings) or "
                         f"eval (the held-out fold), never on train")


def split_fields(split: str, held_out_file: str) -> dict:
    """An evaluation result's split entries: the held-out fold names its file; the validation
    slice is a hashed slice of the training side, with no file."""
    check_eval_split(split)
    return {"split": split, "split_file": held_out_file if split == "eval" else None}


def split_words(result: dict, dataset: str) -> str:
    """"held-out MeQSum" or "MeQSum validation", from an evaluation result's split."""
    return f"{dataset} validation" if result.get("split") == "val" else f"held-out {dataset}"


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else 0.0
