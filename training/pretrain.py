"""Continued pre-training on domain text with the model's own objective, optionally with a
forgetting penalty (EWC or Synaptic Intelligence, training/regularizers.py).

Read top to bottom: config -> starting model (causal LM: the packaged SmolLM2 by default; a
BERT-like encoder -> masked LM, with a NEW head tied to the word embeddings when the checkpoint
has none, e.g. the packaged MiniLM) -> domain documents split BY DOCUMENT, packed into blocks
(training/lmdata.py) -> perplexity before on held-out domain and general text -> importance on
general-domain text (ewc | si) -> [a model with tokens added by `rag train vocab`: their rows
trained alone first, new_token_steps] -> transformers.Trainer (PenaltyTrainer adds the penalty),
full or LoRA -> [the added tokens' output rows fitted on running text, calibrate_tokens:
training/calibrate.py] -> perplexity after -> lm_eval.json + .png in the run folder -> a full
checkpoint (LoRA merged in) + tokenizer saved and registered as kind "base" with its lineage,
which `rag train instruct --base-model NAME` (or `rag train pretrain`) can start from.

    rag train pretrain --recipe training/recipes/pretrain[-ewc|-si].yaml [--set k=v]
        [--output DIR] [--progress-file F] [--resume] [--name NAME]
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import RunManifest, TrainConfig, finish_run, set_seed, start_run, trainer_args_common
from .regularizers import REGULARIZERS

log = logging.getLogger(__name__)
GENERAL_SOURCE = ("../shared/data/general/*.txt (Project Gutenberg header and licence footer "
                  "stripped), one document per chapter")


@dataclass
class PretrainConfig(TrainConfig):
    base_model: str = "default"  # default = packaged SmolLM2 (clm); minilm = packaged MiniLM
    # (mlm); a registered base/generator name; a local folder; a Hugging Face id
    objective: str = "auto"  # auto (from the checkpoint) | clm | mlm
    domain_text: str = "corpus"  # corpus = the default corpus; or a .txt / .jsonl path
    heldout_fraction: float = 0.05  # of documents (+ the project's evaluation hold-outs)
    split_seed: int = 0  # `rag eval lm --split-seed` must match to compare
    block_size: int = 256
    train_blocks: int = 0  # 0 = max_steps x batch_size x accumulation (one pass, no repeats)
    eval_blocks: int = 32  # held-out domain blocks for perplexity (0 = skip)
    general_eval_blocks: int = 32  # held-out general-text blocks (0 = skip)
    eval_batch_size: int = 4
    mlm_probability: float = 0.15
    batch_size: int = 8
    learning_rate: float = 5e-5
    gradient_accumulation_steps: int = 1
    # LoRA (merged into the saved checkpoint)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = ""  # "" = peft's default for the architecture
    lora_layers: int = 0  # adapt the last N layers only (0 = all)
    # forgetting control
    regularizer: str = "none"  # none | ewc | si
    reg_lambda: float = 0.01  # on importances normalised to mean 1
    importance_blocks: int = 16  # general-text blocks (train side) for the Fisher / SI pass
    importance_norm: str = "mean"  # mean | max | none
    si_steps: int = 8
    si_lr: float = 1e-4
    si_xi: float = 1e-6
    # tokens added by `rag train vocab`: first train ONLY their rows (input and output
    # embeddings), everything else frozen, for N steps at new_token_lr on the training blocks
    # richest in them; then the normal run. 0 = no such stage
    new_token_steps: int = 0
    new_token_lr: float = 1e-3
    # blocks packed from the training pool to pick the row stage's richest blocks from
    # (0 = the run's own training blocks); a larger pool gives each new row more occurrences
    new_token_pool: int = 0
    # the row stage's objective: lm = next-token loss on the new tokenisation; distill = make
    # the model on the new tokenisation predict what it predicted on the OLD one (the added
    # tokens expanded back into their pieces): soft targets from the old-tokenisation pass at
    # the aligned position (over the old vocabulary), the real token where it is an added one
    new_token_objective: str = "lm"
    # the row stage's examples: 0 = the pool's blocks richest in added tokens (a few frequent
    # tokens dominate them); N = windows of N ids cut around the added tokens' occurrences,
    # taken round-robin over the added tokens so each gets about the same number of examples,
    # batch_size * block_size // N windows per step (the same tokens per step as a block batch)
    new_token_window: int = 0
    # keep the added rows as the row stage left them during the full run (their gradients are
    # zeroed, so AdamW without weight decay leaves them exactly as they were); the full run's
    # 1e-4 then trains only the old weights
    new_token_freeze: bool = False
    # give a model with tied input/output embeddings (SmolLM2) its own output matrix, a copy
    # of the input one, before any training: an added token's input row (what the following
    # text reads) and output row (what predicts the word) can then differ. Adds
    # vocab x hidden parameters (28M for SmolLM2-135M); the saved model stays untied
    untie_embeddings: bool = False
    # the full run's targets at the added tokens: train = the usual next-token loss on every
    # token; ignore = label -100 there (causal LMs), so the body and old rows learn only from
    # predicting old tokens and the added rows only from being read as context
    new_token_targets: str = "train"
    # false: the row stage is the whole run (no full run): a base that is already adapted to
    # the domain (e.g. `rag train pretrain` without new tokens, then `rag train vocab
    # --set base_model=THAT`) gets the new tokens with every old weight unchanged, so it is
    # compared with that base on the new rows alone
    full_stage: bool = True
    # after the run: fit ONLY the added tokens' output rows on this many tokens of running
    # text from the training pool (whole documents, in a seeded order), every other weight
    # and the input rows unchanged -- a convex fit (training/calibrate.py) that stops the
    # rows predicting the new tokens where an old one comes next. Unties tied embeddings.
    # 0 = no calibration. With full_stage=false and new_token_steps 0 the calibration is the
    # whole run (on a base whose rows were already trained)
    calibrate_tokens: int = 0
    # with calibrate_tokens: also fit the output rows of the old pieces the added tokens were
    # written with (an old first piece no longer covers the added word, and its continuation
    # can no longer follow it); those old rows then change too
    calibrate_pieces: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in ("auto", "clm", "mlm"):
            raise ValueError(f"objective={self.objective!r} is invalid: use auto, clm or mlm")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer={self.regularizer!r} is invalid: use one of "
                             f"{REGULARIZERS}")
        if self.block_size < 8 or self.gradient_accumulation_steps < 1:
            raise ValueError("block_size must be >= 8 and gradient_accumulation_steps >= 1")
        if self.new_token_window and not 8 <= self.new_token_window <= self.block_size:
            raise ValueError(f"new_token_window={self.new_token_window} is invalid: use 0 or "
                             f"8..block_size ({self.block_size})")
        if self.new_token_objective not in ("lm", "distill"):
            raise ValueError(f"new_token_objective={self.new_token_objective!r} is invalid: "
                             "use lm or distill")
        if self.new_token_targets not in ("train", "ignore"):
            raise ValueError(f"new_token_targets={self.new_token_targets!r} is invalid: use "
                             "train or ignore")
        if self.new_token_freeze and self.weight_decay:
            raise ValueError("new_token_freeze needs weight_decay 0 (decay would still move "
                             "the frozen rows)")
        if self.regularizer != "none" and self.importance_blocks < 1:
            raise ValueError("importance_blocks must be >= 1 with a regularizer")
        if self.calibrate_tokens < 0 or (self.calibrate_tokens and self.objective == "mlm"):
            raise ValueError("calibrate_tokens must be >= 0, and is for causal LMs only")
        if self.calibrate_tokens and self.lora:
            raise ValueError("calibrate_tokens needs lora: false (the added rows are "
                             "embedding rows, which LoRA leaves frozen)")
        if not self.full_stage and ((self.new_token_steps < 1 and not self.calibrate_tokens)
                                    or self.lora or self.regularizer != "none"):
            raise ValueError("full_stage=false trains only the added rows: it needs "
                             "new_token_steps >= 1 or calibrate_tokens > 0, no LoRA and no "
                             "regularizer")


def resolve_start(model: str, objective: str = "auto") -> str:
    """default/base -> the converted packaged SmolLM2 (minilm, or default with objective mlm ->
    the packaged MiniLM); a registered name -> its folder; a folder; else a Hugging Face id."""
    from rag_app.embed import packaged_minilm_path
    from rag_app.generate import ensure_base_checkpoint, resolve_generator_path
    from rag_app.models import ModelRegistry, is_adapter_dir

    from .lm_eval import MINILM_ALIASES

    if model in MINILM_ALIASES or (model in ("default", "base") and objective == "mlm"):
        return packaged_minilm_path()
    if model in ("default", "base"):
        return str(ensure_base_checkpoint())
    try:
        path = ModelRegistry().get(model)["path"]
    except ValueError:
        path = model
    if Path(path).is_dir():
        if is_adapter_dir(path):
            raise ValueError(f"{model!r} is a LoRA adapter: merge it first (`rag model merge "
                             f"{model}`) and start from the merged model")
        return str(path)
    return resolve_generator_path(model)


def lineage(start: str, step: dict) -> list[dict]:
    """The starting model's lineage (from its manifest.json, if any) + this step."""
    prev: list = []
    mf = Path(start) / "manifest.json"
    if mf.is_file():
        try:
            prev = list(json.loads(mf.read_text()).get("data", {}).get("lineage") or [])
        except (json.JSONDecodeError, AttributeError):
            prev = []
    if not prev:
        conv = Path(start) / "conversion.json"
        origin = json.loads(conv.read_text()) if conv.is_file() else {}
        prev = [{"model": start} | ({"converted_from": origin} if origin else {})]
    return prev + [step]


