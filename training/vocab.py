"""Vocabulary adaptation: mine domain terms, add them as tokens, initialise their embeddings
from their old sub-word pieces, save tokenizer + model as a new "base".

Mining (`mine_terms`): words (letters only, >= min_chars) counted in the domain documents (the
train side of the by-document split) and in the general-domain books. A term qualifies when it
is frequent in the domain (count >= min_count), rare in general text (absent from it, or
domain rate / general rate >= min_ratio), and the CURRENT tokenizer splits it into >= min_pieces
pieces as it occurs in running text: with its leading space for tokenizers that encode spaces
(SmolLM2's byte-level BPE: " cardiomyopathy", the mid-sentence form), the bare (lower-cased)
word for WordPiece. The top N by domain count are added.

Adding (`add_terms`): `tokenizer.add_tokens` (an added token is matched before the sub-word
model, so " cardiomyopathy" becomes one token and decodes back to the same text),
`resize_token_embeddings`, then each new row = the mean of the rows of its old pieces, in the
input embeddings AND the output embeddings (lm_head / MLM decoder, and its bias) -- once when
they are tied (one shared matrix, as in SmolLM2), separately when not.

    rag train vocab --recipe training/recipes/vocab.yaml [--set top_n=300] [--name NAME]
Then `rag train pretrain --base-model NAME` trains the new rows on domain text (full
fine-tuning, lora: false, as in pretrain.yaml: LoRA leaves the embeddings frozen).
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass

from .common import RunManifest, TrainConfig, save_and_register, start_run


@dataclass
class VocabConfig(TrainConfig):
    base_model: str = "default"  # as in PretrainConfig (default = the packaged SmolLM2)
    domain_text: str = "corpus"
    heldout_fraction: float = 0.05
    split_seed: int = 0
    max_docs: int = 0  # domain documents mined (0 = all of the train side)
    top_n: int = 300
    min_pieces: int = 3
    min_count: int = 20
    min_ratio: float = 20.0
    min_chars: int = 5
    block_size: int = 256
    eval_blocks: int = 16  # held-out domain blocks for before/after (0 = skip)
    general_eval_blocks: int = 16
    eval_batch_size: int = 4
    mlm_probability: float = 0.15
    keep_terms: str = ""  # file of words (one per line): keep only these of the top_n mined

    def __post_init__(self):
        super().__post_init__()
        if self.top_n < 1 or self.min_pieces < 2 or self.min_count < 1:
            raise ValueError("top_n >= 1, min_pieces >= 2 and min_count >= 1 are required")


def term_former(tokenizer):
    """word -> how it appears mid-sentence to this tokenizer: " word" when spaces are part of
    the tokens (byte-level BPE), else the word (lower-cased if the tokenizer lower-cases)."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if ids(" the") != ids("the"):
        return lambda word: " " + word
    if ids("The") == ids("the"):
        return str.lower
    return lambda word: word


def word_counts(texts, min_chars: int = 5) -> Counter:
    pattern = re.compile(rf"\b[A-Za-z]{{{min_chars},}}\b")
    counts: Counter = Counter()
    for t in texts:
        counts.update(pattern.findall(t))
    return counts


