"""Documents -> Chunks: token-aware windows of the embedder's tokenizer, with overlap.

Chunks keep their parent id, title and character offsets into the parent text.
"""
from __future__ import annotations

from typing import Iterable

from tqdm.auto import tqdm

from .config import ChunkConfig
from .types import Chunk, Document


def chunk_documents(docs: Iterable[Document], tokenizer, config: ChunkConfig = ChunkConfig(),
                    batch_size: int = 256, progress: bool = False) -> list[Chunk]:
    """Split each document into windows of at most `config.size` tokens (special tokens
    included), `config.overlap` tokens shared between neighbours."""
    docs = list(docs)
    body = config.size - tokenizer.num_special_tokens_to_add()
    step = body - config.overlap
    chunks: list[Chunk] = []
    bar = tqdm(total=len(docs), desc="chunking", unit="doc", disable=not progress)
    for i in range(0, len(docs), batch_size):
        batch = docs[i:i + batch_size]
        enc = tokenizer([d.text for d in batch], add_special_tokens=False,
                        return_offsets_mapping=True, truncation=False, verbose=False)
        for doc, offsets in zip(batch, enc["offset_mapping"]):
            if not offsets:
                continue
            n = 0
            for s in range(0, max(len(offsets) - config.overlap, 1), step):
                window = offsets[s:s + body]
                start, end = window[0][0], window[-1][1]
                chunks.append(Chunk(f"{doc.id}#{n}", doc.id, doc.text[start:end], doc.title,
                                    start, end))
                n += 1
                if s + body >= len(offsets):
                    break
        bar.update(len(batch))
    bar.close()
    return chunks
