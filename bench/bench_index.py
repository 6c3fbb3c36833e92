"""Index build throughput (passages/s) against a bare SentenceTransformer.encode of the same
chunk texts in the same run. Target ratio >= 0.9.

    python bench/bench_index.py [--n 1500] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile

from common import median, save, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500, help="passages of the default corpus")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import json
    import os

    from rag_app.chunk import chunk_documents
    from rag_app.config import ChunkConfig
    from rag_app.embed import SentenceTransformerEmbedder
    from rag_app.ingest import default_corpus

    docs = default_corpus()[:: max(1, 19765 // args.n)][: args.n]
    emb = SentenceTransformerEmbedder().warm_up()
    texts = [c.text for c in chunk_documents(docs, emb.tokenizer, ChunkConfig())]
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RAG_INDEXES_DIR"] = tmp
        from rag_app.pipeline import build_index

        src = os.path.join(tmp, "docs.jsonl")
        with open(src, "w") as f:
            for d in docs:
                f.write(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n")
        for _ in range(args.repeats):  # interleaved so both see the same machine load
            _, t = timed(emb.model.encode, texts, batch_size=64, normalize_embeddings=True,
                         show_progress_bar=False)
            bare.append(len(docs) / t)
            _, t = timed(build_index, "bench", [src], embedder=emb, progress=False)
            ours.append(len(docs) / t)
    b, o = median(bare), median(ours)
    print(f"{len(docs)} passages -> {len(texts)} chunks")
    print(f"bare SentenceTransformer.encode : {b:7.1f} passages/s  (runs {[round(x, 1) for x in bare]})")
    print(f"rag index build (all stages)    : {o:7.1f} passages/s  (runs {[round(x, 1) for x in ours]})")
    print(f"ratio build/bare                : {o / b:.3f}   (target >= 0.9)")
    print(f"estimated default corpus build  : {19765 / o / 60:.1f} min")
    save("index_build", {"passages": len(docs), "chunks": len(texts), "bare_pps": b,
                         "build_pps": o, "ratio": o / b, "runs_bare": bare, "runs_build": ours})


if __name__ == "__main__":
    main()