def mine_terms(tokenizer, domain_texts, general_texts, top_n: int, min_pieces: int = 3,
               min_count: int = 20, min_ratio: float = 20.0, min_chars: int = 5) -> list[dict]:
    """The top_n domain terms: [{"term", "word", "pieces", "n_pieces", "domain_count",
    "general_count", "ratio"}], most frequent first (see the module docstring)."""
    dom, gen = word_counts(domain_texts, min_chars), word_counts(general_texts, min_chars)
    n_dom, n_gen = max(sum(dom.values()), 1), max(sum(gen.values()), 1)
    form_of = term_former(tokenizer)
    forms: dict[str, dict] = {}
    for word, c in dom.items():
        if c < min_count:
            continue
        if gen[word] and (c / n_dom) / (gen[word] / n_gen) < min_ratio:
            continue
        form = form_of(word)
        rec = forms.setdefault(form, {"term": form, "word": word, "domain_count": 0,
                                      "general_count": 0})
        rec["domain_count"] += c  # "Asthma" and "asthma" meet when the tokenizer lower-cases
        rec["general_count"] += gen[word]
        rec["ratio"] = round((rec["domain_count"] / n_dom) / (rec["general_count"] / n_gen), 2) \
            if rec["general_count"] else None  # None: absent from the general text
    cands = sorted(forms.values(), key=lambda r: (-r["domain_count"], r["general_count"],
                                                  r["term"]))
    if not cands:
        return []
    ids = tokenizer([r["term"] for r in cands], add_special_tokens=False)["input_ids"]
    vocab = tokenizer.get_vocab()
    out = []
    for rec, pieces in zip(cands, ids):
        if len(pieces) >= min_pieces and rec["term"] not in vocab:
            out.append(rec | {"pieces": tokenizer.convert_ids_to_tokens(pieces),
                              "n_pieces": len(pieces)})
            if len(out) >= top_n:
                break
    return out


def read_words(path: str) -> list[str]:
    """The words of a keep_terms file: one per line; blank lines and '#' comments skipped."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"keep_terms={path!r}: no such file")
    words = [w.strip() for w in p.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise ValueError(f"keep_terms={path!r} lists no words")
    return words


def keep_only(terms: list[dict], words: list[str]) -> list[dict]:
    """The mined terms whose word is listed, in mined order; a listed word that was not mined
    (other settings or corpus) is an error rather than a silent no-op."""
    listed = set(words)
    missing = sorted(listed - {t["word"] for t in terms})
    if missing:
        raise ValueError(f"keep_terms lists {len(missing)} word(s) the mining did not select "
                         f"(mine with the same settings and top_n): {missing[:10]}")
    return [t for t in terms if t["word"] in listed]


def add_terms(model, tokenizer, terms: list[str]) -> list[dict]:
    """Add `terms` as tokens; resize the embeddings; each new row (input and output, tied or
    not) = the mean of its old pieces' rows. Returns [{"term", "id", "piece_ids"}]."""
    import torch

    pieces = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in terms]
    n_old = len(tokenizer)
    if tokenizer.add_tokens(terms) != len(terms):
        raise ValueError("some terms are already tokens of this tokenizer: mine them again")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    added = []
    with torch.no_grad():
        for term, ps in zip(terms, pieces):
            new = tokenizer(term, add_special_tokens=False)["input_ids"]
            if len(new) != 1 or new[0] < n_old:
                raise ValueError(f"term {term!r} does not tokenize to one new token: {new}")
            i = new[0]
            emb[i] = emb[ps].mean(0)
            if out is not None and not tied:
                out.weight[i] = out.weight[ps].mean(0)
            if out is not None and getattr(out, "bias", None) is not None:
                out.bias[i] = out.bias[ps].mean()
            added.append({"term": term, "id": i, "piece_ids": ps})
    return added


def tokens_per_kchar(tokenizer, texts) -> float:
    texts = list(texts)
    n = sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return round(1000 * n / max(sum(len(t) for t in texts), 1), 2)


_WORD = re.compile(r"\w+")


def fertility(tokenizer, texts) -> dict:
    """Tokens per word (words: runs of word characters, any script; each word tokenised as it occurs mid-sentence,
    see `term_former`) and the share of those tokens that are the UNK token (WordPiece maps
    unknown characters to [UNK]; byte-level BPE never does)."""
    form = term_former(tokenizer)
    words = [w for t in texts for w in _WORD.findall(t)]
    if not words:
        return {"tokens_per_word": 0.0, "unk_rate": 0.0, "words": 0}
    ids = tokenizer([form(w) for w in words], add_special_tokens=False)["input_ids"]
    n = sum(len(x) for x in ids)
    unk = tokenizer.unk_token_id
    n_unk = sum(i == unk for x in ids for i in x) if unk is not None else 0
    return {"tokens_per_word": round(n / len(words), 4), "unk_rate": round(n_unk / max(n, 1), 6),
            "words": len(words)}


