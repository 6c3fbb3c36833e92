"""Paired comparison of two `rag eval summarize` results on the same rows: per-row ROUGE
recomputed from the saved summaries (and checked against the saved means), the mean paired
difference (B - A) with a percentile bootstrap 95% interval over the rows, and the rows where
B beats, ties or loses to A. Says whether a difference between two settings is larger than the
noise of ~100 rows. With one file: that result's mean and its bootstrap 95% interval.

    python -m training.summary_compare results/summarize_val_v3_beam8.json \\
        results/summarize_val_soup36_beam8.json [--model-a NAME] [--model-b NAME]
        [--metric rouge2] [--resamples 10000] [--seed 0] [--out JSON]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("rouge1", "rouge2", "rougeL")


def _model(result: dict, name: str | None, path: str) -> tuple[str, dict]:
    models = result.get("models") or {}
    if name is None:
        if len(models) != 1:
            raise ValueError(f"{path} holds {sorted(models)}: name one with --model-a/--model-b")
        name = next(iter(models))
    if name not in models:
        raise ValueError(f"{path} has no model {name!r}: it holds {sorted(models)}")
    if not models[name].get("rows"):
        raise ValueError(f"{path}: model {name!r} has no per-row summaries to compare")
    return name, models[name]


def row_scores(entry: dict, metric: str) -> dict[str, float]:
    """{row id: ROUGE F-measure of its summary against its reference} (rag_app.evaluate)."""
    from rag_app.evaluate import rouge_scores

    return {r["id"]: rouge_scores(r["summary"], r["reference"])[metric] for r in entry["rows"]}


def _bootstrap_means(x, resamples: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(1)


def interval(a: dict[str, float], resamples: int = 10000, seed: int = 0) -> dict:
    """Mean of one result's per-row scores and its percentile bootstrap 95% interval."""
    import numpy as np

    if not a or resamples < 1:
        raise ValueError("nothing to score: no rows, or resamples < 1")
    x = np.array([a[i] for i in sorted(a)])
    lo, hi = np.percentile(_bootstrap_means(x, resamples, seed), [2.5, 97.5])
    return {"n": len(x), "mean_a": float(x.mean()), "ci95": [float(lo), float(hi)],
            "resamples": resamples, "seed": seed}


def paired(a: dict[str, float], b: dict[str, float], resamples: int = 10000,
           seed: int = 0) -> dict:
    """Mean of B - A over the rows both hold (the same row ids required), a percentile
    bootstrap 95% interval of that mean (rows resampled with replacement, seeded), and
    wins / ties / losses of B."""
    import numpy as np

    if set(a) != set(b):
        raise ValueError(f"the two results cover different rows ({len(set(a) - set(b))} only "
                         f"in A, {len(set(b) - set(a))} only in B): compare the same split")
    if not a or resamples < 1:
        raise ValueError("nothing to compare: no rows, or resamples < 1")
    ids = sorted(a)
    d = np.array([b[i] - a[i] for i in ids])
    lo, hi = np.percentile(_bootstrap_means(d, resamples, seed), [2.5, 97.5])
    return {"n": len(d), "mean_a": float(np.mean([a[i] for i in ids])),
            "mean_b": float(np.mean([b[i] for i in ids])), "mean_diff": float(d.mean()),
            "ci95": [float(lo), float(hi)], "resamples": resamples, "seed": seed,
            "b_wins": int((d > 0).sum()), "ties": int((d == 0).sum()),
            "b_loses": int((d < 0).sum())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="rag eval summarize JSON (the reference setting)")
    ap.add_argument("b", nargs="?", help="rag eval summarize JSON (the candidate; leave out "
                    "for one result's interval)")
    ap.add_argument("--model-a")
    ap.add_argument("--model-b")
    ap.add_argument("--metric", default="rouge2", choices=METRICS)
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    x = ap.parse_args(argv)
    files = [(x.a, x.model_a)] + ([(x.b, x.model_b)] if x.b else [])
    scored = []
    for path, want in files:
        name, entry = _model(json.loads(Path(path).read_text()), want, path)
        scores = row_scores(entry, x.metric)
        mean = sum(scores.values()) / len(scores)
        if abs(mean - entry[x.metric]) > 1e-6:
            raise ValueError(f"{path}: {name}'s {x.metric} recomputed from its rows is {mean:.4f},"
                             f" not the saved {entry[x.metric]:.4f}: the file was edited or "
                             "the scorer changed")
        scored.append((name, scores))
    if not x.b:
        (na, sa), = scored
        s = interval(sa, x.resamples, x.seed)
        print(f"{x.metric} on {s['n']} rows: {na} ({Path(x.a).name}) {s['mean_a']:.4f}, "
              f"bootstrap 95% interval [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}] "
              f"({s['resamples']} resamples)")
        out = {"metric": x.metric, "a": {"file": x.a, "model": na}, **s}
    else:
        (na, sa), (nb, sb) = scored
        s = paired(sa, sb, x.resamples, x.seed)
        print(f"{x.metric} on {s['n']} rows: A {na} ({Path(x.a).name}) {s['mean_a']:.4f}, "
              f"B {nb} ({Path(x.b).name}) {s['mean_b']:.4f}")
        print(f"B - A {s['mean_diff']:+.4f}, bootstrap 95% interval [{s['ci95'][0]:+.4f}, "
              f"{s['ci95'][1]:+.4f}] ({s['resamples']} resamples); B better on {s['b_wins']} "
              f"rows, equal on {s['ties']}, worse on {s['b_loses']}")
        out = {"metric": x.metric, "a": {"file": x.a, "model": na},
               "b": {"file": x.b, "model": nb}, **s}
    if x.out:
        Path(x.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    import sys

    try:
        main()
    except (ValueError, OSError, KeyError) as exc:  # bad files: a message, no traceback
        sys.exit(f"error: {exc}")
