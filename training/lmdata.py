"""Text for language-model training and evaluation (continued pre-training, `rag eval lm`).

- domain documents: the default corpus (MedQuAD answers grouped by focus, PubMedQA sections
  grouped by PMID: one document each), or any .txt (blank-line paragraphs) / .jsonl ("text")
- general documents: the Project Gutenberg books in ../shared/data/general, header and licence
  footer stripped, one document per chapter
- a deterministic split BY DOCUMENT (a seeded hash of the document key); documents of the
  project's evaluation hold-outs (PubMedQA held-out PMIDs, MedQuAD test foci) always go to the
  held-out side, so pre-training never sees them
- a validation slice of the train side (`train_val_split`): its LAST documents (after the seeded
  shuffle), which training never draws from (packing takes documents from the front), for
  choosing hyper-parameters without touching the held-out side (`rag eval lm --text domain-val`)
- packing: documents tokenised, concatenated (EOS between documents for causal LMs; a BERT
  tokenizer's [CLS] ... [SEP] already delimits them) and cut into fixed-length blocks
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

CORPUS_ALIASES = ("corpus", "default", "")
START_RE = re.compile(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK[^\n]*\*\*\*", re.I)
END_RE = re.compile(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.I)
CHAPTER_RE = re.compile(r"^\s*\[?\s*chapter\s+[ivxlcdm\d]+\.?\]?\s*$", re.I | re.M)
META_RE = re.compile(r"^(title|author|release date|language|credits|most recently updated|"
                     r"original publication|illustrator|translator|editor):", re.I)


@dataclass
class TextDoc:
    key: str  # the split unit: documents with the same key stay on one side
    text: str


def domain_documents(path: str = "corpus") -> list[TextDoc]:
    """The default corpus grouped into documents, or the documents of a .txt/.jsonl file."""
    if path not in CORPUS_ALIASES:
        return file_documents(path)
    from rag_app.ingest import default_corpus

    groups: dict[str, list[str]] = {}
    for d in default_corpus():
        key = (f"pubmed:{d.metadata.get('pmid')}" if d.source == "pubmedqa"
               else f"medquad:{d.title}")
        groups.setdefault(key, []).append(d.text.strip())
    return [TextDoc(k, "\n\n".join(v)) for k, v in groups.items()]


def file_documents(path: str | Path) -> list[TextDoc]:
    """.jsonl: one document per line (its "text"; key "id"/"pid"/line number); other files:
    one document per blank-line separated paragraph."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text {str(path)!r} is not a file: use corpus (the default corpus), "
                         "or a .txt / .jsonl file")
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                r = json.loads(line)
                if str(r.get("text", "")).strip():
                    docs.append(TextDoc(str(r.get("id", r.get("pid", i))), r["text"].strip()))
    else:
        paras = re.split(r"\n\s*\n", p.read_text(encoding="utf-8", errors="replace"))
        docs = [TextDoc(f"{p.stem}:{i}", " ".join(t.split())) for i, t in enumerate(paras)
                if t.strip()]
    if not docs:
        raise ValueError(f"{path} holds no text")
    return docs


def strip_gutenberg(text: str) -> str:
    """The book without the Project Gutenberg header (up to "*** START OF ... ***", or the
    Title:/Author: lines when that marker is absent) and footer ("*** END OF ..." onwards)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    end = END_RE.search(text)
    if end:
        text = text[:end.start()]
    start = START_RE.search(text)
    if start:
        return text[start.end():].strip()
    lines = text.split("\n")
    i = 0
    while i < len(lines) and (not lines[i].strip() or META_RE.match(lines[i].strip())):
        i += 1
    return "\n".join(lines[i:]).strip()


def general_documents(folder: str | Path | None = None) -> list[TextDoc]:
    """One document per chapter of each book in ../shared/data/general (front matter before
    the first chapter heading dropped, paragraphs re-flowed, illustration captions dropped)."""
    from rag_app.config import shared_data_dir

    root = Path(folder) if folder else shared_data_dir() / "general"
    files = sorted(root.glob("*.txt")) if root.is_dir() else []
    if not files:
        raise ValueError(f"no general-domain text in {root}: put Project Gutenberg .txt files "
                         "there (or set RAG_SHARED_DATA)")
    docs = []
    for f in files:
        body = strip_gutenberg(f.read_text(encoding="utf-8", errors="replace"))
        parts = CHAPTER_RE.split(body)
        parts = parts[1:] if len(parts) > 1 else parts  # front matter: contents, illustrations
        for i, chapter in enumerate(parts):
            paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", chapter)]
            paras = [p for p in paras if p and not p.startswith(("[Illustration", "]"))]
            if paras:
                docs.append(TextDoc(f"{f.stem}:{i}", "\n\n".join(paras)))
    return docs


def eval_holdout_keys() -> set[str]:
    """Document keys of the project's evaluation hold-outs (never trained on)."""
    from rag_app.datasets import medquad_test_titles, pubmedqa_heldout_pmids

    return ({f"pubmed:{p}" for p in pubmedqa_heldout_pmids()}
            | {f"medquad:{t}" for t in medquad_test_titles()})


