"""Embedding throughput: bare sentence-transformers vs our torch embedder vs OpenVINO.

    .venv/bin/python bench/bench_embed.py [--n 2000] [--repeats 3] [--precisions fp32,bf16,int8]

Embeds N real chunks of the default corpus (ChunkConfig() defaults, the embedder's tokenizer),
interleaving the methods in each repeat so that machine load hits them alike; prints
passages/s, the ratio against the bare `SentenceTransformer.encode` baseline of the same run
(medians of the repeats), cosine against fp32 and top-10 neighbour overlap for 200 PubMedQA
questions searched among the N chunks, and the estimated time to embed the full default corpus
(30,838 chunks). Results go to bench/results/embed-<time>.json. Converted OpenVINO models are
cached under models/openvino/ (RAG_MODELS_DIR); their one-time conversion is timed apart.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from rag_app.chunk import chunk_documents  # noqa: E402
from rag_app.config import ChunkConfig, shared_data_dir  # noqa: E402
from rag_app.embed import SentenceTransformerEmbedder, resolve_embedder_path  # noqa: E402
from rag_app.ingest import default_corpus  # noqa: E402

FULL_CORPUS_CHUNKS = 30_838


def sample_chunks(n: int, tokenizer, seed: int = 0) -> list[str]:
    docs = default_corpus()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    texts: list[str] = []
    step = max(64, n)
    for s in range(0, len(order), step):
        texts += [c.text for c in chunk_documents([docs[i] for i in order[s:s + step]],
                                                  tokenizer, ChunkConfig())]
        if len(texts) >= n:
            break
    return texts[:n]


def questions(n: int) -> list[str]:
    path = shared_data_dir() / "pubmedqa" / "pqal_trainval.jsonl"
    with open(path, encoding="utf-8") as f:
        qs = [json.loads(line)["question"] for line in f if line.strip()]
    return qs[:n]


def topk(q: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ p.T), axis=1)[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="chunks to embed (default 2000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="default")
    ap.add_argument("--precisions", default="fp32,bf16,int8",
                    help="OpenVINO precisions to run, those unavailable are skipped")
    ap.add_argument("--hints", default="LATENCY", help="OpenVINO PERFORMANCE_HINTs, e.g. "
                    "LATENCY,THROUGHPUT")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformer

    ours = SentenceTransformerEmbedder(args.model).warm_up()
    texts = sample_chunks(args.n, ours.tokenizer)
    qs = questions(args.queries)
    ntok = [len(x) for x in ours.tokenizer(texts, truncation=True,
                                           max_length=ours.max_seq_length)["input_ids"]]
    print(f"{len(texts)} chunks (mean {np.mean(ntok):.0f} tokens), {len(qs)} queries, "
          f"torch threads {torch.get_num_threads()}, load {os.getloadavg()}", flush=True)

    bare = SentenceTransformer(resolve_embedder_path(args.model), device="cpu")
    methods = {
        "st-bare": lambda t: bare.encode(t, batch_size=64, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False),
        "torch-ours": ours.encode,
    }
    conversion = {}
    skipped = {}
    try:
        from rag_app.embed_openvino import OpenVINOEmbedder, bf16_supported, int8_fast
    except ImportError as e:
        OpenVINOEmbedder = None
        skipped["openvino"] = str(e)
    if OpenVINOEmbedder is not None:
        for prec in [p for p in args.precisions.split(",") if p]:
            if prec == "bf16" and not bf16_supported():
                skipped["openvino-bf16"] = "CPU has neither avx512_bf16 nor AMX"
                continue
            for hint in args.hints.split(","):
                try:
                    t = time.perf_counter()
                    ov = OpenVINOEmbedder(args.model, precision=prec,
                                          performance_hint=hint).warm_up()
                    conversion[f"openvino-{prec}-{hint}"] = {
                        "seconds": round(time.perf_counter() - t, 1), "converted": ov.converted}
                    methods[f"openvino-{prec}" + ("" if hint == "LATENCY" else f"-{hint}")] = \
                        ov.encode
                except ValueError as e:
                    skipped[f"openvino-{prec}"] = str(e)
    for name, fn in methods.items():  # warm-up: first-call allocations, thread pools
        fn(texts[:16])

    times: dict[str, list[float]] = {m: [] for m in methods}
    vectors: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            v = fn(texts)
            times[name].append(time.perf_counter() - t)
            vectors[name] = v
            print(f"  repeat {r + 1} {name}: {len(texts) / times[name][-1]:.1f} passages/s",
                  flush=True)

    ref_p = vectors["st-bare"]
    ref_q = methods["st-bare"](qs)
    ref_top = topk(ref_q, ref_p, 10)
    base = statistics.median(times["st-bare"])
    rows = []
    print(f"\n{'method':28s} {'pass/s':>8s} {'x bare':>7s} {'cos min':>8s} {'cos mean':>9s} "
          f"{'top10':>6s} {'full build':>10s}")
    for name, fn in methods.items():
        med = statistics.median(times[name])
        q = fn(qs)
        cos = (vectors[name] * ref_p).sum(1)
        row = {"method": name, "seconds": times[name], "median_s": med,
               "passages_per_s": len(texts) / med, "ratio_vs_bare": base / med,
               "ratio_per_repeat": [b / x for b, x in zip(times["st-bare"], times[name])],
               "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
               "top10_overlap": overlap(topk(q, vectors[name], 10), ref_top),
               "full_corpus_minutes": FULL_CORPUS_CHUNKS / (len(texts) / med) / 60}
        rows.append(row)
        print(f"{name:28s} {row['passages_per_s']:8.1f} {row['ratio_vs_bare']:7.2f} "
              f"{row['cos_min']:8.5f} {row['cos_mean']:9.5f} {row['top10_overlap']:6.3f} "
              f"{row['full_corpus_minutes']:8.1f} m")
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")

    from rag_app.embed_openvino import cpu_flags

    flags = cpu_flags()
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "n": len(texts), "repeats": args.repeats,
        "mean_tokens": float(np.mean(ntok)), "queries": len(qs), "model": args.model,
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx"))),
        "bf16": bf16_supported() if OpenVINOEmbedder else None,
        "vnni": int8_fast() if OpenVINOEmbedder else None,
        "loadavg_end": os.getloadavg(), "conversion": conversion, "skipped": skipped,
        "versions": _versions(), "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"embed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nsaved {path}")
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "sentence-transformers", "openvino", "nncf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
