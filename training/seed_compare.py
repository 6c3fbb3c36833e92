"""One comparison repeated over training seeds: `rag eval lm` results (one JSON per seed, the
baseline model first, the candidate second, as `--model BASE --model CAND`) -> per seed and
mean bits per char (or another metric), the paired differences, and how many seeds the
candidate is not worse at. A single seed pair of short runs differs by about as much as two
seeds of the same recipe do, so "not worse" is judged on the mean over seeds.

    python -m training.seed_compare results/vocab_gain_s{42,1,2,3,4}_heldout_docs300.json
        [--metric bits_per_char] [--out JSON]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def seed_rows(results: list[dict], metric: str = "bits_per_char") -> list[dict]:
    """Per result: {"base", "cand", base value, cand value, diff = cand - base}."""
    rows = []
    for r in results:
        models = list(r["models"].items())
        if len(models) != 2:
            raise ValueError(f"each result must compare exactly 2 models, got {len(models)}")
        (b, bm), (c, cm) = models
        text = r["text"]
        x, y = bm[text][metric], cm[text][metric]
        rows.append({"base": b, "cand": c, "base_value": x, "cand_value": y, "diff": y - x})
    return rows


def summary(rows: list[dict]) -> dict:
    """Means over the seeds, the mean paired difference (cand - base, lower is better for
    bits per char), its standard deviation, and the seeds where cand <= base."""
    if not rows:
        raise ValueError("no results to compare")
    diffs = [r["diff"] for r in rows]
    return {"n_seeds": len(rows),
            "base_mean": statistics.fmean(r["base_value"] for r in rows),
            "cand_mean": statistics.fmean(r["cand_value"] for r in rows),
            "mean_diff": statistics.fmean(diffs),
            "sd_diff": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "cand_not_worse": sum(d <= 0 for d in diffs)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="rag eval lm JSONs, one per seed")
    ap.add_argument("--metric", default="bits_per_char")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    results = [json.loads(Path(p).read_text()) for p in a.results]
    rows = seed_rows(results, a.metric)
    s = summary(rows)
    print(f"{a.metric} on {results[0]['text']} (chars {results[0].get('chars')}, doc_chars "
          f"{results[0].get('doc_chars')}, shuffle_docs {results[0].get('shuffle_docs')}), "
          "candidate - baseline per seed:")
    for p, r in zip(a.results, rows):
        print(f"  {r['base']:14s} {r['base_value']:.4f}  {r['cand']:14s} {r['cand_value']:.4f}"
              f"  {r['diff']:+.4f}  ({Path(p).name})")
    sd = "-" if s["sd_diff"] is None else f"{s['sd_diff']:.4f}"
    print(f"mean over {s['n_seeds']} seeds: baseline {s['base_mean']:.4f}, candidate "
          f"{s['cand_mean']:.4f}, paired difference {s['mean_diff']:+.4f} (sd {sd}); "
          f"candidate not worse at {s['cand_not_worse']} of {s['n_seeds']} seeds")
    out = {"metric": a.metric, "files": a.results, "seeds": rows, **s}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
