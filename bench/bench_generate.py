"""Generation speed of our generator (streaming, as the app uses it) against a bare
`model.generate` on the same prompt and the same weights, in the same run: tokens/s and time
to first token (TTFT). Target ratio >= 0.95. Also peak memory.

    python bench/bench_generate.py [--tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import time

from common import median, save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from rag_app.config import GenerationConfig
    from rag_app.generate import HFGenerator
    from rag_app.types import Source

    rows = [json.loads(line) for line in open("tests/data/corpus.jsonl")]
    gout = [r for r in rows if r["title"] == "Gout"][:3]
    sources = [Source(i + 1, r["id"] + "#0", r["id"], r["title"], r["text"][:700], 0.6)
               for i, r in enumerate(gout)]
    question = "What are the symptoms of gout?"
    gen = HFGenerator("base", config=GenerationConfig(max_new_tokens=args.tokens))
    gen.warm_up()
    model, tok = gen.model, gen.tokenizer
    prompt = gen.prompt(question, sources)
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    n_prompt = inputs["input_ids"].shape[1]
    common = dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=tok.pad_token_id, eos_token_id=None)  # fixed length: no EOS
    gen.config = GenerationConfig(max_new_tokens=args.tokens)
    bare_tps, bare_ttft, ours_tps, ours_ttft = [], [], [], []
    for _ in range(args.repeats):
        with torch.inference_mode():
            t = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, **common)
            bare_ttft.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 **common)
            bare_tps.append((out.shape[1] - n_prompt) / (time.perf_counter() - t))
        t = time.perf_counter()
        first = None
        text = ""
        for text in gen.stream(question, sources):
            first = first or time.perf_counter() - t
        total = time.perf_counter() - t
        n_new = len(tok(text, add_special_tokens=False)["input_ids"])
        ours_ttft.append(first)
        ours_tps.append(n_new / total)
    b, o = median(bare_tps), median(ours_tps)
    print(f"prompt {n_prompt} tokens, {args.tokens} new tokens, greedy, fp32, {args.repeats} runs")
    print(f"bare model.generate : {b:6.1f} tokens/s   TTFT {median(bare_ttft) * 1000:7.0f} ms")
    print(f"HFGenerator.stream  : {o:6.1f} tokens/s   TTFT {median(ours_ttft) * 1000:7.0f} ms"
          f"  (first text shown)")
    print(f"ratio ours/bare     : {o / b:.3f}   (target >= 0.95)")
    save("generate", {"prompt_tokens": n_prompt, "new_tokens": args.tokens, "bare_tps": b,
                      "ours_tps": o, "ratio": o / b, "bare_ttft_ms": median(bare_ttft) * 1000,
                      "ours_ttft_ms": median(ours_ttft) * 1000,
                      "runs": {"bare": bare_tps, "ours": ours_tps}})


if __name__ == "__main__":
    main()
