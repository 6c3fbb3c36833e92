"""Language-model evaluation: perplexity = exp(mean NLL over the tokens of packed blocks).

Causal LMs: next-token NLL of every position after the first of each block. Masked LMs: NLL
of a fixed, seeded 15% of the non-special tokens, all replaced by [MASK] (a deterministic
"masked perplexity"). Bits per character (CLM) compare models with different tokenizers
(vocabulary adaptation), where per-token perplexity does not.

    rag eval lm --model base|tuned|NAME|PATH [--model ...]
        --text domain-heldout|domain-val|general|PATH [--limit N] [--block-size 256]
        [--chars N] [--doc-chars N] [--shuffle-docs SEED] [--out results/lm.json]
"""
from __future__ import annotations

import json
import math
from pathlib import Path

MINILM_ALIASES = ("minilm", "encoder")
TEXTS = ("domain-heldout", "domain-val", "general")


def detect_objective(path: str) -> str:
    """"clm" for *ForCausalLM checkpoints, "mlm" for *ForMaskedLM and bare BERT-like encoders."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    cfg = AutoConfig.from_pretrained(path)
    archs = cfg.architectures or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "clm"
    if any(a.endswith("ForMaskedLM") for a in archs) or \
            cfg.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "mlm"
    return "clm"


def resolve_lm(ref: str) -> tuple[str, str | None]:
    """(model path or HF id, LoRA adapter or None) of base | minilm | tuned | a registered name
    (generator, base, embedder...) | a local folder | a Hugging Face id."""
    from rag_app.embed import packaged_minilm_path
    from rag_app.models import ModelRegistry

    if ref in MINILM_ALIASES:
        return packaged_minilm_path(), None
    reg = ModelRegistry()
    try:
        entry = reg.get(ref)
    except ValueError:
        entry = None
    if entry is not None and entry["kind"] != "generator":
        return entry["path"], None  # base / embedder / relevance: full checkpoints
    base, adapter, _ = reg.resolve_generator(ref)  # aliases, tuned, adapters, folders, HF ids
    return base, adapter


def load_lm(path: str, objective: str = "auto", adapter: str | None = None):
    """(model in eval mode, tokenizer, objective, info). An MLM checkpoint without a head gets
    a new one (info["mlm_head"] says so)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    objective = detect_objective(path) if objective == "auto" else objective
    if objective not in ("clm", "mlm"):
        raise ValueError(f"objective={objective!r} is invalid: use auto, clm or mlm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    info: dict = {"objective": objective}
    if objective == "clm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{path}: its tokenizer has no mask token: masked-LM needs one")
        model, loading = AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32,
                                                              output_loading_info=True)
        info["mlm_head"] = mlm_head_info(model, loading)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        info["adapter"] = adapter
    model.eval()
    return model, tokenizer, objective, info


def mlm_head_info(model, loading: dict) -> dict:
    """Whether the masked-LM head was newly initialised, and whether its output projection
    is tied to the word embeddings (it is forced to be when the head is new)."""
    missing = sorted(loading.get("missing_keys", ()))
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    new = bool(missing)
    if new and out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
        out.weight = emb.weight  # a new head's projection starts as the word embeddings
    tied = out is not None and out.weight.data_ptr() == emb.weight.data_ptr()
    return {"new_head": new, "newly_initialised": missing,
            "tied_to_word_embeddings": bool(tied),
            "note": ("the checkpoint had no masked-LM head: a new one was initialised, its "
                     "output projection tied to the word embeddings" if new else
                     "masked-LM head loaded from the checkpoint")}