def _unit(seed: int, key: str) -> float:
    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16 ** 12


def split_documents(docs: list[TextDoc], heldout_fraction: float, seed: int = 0,
                    force_heldout: set[str] | frozenset = frozenset()
                    ) -> tuple[list[TextDoc], list[TextDoc]]:
    """(train, held-out) by document key: a seeded hash decides, independent of the order and
    number of documents; keys in `force_heldout` are always held out. Each side is shuffled
    with the seed (deterministic)."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction!r} is invalid: use 0 <= f < 1")
    train, held = [], []
    for d in sorted(docs, key=lambda d: d.key):
        (held if d.key in force_heldout or _unit(seed, d.key) < heldout_fraction
         else train).append(d)
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(held)
    return train, held


def text_split(name: str, heldout_fraction: float = 0.05, split_seed: int = 0,
               general_heldout: float = 0.3) -> tuple[list[TextDoc], list[TextDoc]]:
    """(train side, held-out side) of "domain" (the default corpus), "general", or a file
    path (a file's documents are split like the corpus)."""
    if name == "general":
        return split_documents(general_documents(), general_heldout, split_seed)
    corpus = name in ("domain",) + CORPUS_ALIASES
    docs = domain_documents("corpus" if corpus else name)
    force = eval_holdout_keys() if corpus else frozenset()
    return split_documents(docs, heldout_fraction, split_seed, force)


VAL_FRACTION = 0.05


def train_val_split(train_docs: list[TextDoc], val_fraction: float = VAL_FRACTION
                    ) -> tuple[list[TextDoc], list[TextDoc]]:
    """(training pool, validation slice) of a train side: the validation slice is its last
    round(f x n) documents. The pool is a prefix of the train side, so the blocks a run packs
    from its front are the same with or without the slice set aside."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: use 0 <= f < 1")
    n = round(val_fraction * len(train_docs))
    return (train_docs[:len(train_docs) - n], train_docs[len(train_docs) - n:]) if n \
        else (list(train_docs), [])


def token_stream(texts, tokenizer, batch: int = 64):
    """The texts' ids, `batch` texts at a time (one list per batch), each text followed by
    the EOS token unless it already ends with one (none for tokenizers with a SEP token: their
    own special tokens mark the documents)."""
    eos = tokenizer.eos_token_id if tokenizer.sep_token_id is None else None
    texts = list(texts)
    for i in range(0, len(texts), batch):
        buf: list[int] = []
        for ids in tokenizer(texts[i:i + batch], verbose=False)["input_ids"]:
            buf.extend(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                buf.append(eos)
        yield buf


def pack(texts, tokenizer, block_size: int, max_blocks: int = 0, batch: int = 64) -> list:
    """Token blocks of exactly `block_size` ids (the remainder is dropped); tokenises only as
    many texts as `max_blocks` (0 = all) needs."""
    if block_size < 8:
        raise ValueError(f"block_size={block_size} is invalid: use >= 8")
    buf: list[int] = []
    blocks: list[list[int]] = []
    for ids in token_stream(texts, tokenizer, batch):
        buf.extend(ids)
        n = len(buf) // block_size
        blocks += [buf[j * block_size:(j + 1) * block_size] for j in range(n)]
        buf = buf[n * block_size:]
        if max_blocks and len(blocks) >= max_blocks:
            return blocks[:max_blocks]
    return blocks