class SavedLM:
    """Saves a model AND its tokenizer (what save_and_register calls save_pretrained on)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def apply_lora(model, cfg: PretrainConfig, objective: str):
    from peft import LoraConfig, get_peft_model

    n = getattr(model.config, "num_hidden_layers", None)
    layers = list(range(max(n - cfg.lora_layers, 0), n)) if cfg.lora_layers and n else None
    targets = [m.strip() for m in cfg.target_modules.split(",") if m.strip()] or None
    model = get_peft_model(model, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=targets, layers_to_transform=layers, bias="none",
        task_type="CAUSAL_LM" if objective == "clm" else None))
    if objective == "mlm":  # a new MLM head must learn: its transform and bias train fully
        for name, p in model.named_parameters():
            if "cls.predictions.transform" in name or name.endswith("cls.predictions.bias"):
                p.requires_grad = True
    return model


def measure(model, tokenizer, objective: str, blocks: dict, cfg: PretrainConfig) -> dict:
    from .lm_eval import perplexity

    return {name: perplexity(model, tokenizer, b, objective, cfg.eval_batch_size,
                             cfg.mlm_probability, cfg.split_seed)  # masks as `rag eval lm`
            for name, b in blocks.items() if b}


def importance(model, tokenizer, objective: str, blocks: list, cfg: PretrainConfig) -> dict:
    from . import regularizers as R
    from .lm_eval import lm_batches

    if cfg.regularizer == "ewc":
        raw = R.fisher_diagonal(model, lm_batches(blocks, objective, tokenizer, 1,
                                                  cfg.mlm_probability, cfg.seed))
        how = (f"EWC: diagonal empirical Fisher, mean of squared per-block gradients over "
               f"{len(blocks)} general-text blocks at the starting weights")
    else:
        raw = R.si_importance(model, lm_batches(blocks, objective, tokenizer, cfg.batch_size,
                                                cfg.mlm_probability, cfg.seed),
                              cfg.si_steps, cfg.si_lr, cfg.si_xi)
        how = (f"SI: path integral over a short pass of {cfg.si_steps} Adam steps (lr "
               f"{cfg.si_lr}) on {len(blocks)} general-text blocks from the starting weights "
               f"(the original pre-training run is unavailable); weights restored afterwards; "
               f"omega = max(0, sum(-g*dtheta)) / (Delta^2 + {cfg.si_xi})")
    imp, div = R.normalize(raw, cfg.importance_norm)
    return {"importance": imp, "info": {"kind": cfg.regularizer, "lambda": cfg.reg_lambda,
                                        "how": how, "normalised_by": cfg.importance_norm,
                                        "raw_divisor": div, "blocks": len(blocks),
                                        "penalised": R.summarize(imp)}}


def describe(cfg: PretrainConfig, start: str, objective: str, split: tuple, train_blocks: list,
             evals: dict, reg_info: dict, info: dict) -> dict:
    """The manifest's data section: objective, split, blocks, regularizer, head, lineage."""
    step = {"training_type": "pretrain", "name": cfg.name, "objective": objective,
            "regularizer": cfg.regularizer, "lora": cfg.lora, "max_steps": cfg.max_steps,
            "train_tokens": len(train_blocks) * cfg.block_size, "domain_text": cfg.domain_text}
    return {"objective": objective, "domain_text": cfg.domain_text,
            "split": {"by": "document (seeded hash of the document key)",
                      "split_seed": cfg.split_seed, "heldout_fraction": cfg.heldout_fraction,
                      "train_documents": len(split[0]), "heldout_documents": len(split[1]),
                      "always_heldout": "pubmedqa_heldout_pmids, medquad_test_titles"},
            "train_blocks": len(train_blocks), "block_size": cfg.block_size,
            "general_text": GENERAL_SOURCE, "eval_blocks": {k: len(v) for k, v in evals.items()},
            "regularizer": reg_info,
            "training": "LoRA, merged into the saved checkpoint" if cfg.lora else "full",
            "lineage": lineage(start, step)} | ({"mlm_head": info["mlm_head"]}
                                               if "mlm_head" in info else {})