def mask_blocks(blocks, tokenizer, probability: float = 0.15, seed: int = 0, offset: int = 0):
    """(input_ids, labels) with a seeded `probability` of the non-special tokens replaced by
    the mask token (labels -100 elsewhere); at least one token per block is masked. Block i
    (counting from `offset`) gets the same mask whatever the batching."""
    import torch

    ids = torch.tensor(blocks, dtype=torch.long)
    special = torch.zeros_like(ids, dtype=torch.bool)
    for t in tokenizer.all_special_ids:
        special |= ids == t
    noise = torch.stack([torch.rand(ids.shape[1], generator=torch.Generator().manual_seed(
        seed * 1_000_003 + offset + i)) for i in range(ids.shape[0])])
    chosen = (noise < probability) & ~special
    for i in range(ids.shape[0]):
        if not chosen[i].any() and (~special[i]).any():
            chosen[i, int((~special[i]).nonzero()[0])] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return ids.masked_fill(chosen, tokenizer.mask_token_id), labels


def batched(blocks, batch_size: int):
    """(offset, blocks[offset:...]) in runs of <= batch_size blocks of one length (the shorter
    last block of `text_blocks` gets its own batch)."""
    starts = [i for i in range(len(blocks)) if i % batch_size == 0
              or len(blocks[i]) != len(blocks[i - 1])]
    return [(i, blocks[i:j]) for i, j in zip(starts, starts[1:] + [len(blocks)])]


def lm_batches(blocks, objective: str, tokenizer, batch_size: int, mlm_probability: float = 0.15,
               seed: int = 0) -> list[dict]:
    """Blocks -> model batches {input_ids, labels} (MLM: a fixed seeded masking)."""
    import torch

    out = []
    for i, part in batched(blocks, batch_size):
        if objective == "clm":
            ids = torch.tensor(part, dtype=torch.long)
            out.append({"input_ids": ids, "labels": ids.clone()})
        else:
            ids, labels = mask_blocks(part, tokenizer, mlm_probability, seed, offset=i)
            out.append({"input_ids": ids, "labels": labels})
    return out


def perplexity(model, tokenizer, blocks, objective: str, batch_size: int = 4,
               mlm_probability: float = 0.15, seed: int = 0) -> dict:
    """{"nll", "perplexity", "tokens", "blocks"} (+ "bits_per_char" for causal LMs)."""
    import torch
    import torch.nn.functional as F

    if not blocks:
        raise ValueError("no text blocks to evaluate: use more text or a smaller block size")
    was_training = model.training
    model.eval()
    nll, count, chars = 0.0, 0, 0
    with torch.inference_mode():
        for b in lm_batches(blocks, objective, tokenizer, batch_size, mlm_probability, seed):
            logits = model(input_ids=b["input_ids"]).logits.float()
            labels = b["labels"]
            if objective == "clm":
                logits, labels = logits[:, :-1], labels[:, 1:]
                chars += sum(len(tokenizer.decode(row, skip_special_tokens=True))
                             for row in labels.tolist())
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         labels.reshape(-1), ignore_index=-100,
                                         reduction="sum"))
            count += int((labels != -100).sum())
    model.train(was_training)
    mean = nll / max(count, 1)
    out = {"nll": round(mean, 5), "perplexity": round(math.exp(min(mean, 50)), 4),
           "tokens": count, "blocks": len(blocks)}
    if objective == "clm" and chars:
        out["bits_per_char"] = round(nll / math.log(2) / chars, 5)
        out["chars"] = chars
    return out


def rare_terms(tokenizer, n: int = 200, heldout_fraction: float = 0.05,
               split_seed: int = 0) -> list[str]:
    """The n most frequent words of the TRAIN side of the domain text that are >= 20x rarer in
    (or absent from) the train side of the general text and split into >= 2 pieces by
    `tokenizer` (training/vocab.py: mine_terms). Mined once, with the first model's tokenizer,
    so every model is scored on the same words."""
    from .lmdata import text_split
    from .vocab import mine_terms

    dom, _ = text_split("domain", heldout_fraction, split_seed)
    gen, _ = text_split("general", heldout_fraction, split_seed)
    return [r["word"] for r in mine_terms(tokenizer, [d.text for d in dom],
                                          [g.text for g in gen], n, min_pieces=2)]