def run(cfg: VocabConfig, output: str | None = None, progress_file: str | None = None,
        resume: bool = False, activate: bool = False) -> dict:
    """Mine -> add -> (bits per char / tokens per 1k chars before and after) -> save tokenizer +
    model -> register as kind "base"."""
    from .lm_eval import load_lm
    from .lmdata import pack, text_split, train_val_split
    from .pretrain import SavedLM, lineage, measure, resolve_start

    if resume:
        raise ValueError("rag train vocab has no checkpoints to resume (it takes seconds): "
                         "run it again without --resume")
    t0, out, progress, _ = start_run("vocab", cfg, output, progress_file, False)
    progress.emit("start", 0, 1, output=str(out))
    try:
        start = resolve_start(cfg.base_model)
        model, tok, objective, info = load_lm(start)
        train_docs, held_docs = text_split(cfg.domain_text, cfg.heldout_fraction, cfg.split_seed)
        gen_train, gen_held = text_split("general", split_seed=cfg.split_seed)
        # the validation tail (`rag eval lm --text domain-val`) is not mined
        pool_docs, _ = train_val_split(train_docs)
        mined_docs = pool_docs[:cfg.max_docs] if cfg.max_docs else pool_docs
        terms = mine_terms(tok, [d.text for d in mined_docs],
                           [d.text for d in gen_train + gen_held], cfg.top_n, cfg.min_pieces,
                           cfg.min_count, cfg.min_ratio, cfg.min_chars)
        if not terms:
            raise ValueError("no domain term qualifies: lower min_count / min_ratio / "
                             "min_pieces, or mine more documents (max_docs)")
        if cfg.keep_terms:
            terms = keep_only(terms, read_words(cfg.keep_terms))
        texts = {"domain-heldout": [d.text for d in held_docs],
                 "general": [d.text for d in gen_held]}
        limits = {"domain-heldout": cfg.eval_blocks, "general": cfg.general_eval_blocks}

        def evaluate():
            blocks = {k: pack(v, tok, cfg.block_size, limits[k]) if limits[k] else []
                      for k, v in texts.items()}
            return measure(model, tok, objective, blocks, cfg) | {
                "tokens_per_kchar": {k: tokens_per_kchar(tok, v[:200]) for k, v in texts.items()},
                "fertility": {k: fertility(tok, v[:200]) for k, v in texts.items()}}

        before = evaluate()
        added = add_terms(model, tok, [t["term"] for t in terms])
        after = evaluate()
        (out / "terms.json").write_text(json.dumps(terms, indent=2, ensure_ascii=False))
        step = {"training_type": "vocab", "name": cfg.name, "added_tokens": len(added),
                "domain_text": cfg.domain_text}
        manifest = RunManifest("vocab", start, asdict(cfg), cfg.seed, data={
            "objective": objective, "mined_documents": len(mined_docs),
            "general_text": "../shared/data/general (Gutenberg header/footer stripped)",
            "added_tokens": len(added), "vocab_size": len(tok),
            "init": "mean of the old sub-word pieces' rows, input and output embeddings "
                    "(tied: the shared matrix once)", "terms": terms,
            "lineage": lineage(start, step)} | ({"mlm_head": info["mlm_head"]}
                                               if "mlm_head" in info else {}))
        manifest.metrics_before, manifest.metrics_after = before, after
        manifest.wall_time_s = round(time.time() - t0, 1)
        model.eval()
        entry = save_and_register(SavedLM(model, tok), "base", "vocab", manifest, cfg.name,
                                  activate, folder="pretrained")
        manifest.write(out)
        summary = {"added_tokens": len(added)} | {
            f"{k}_{m}_{w}": r[k][m] for w, r in (("before", before), ("after", after))
            for k in texts if k in r for m in ("perplexity", "bits_per_char") if m in r[k]}
        progress.done(entry["path"], summary, 1, 1)
        return {"entry": entry, "manifest": manifest.to_dict(), "run_dir": str(out),
                "model": model, "tokenizer": tok, "terms": terms, "added": added}
    except Exception as e:
        progress.error(f"{type(e).__name__}: {e}")
        raise