def _cached(path: Path, make, resume: bool):
    """make() once per run folder: a resumed run reuses what the first attempt measured at the
    starting weights (perplexity before, importance)."""
    import torch

    if resume and path.is_file():
        return torch.load(path, weights_only=False)
    value = make()
    torch.save(value, path)
    return value


def added_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens added to the vocabulary (`rag train vocab`), special tokens excluded."""
    return sorted(i for i, t in tokenizer.added_tokens_decoder.items() if not t.special)


def old_pieces(tokenizer, ids: list[int]) -> dict[int, list[int]]:
    """Each added token's ids in the tokenizer's own sub-word model, i.e. how the vocabulary
    before `rag train vocab` wrote it: its pre-tokenizer and BPE model, which never see added
    tokens."""
    bt = tokenizer.backend_tokenizer
    out = {}
    for i in ids:
        content = tokenizer.added_tokens_decoder[i].content
        words = bt.pre_tokenizer.pre_tokenize_str(content) if bt.pre_tokenizer else \
            [(content, None)]
        out[i] = [t.id for w, _ in words for t in bt.model.tokenize(w)]
        if not out[i] or any(p in out for p in out[i]):
            raise ValueError(f"added token {content!r} has no pieces in the old vocabulary")
    return out


def expand_pieces(ids: list[int], pieces: dict[int, list[int]]) -> tuple[list[int], list[int]]:
    """`ids` in the old vocabulary (each added token replaced by its pieces), and for each
    position of `ids` the position of its LAST token in that expansion (where the old
    tokenisation has read the same text)."""
    out: list[int] = []
    last: list[int] = []
    for t in ids:
        out.extend(pieces.get(t, (t,)))
        last.append(len(out) - 1)
    return out, last


def distill_loss(model, input_ids, pieces: dict[int, list[int]], pad_id: int = 0):
    """Mean over next-token positions of the new tokenisation: where the next token is an added
    one, its NLL; elsewhere the cross-entropy against the model's own prediction on the old
    tokenisation at the aligned position (softmax over the old vocabulary, no gradient)."""
    import torch

    rows = [expand_pieces(r, pieces) for r in input_ids.tolist()]
    length = max(len(e) for e, _ in rows)
    t_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    t_att = torch.zeros_like(t_ids)
    for b, (e, _) in enumerate(rows):
        t_ids[b, :len(e)], t_att[b, :len(e)] = torch.tensor(e), 1
    align = torch.tensor([a for _, a in rows])  # (B, T)
    new = torch.tensor(sorted(pieces))
    old = torch.ones(model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    old[new] = False
    with torch.no_grad():
        t_logits = model(input_ids=t_ids, attention_mask=t_att).logits
        t_logits = t_logits.gather(1, align[:, :-1, None].expand(-1, -1, t_logits.shape[-1]))
        p_old = torch.softmax(t_logits[..., old].float(), -1)
    s_logp = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1].float(), -1)
    nxt = input_ids[:, 1:]
    soft = -(p_old * s_logp[..., old]).sum(-1)
    hard = -s_logp.gather(-1, nxt[..., None]).squeeze(-1)
    return torch.where(torch.isin(nxt, new), hard, soft).mean()


def token_windows(blocks: list, ids, window: int, n: int) -> list:
    """Up to `n` windows of `window` ids cut from `blocks`, each around one occurrence of an
    added token (3/4 of the window before it, so it is predicted from context and its row is
    read by what follows), taken round-robin over the added tokens: every token gets about
    the same number of windows, as far as its occurrences go."""
    from collections import defaultdict

    idset, occ = set(ids), defaultdict(list)
    for bi, b in enumerate(blocks):
        if len(b) < window:
            continue
        for j, t in enumerate(b):
            if t in idset:
                occ[t].append((bi, j))
    queues = [occ[t][::-1] for t in sorted(occ)]  # pop() takes the earliest occurrence
    out: list = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                bi, j = q.pop()
                start = min(max(j - window * 3 // 4, 0), len(blocks[bi]) - window)
                out.append(blocks[bi][start:start + window])
    return out


def embedding_matrices(model) -> list:
    """The input embedding matrix, plus the output one when it is a separate (untied) matrix."""
    emb_in = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    return [emb_in] + ([out.weight] if out is not None and out.weight is not emb_in else [])


def warm_new_tokens(model, tokenizer, objective: str, blocks: list, cfg: PretrainConfig,
                    progress=None) -> dict:
    """Train only the rows of the added tokens (their mean-of-pieces initialisation leaves
    them uncalibrated, and at the full model's learning rate they barely move in a short run).
    Every other weight is frozen and the other rows' gradients are masked to zero, so AdamW
    (no weight decay) leaves them exactly as they were. Uses the blocks with the most added
    tokens first, or with new_token_window the balanced windows of `token_windows` (cycling
    through them when there are fewer than the steps need). The loss is
    the next-token loss, or with new_token_objective=distill `distill_loss` (causal LMs).
    Returns {steps, new_tokens, lr, objective, loss_first, loss_last}."""
    import torch

    from .lm_eval import lm_batches

    ids = added_token_ids(tokenizer)
    if not ids or cfg.new_token_steps <= 0 or not blocks:
        return {"steps": 0, "new_tokens": len(ids)}
    if cfg.new_token_objective == "distill":
        if objective != "clm":
            raise ValueError("new_token_objective=distill needs a causal LM")
        pieces = old_pieces(tokenizer, ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def step_loss(batch):
            return distill_loss(model, batch["input_ids"], pieces, pad)
    else:
        def step_loss(batch):
            return model(**batch).loss
    params = embedding_matrices(model)
    mask = torch.zeros(params[0].shape[0], 1)
    mask[ids] = 1.0
    idset = set(ids)
    if cfg.new_token_window:
        per_step = max(cfg.batch_size * cfg.block_size // cfg.new_token_window, 1)
        examples = token_windows(blocks, ids, cfg.new_token_window,
                                 cfg.new_token_steps * per_step)
    else:
        per_step = cfg.batch_size
        examples = sorted(blocks, key=lambda b: -sum(t in idset for t in b))[
            :cfg.new_token_steps * cfg.batch_size]
    if not examples:
        return {"steps": 0, "new_tokens": len(ids)}
    batches = lm_batches(examples, objective, tokenizer, per_step, cfg.mlm_probability,
                         cfg.seed)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = []
    for p in params:
        p.requires_grad_(True)
        hooks.append(p.register_hook(lambda g: g * mask.to(g.dtype)))
    opt = torch.optim.AdamW(params, lr=cfg.new_token_lr, weight_decay=0.0)
    losses = []
    model.train()
    try:
        from tqdm.auto import tqdm

        for step in tqdm(range(1, cfg.new_token_steps + 1), desc="new-token rows",
                         unit="step"):  # cycles through the batches when blocks are few
            loss = step_loss(batches[(step - 1) % len(batches)])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if progress is not None:
                progress.emit("step", step, cfg.new_token_steps, loss=losses[-1],
                              metrics={"stage": "new-token rows"})
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    return {"steps": len(losses), "new_tokens": len(ids), "lr": cfg.new_token_lr,
            "objective": cfg.new_token_objective, "window": cfg.new_token_window,
            "examples": len(examples),
            "tokens_covered": len({t for e in examples for t in e} & idset),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None}


def untie_embeddings(model) -> bool:
    """Make the output embedding matrix a separate copy of the tied input one (config
    tie_word_embeddings=False, so it saves and reloads untied). False if already untied."""
    import torch

    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not emb.weight:
        return False
    out.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5: the save/load tie mapping
        model.all_tied_weights_keys = {}
    return True


def freeze_rows(model, ids: list[int]) -> list:
    """Zero the gradients of embedding rows `ids` (input and, when untied, output) so an
    optimiser without weight decay leaves them unchanged. Returns the hooks (remove() them)."""
    import torch

    if not ids:
        return []
    hooks = []
    for p in embedding_matrices(model):
        if not p.requires_grad:
            continue
        keep = torch.ones(p.shape[0], 1)
        keep[ids] = 0.0
        hooks.append(p.register_hook(lambda g, keep=keep: g * keep.to(g.dtype)))
    return hooks


def clm_collator(ignore_ids=()):
    """Causal-LM batches of equal-length blocks: labels = the ids, -100 at `ignore_ids`."""
    import torch

    ignore = torch.tensor(list(ignore_ids), dtype=torch.long)

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        labels = ids.clone()
        labels[torch.isin(labels, ignore)] = -100
        return {"input_ids": ids, "labels": labels}
    return collate


def make_trainer(cfg, model, tokenizer, objective, train_blocks, out, progress, penalty):
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from .regularizers import penalty_trainer_class

    ignore = added_token_ids(tokenizer) if cfg.new_token_targets == "ignore" else []
    if objective == "clm":
        collate = clm_collator(ignore)
    elif ignore:
        raise ValueError("new_token_targets=ignore needs a causal LM")
    else:
        collate = DataCollatorForLanguageModeling(tokenizer, mlm=True,
                                                  mlm_probability=cfg.mlm_probability)
    args = trainer_args_common(cfg, out, False)
    args.update(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                remove_unused_columns=False)
    return penalty_trainer_class()(
        model=model, args=TrainingArguments(**args), data_collator=collate,
        train_dataset=Dataset.from_dict({"input_ids": train_blocks}), callbacks=[progress],
        penalty=penalty)


def run(cfg: PretrainConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False) -> dict:
    """The whole run (see the module docstring); returns finish_run's dict + "before"/"after"."""
    from .lm_eval import load_lm, plot_lm
    from .lmdata import pack, text_split, train_val_split
    from .regularizers import QuadraticPenalty

    t0, out, progress, last = start_run("pretrain", cfg, output, progress_file, resume)
    try:
        start = resolve_start(cfg.base_model, cfg.objective)
        model, tok, objective, info = load_lm(start, cfg.objective)
        model.train()
        untied = untie_embeddings(model) if cfg.untie_embeddings else False
        train_docs, held_docs = text_split(cfg.domain_text, cfg.heldout_fraction, cfg.split_seed)
        gen_train, gen_held = text_split("general", split_seed=cfg.split_seed)
        n_train = cfg.train_blocks or \
            cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps
        # the tail (lmdata.VAL_FRACTION) is `rag eval lm --text domain-val`: never trained on
        pool_docs, _ = train_val_split(train_docs)
        train_blocks = pack([d.text for d in pool_docs], tok, cfg.block_size, n_train)
        evals = {"domain-heldout": pack([d.text for d in held_docs], tok, cfg.block_size,
                                        cfg.eval_blocks) if cfg.eval_blocks else [],
                 "general": pack([d.text for d in gen_held], tok, cfg.block_size,
                                 cfg.general_eval_blocks) if cfg.general_eval_blocks else []}
        before = _cached(out / "lm_eval_before.pt",
                         lambda: measure(model, tok, objective, evals, cfg), bool(last))
        progress.emit("eval", 0, cfg.max_steps, metrics={f"{k}_ppl_before": v["perplexity"]
                                                         for k, v in before.items()})
        warm = {"steps": 0}
        if cfg.new_token_steps and not last:  # a checkpoint already holds the warmed rows
            pool = pack([d.text for d in pool_docs], tok, cfg.block_size, cfg.new_token_pool) \
                if cfg.new_token_pool > len(train_blocks) else train_blocks
            warm = warm_new_tokens(model, tok, objective, pool, cfg, progress) | {
                "pool_blocks": len(pool)}
        if not cfg.full_stage and not (warm["steps"] or cfg.calibrate_tokens) and not last:
            raise ValueError(f"full_stage=false but {start} has no added tokens (or none "
                             "occurs in the training pool): nothing would train")
        if cfg.calibrate_tokens and objective != "clm":
            raise ValueError(f"calibrate_tokens is for causal LMs; {start} trains as {objective}")
        if cfg.calibrate_tokens and not added_token_ids(tok):
            raise ValueError(f"calibrate_tokens={cfg.calibrate_tokens} but {start} has no "
                             "added tokens (rag train vocab adds them): nothing to calibrate")
        if cfg.lora:
            set_seed(cfg.seed)
            model = apply_lora(model, cfg, objective)
        penalty, reg_info = None, {"kind": "none"}
        if cfg.regularizer != "none":
            imp_blocks = pack([d.text for d in gen_train], tok, cfg.block_size,
                              cfg.importance_blocks)
            imp = _cached(out / f"importance-{cfg.regularizer}.pt",
                          lambda: importance(model, tok, objective, imp_blocks, cfg), bool(last))
            penalty, reg_info = QuadraticPenalty(model, imp["importance"], cfg.reg_lambda), \
                imp["info"]
        manifest = RunManifest("pretrain", start, asdict(cfg), cfg.seed, data=describe(
            cfg, start, objective, (train_docs, held_docs), train_blocks, evals, reg_info, info))
        manifest.metrics_before = before
        manifest.data["new_token_stage"] = warm
        manifest.data["untied_embeddings"] = untied
        manifest.data["full_stage"] = cfg.full_stage
        trainer = make_trainer(cfg, model, tok, objective, train_blocks, out, progress, penalty)
        hooks = freeze_rows(model, added_token_ids(tok)) if cfg.new_token_freeze else []
        manifest.data["new_token_stage"]["frozen_in_full_run"] = bool(hooks)
        try:
            if cfg.full_stage:
                trainer.train(resume_from_checkpoint=last)
        finally:
            for h in hooks:
                h.remove()
        final = trainer.model.merge_and_unload() if cfg.lora else trainer.model
        if cfg.calibrate_tokens:
            from tqdm.auto import tqdm

            from .calibrate import calibrate, natural_blocks, summary_line

            cal_blocks = natural_blocks([d.text for d in pool_docs], tok, cfg.block_size,
                                        cfg.calibrate_tokens, cfg.seed)
            bar = tqdm(total=len(cal_blocks), desc="calibrating added output rows", unit="block")
            manifest.data["calibration"] = calibrate(
                final, tok, cal_blocks, seed=cfg.seed, pieces=cfg.calibrate_pieces,
                progress=lambda i, n: bar.update(i - bar.n)) | {
                "blocks": len(cal_blocks), "text": "training pool, whole documents"}
            bar.close()
            print(summary_line(manifest.data["calibration"]))
            manifest.data["untied_embeddings"] = True
            progress.emit("eval", trainer.state.global_step, cfg.max_steps,
                          metrics={"calibration_" + k: manifest.data["calibration"][k]
                                   for k in ("added_mass_before", "added_mass_after")})
        after = measure(final, tok, objective, evals, cfg)
        penalties = [r["penalty"] for r in trainer.state.log_history if "penalty" in r]
        manifest.metrics_after = after | {
            "train_loss_first": progress.losses[0][1] if progress.losses else None,
            "train_loss_last": progress.losses[-1][1] if progress.losses else None,
            "penalty_last": penalties[-1] if penalties else None,
            "train_loss_log": progress.losses}
        report = {"title": f"continued pre-training ({objective}, {cfg.regularizer}, "
                           f"{trainer.state.global_step} steps)",
                  "models": {"before": before, "after": after}, "config": asdict(cfg)}
        (out / "lm_eval.json").write_text(json.dumps(report, indent=2))
        if before:
            plot_lm(report, str(out / "lm_eval.png"))
        summary = {f"{k}_ppl_{when}": m[k]["perplexity"] for when, m in
                   (("before", before), ("after", after)) for k in m}
        summary |= {k: manifest.metrics_after[k] for k in ("train_loss_first", "train_loss_last",
                                                           "penalty_last")}
        progress.emit("eval", trainer.state.global_step, cfg.max_steps, metrics=summary)
        final.eval()
        res = finish_run(SavedLM(final, tok), trainer, progress, manifest, "base", "pretrain",
                         cfg, activate, out, t0, summary, folder="pretrained")
        return res | {"before": before, "after": after, "model": final, "tokenizer": tok}
    except Exception as e:
        progress.error(f"{type(e).__name__}: {e}")
        raise