def term_spans(blocks, tokenizer, words) -> list[list[tuple[int, int]]]:
    """Per block, the [start, end) token spans where one of `words` occurs, as this tokenizer
    writes it mid-sentence (a vocabulary-adapted tokenizer may give one token)."""
    from collections import defaultdict

    from .vocab import term_former

    form = term_former(tokenizer)
    pats = {tuple(ids) for ids in tokenizer([form(w) for w in words],
                                            add_special_tokens=False)["input_ids"] if ids}
    by_first: dict[int, list[tuple]] = defaultdict(list)
    for p in pats:
        by_first[p[0]].append(p)
    out = []
    for block in blocks:
        spans, i = [], 1  # position 0 has no context to predict it from
        while i < len(block):
            hit = next((p for p in sorted(by_first.get(block[i], ()), key=len, reverse=True)
                        if tuple(block[i:i + len(p)]) == p), None)
            if hit:
                spans.append((i, i + len(hit)))
                i += len(hit)
            else:
                i += 1
        out.append(spans)
    return out


def rare_term_accuracy(model, tokenizer, blocks, words, batch_size: int = 4) -> dict:
    """Causal LMs: greedy next-token accuracy on the tokens of rare domain terms in `blocks`
    (`token_accuracy`), and the share of term occurrences whose every token is predicted
    (`word_accuracy`, comparable across tokenizers)."""
    import torch

    spans = term_spans(blocks, tokenizer, words)
    hit_tok = n_tok = hit_word = n_word = 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i, part in batched(blocks, batch_size):
            ids = torch.tensor(part, dtype=torch.long)
            pred = model(input_ids=ids).logits.argmax(-1)
            for row, sp in enumerate(spans[i:i + len(part)]):
                for a, b in sp:
                    ok = pred[row, a - 1:b - 1] == ids[row, a:b]
                    hit_tok += int(ok.sum())
                    n_tok += b - a
                    hit_word += int(ok.all())
                    n_word += 1
    model.train(was_training)
    return {"token_accuracy": round(hit_tok / n_tok, 4) if n_tok else None,
            "word_accuracy": round(hit_word / n_word, 4) if n_word else None,
            "term_tokens": n_tok, "term_occurrences": n_word, "terms": len(words)}


def text_blocks(texts, tokenizer, block_size: int) -> list:
    """ALL of `texts` (`token_stream`, as in `pack`) in blocks of `block_size` ids that
    overlap by one id, the last one shorter: every token but the very first is predicted
    exactly once, so models with different tokenizers are scored on the same characters."""
    from .lmdata import token_stream

    buf = [i for ids in token_stream(texts, tokenizer) for i in ids]
    return [buf[i:i + block_size] for i in range(0, max(len(buf) - 1, 1), block_size - 1)]


def first_chars(texts, n: int) -> list[str]:
    """The leading texts up to `n` characters in all (the last one cut at the budget)."""
    out, left = [], n
    for t in texts:
        if left <= 0:
            break
        out.append(t[:left])
        left -= len(out[-1])
    return out


def eval_blocks(text: str, tokenizer, block_size: int, limit: int, heldout_fraction: float = 0.05,
                split_seed: int = 0, chars: int = 0, doc_chars: int = 0,
                shuffle_docs: int | None = None) -> list:
    """Blocks of domain-heldout (the corpus's held-out documents), domain-val (the validation
    slice of its train side, for choosing hyper-parameters), general (held-out chapters of the
    general books) or a file (all of it). `limit` blocks of `block_size` TOKENS (0 = all); or,
    with `chars`, the first `chars` characters of the text in `text_blocks`: the same text
    whatever the tokenizer (for comparing bits per char across vocabularies). `doc_chars`
    takes only the first `doc_chars` characters of EVERY document (then the `chars` budget, if
    any), so the sample spans all the documents and sources rather than the leading ones.
    `shuffle_docs` (a seed) takes the documents in a random order first, so a `chars` budget
    is a random sample of whole documents: an estimate of the whole text's figure
    when scoring all of it costs too much."""
    from .lmdata import file_documents, pack, text_split, train_val_split

    if text == "domain-val":
        docs = train_val_split(text_split("domain", heldout_fraction, split_seed)[0])[1]
    elif text in TEXTS:
        _, held = text_split("domain" if text == "domain-heldout" else "general",
                             heldout_fraction, split_seed)
        docs = held
    else:
        docs = file_documents(text)
    if shuffle_docs is not None:
        import random

        docs = list(docs)
        random.Random(shuffle_docs).shuffle(docs)
    if chars or doc_chars:
        texts = (d.text[:doc_chars] if doc_chars else d.text for d in docs)
        return text_blocks(first_chars(texts, chars) if chars else list(texts), tokenizer,
                           block_size)
    return pack([d.text for d in docs], tokenizer, block_size, limit)


def plot_lm(result: dict, path: str) -> None:
    """Grouped bars: perplexity per text (x) and model/stage (colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["models"]  # {label: {text: metrics}}
    texts = sorted({t for m in rows.values() for t in m})
    # the same text for every tokenizer (--chars): bits per char, comparable across vocabularies
    key, what = ("bits_per_char", "bits per char") if result.get("chars") else \
        ("perplexity", "perplexity")
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    w = 0.8 / max(len(rows), 1)
    for i, (label, m) in enumerate(rows.items()):
        vals = [m.get(t, {}).get(key, float("nan")) for t in texts]
        bars = ax.bar([j + i * w for j in range(len(texts))], vals, w, label=label)
        ax.bar_label(bars, fmt="%.4f" if key == "bits_per_char" else "%.2f", fontsize=7)
    ax.set_xticks([j + w * (len(rows) - 1) / 2 for j in range(len(texts))], texts)
    ax.set_ylabel(f"{what} (lower is better)")
    ax.set_title(result.get("title", "language-model perplexity"), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_eval_lm(args) -> dict:
    """`rag eval lm`: perplexity of each --model on --text; JSON (+ PNG) with --out."""
    refs = args.model or ["base"]
    result: dict = {"text": args.text, "block_size": args.block_size, "limit": args.limit,
                    "chars": args.chars, "doc_chars": args.doc_chars,
                    "shuffle_docs": args.shuffle_docs, "split_seed": args.split_seed, "models": {}}
    words = None
    for ref in refs:
        label, _, r = ref.partition("=") if "=" in ref else (ref, "", ref)
        path, adapter = resolve_lm(r)
        model, tok, objective, info = load_lm(path, args.objective, adapter)
        blocks = eval_blocks(args.text, tok, args.block_size, args.limit,
                             args.heldout_fraction, args.split_seed, args.chars,
                             args.doc_chars, args.shuffle_docs)
        m = perplexity(model, tok, blocks, objective, args.batch_size, seed=args.split_seed)
        if objective == "clm" and args.rare_terms and args.text != "general":
            if words is None:
                words = rare_terms(tok, args.rare_terms, args.heldout_fraction, args.split_seed)
                result["rare_terms"] = words
            m["rare_terms"] = rare_term_accuracy(model, tok, blocks, words, args.batch_size)
            print(f"{label:28s} rare domain terms: next-token accuracy "
                  f"{m['rare_terms']['token_accuracy']}, whole-word "
                  f"{m['rare_terms']['word_accuracy']} "
                  f"({m['rare_terms']['term_occurrences']} occurrences)")
        result["models"][label] = {args.text: m | {"objective": objective, "path": path}}
        if "mlm_head" in info:
            result["models"][label][args.text]["new_mlm_head"] = info["mlm_head"]["new_head"]
        print(f"{label:28s} {args.text:16s} ppl {m['perplexity']:10.3f}  nll {m['nll']:.4f}  "
              f"{m['tokens']} tokens" + (f"  bpc {m['bits_per_char']:.4f}"
                                         if "bits_per_char" in m else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        plot_lm(result | {"title": f"perplexity on {args.text}"},
                str(Path(args.out).with_suffix(".png")))
        print(f"saved {args.out} and {Path(args.out).with_suffix('.png')}")
    return result
