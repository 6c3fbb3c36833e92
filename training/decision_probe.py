"""`rag eval decision-probe`: do a generator's own features carry PubMedQA's yes/no/maybe?

Before tuning a generator for decisions, check that the signal is there to learn. Linear
probes (scikit-learn's LogisticRegression, fixed C, no tuning) are fitted and scored by
stratified k-fold cross-validation on the TRAINING side of PubMedQA only (never the
validation slice, never the held-out fold), on:
- "tfidf": the question and abstract's words and word pairs (no model: what the text alone
  gives a linear reader);
- "<model> L<i>": each model's hidden state after layer i at the last token of THE QA prompt
  (qa.qa_prompt, as `rag train qa` renders it), at a quarter, half, three quarters and all
  of its depth (or `--layers`).

Per feature: out-of-fold yes-vs-no ROC AUC, 3-class accuracy against always answering the
majority label, and that gain's 95% bootstrap interval (rows resampled). A probe that cannot
beat the majority class here says a few hundred labels will not teach that model the decision.

    rag eval decision-probe --model base [--model HF_ID|PATH] [--folds 5] --out results/X.json

Models tuned in this project (a manifest.json beside the weights) are refused: they may have
trained on these very rows.
"""
from __future__ import annotations

from collections import Counter

LABELS = ("maybe", "no", "yes")  # LogisticRegression's sorted class order


def oof_proba(X, y: list[str], folds: int = 5, seed: int = 0, C: float = 1.0):
    """Out-of-fold class probabilities (n, 3) in LABELS order: each row scored by a
    logistic regression fitted on the other folds (dense features standardised per fold)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y_arr = np.array(y)
    counts = Counter(y)
    if set(counts) != set(LABELS):
        raise ValueError(f"the rows need all of {LABELS}; got {dict(counts)}")
    if folds < 2 or min(counts.values()) < folds:
        raise ValueError(f"folds={folds} is invalid: use 2 <= folds <= the rarest label's "
                         f"count ({min(counts.values())})")
    sparse = hasattr(X, "tocsr")
    out = np.zeros((len(y), len(LABELS)))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y_arr):
        clf = LogisticRegression(C=C, max_iter=5000)
        clf = clf if sparse else make_pipeline(StandardScaler(), clf)
        clf.fit(X[tr], y_arr[tr])
        out[te] = clf.predict_proba(X[te])
    return out


def probe_metrics(proba, gold: list[str], majority: str, resamples: int = 2000,
                  seed: int = 0) -> dict:
    """Accuracy of the argmax label, the majority baseline, their difference with a 95%
    percentile-bootstrap interval, and the yes-vs-no AUC of log P(yes) - log P(no)."""
    import numpy as np

    from .qa import decision_auc

    pred = [LABELS[i] for i in proba.argmax(1)]
    right = np.array([p == g for p, g in zip(pred, gold)], float)
    base = np.array([g == majority for g in gold], float)
    idx = np.random.default_rng(seed).integers(0, len(gold), size=(resamples, len(gold)))
    gains = right[idx].mean(1) - base[idx].mean(1)
    eps = 1e-12
    logodds = (np.log(proba[:, 2] + eps) - np.log(proba[:, 1] + eps)).tolist()
    return {"accuracy": float(right.mean()), "majority_baseline": float(base.mean()),
            "gain": float(right.mean() - base.mean()),
            "gain_ci95": [float(x) for x in np.percentile(gains, [2.5, 97.5])],
            "auc_yes_no": decision_auc(logodds, gold), "predicted": dict(Counter(pred))}


def default_layers(n_layers: int) -> list[int]:
    return sorted({max(1, round(n_layers * k / 4)) for k in (1, 2, 3, 4)})


def hidden_features(model, tok, prompts: list[str], layers: list[int] | None = None,
                    desc: str = "features"):
    """{layer: (n, hidden) array}: the hidden state after each layer at every prompt's last
    token (one prompt at a time, so no padding enters)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    n_layers = model.config.num_hidden_layers
    layers = layers or default_layers(n_layers)
    if any(not 1 <= i <= n_layers for i in layers):
        raise ValueError(f"layers={layers} is invalid: this model has layers 1..{n_layers}")
    feats: dict[int, list] = {i: [] for i in layers}
    with torch.inference_mode():
        for p in tqdm(prompts, desc=desc, unit="prompt"):
            enc = tok(p, return_tensors="pt", add_special_tokens=False)
            hs = model(**enc, output_hidden_states=True).hidden_states
            for i in layers:
                feats[i].append(hs[i][0, -1].float().numpy())
    return {i: np.stack(v) for i, v in feats.items()}


def refuse_tuned(base: str, adapter: str | None, name: str) -> None:
    """models_to_compare's check: a model with a manifest.json beside its weights was tuned
    in this project and may have trained on the probe's rows."""
    from pathlib import Path

    if any(p and (Path(p) / "manifest.json").is_file() for p in (adapter, base)):
        raise ValueError(f"{name} was tuned in this project (it has a manifest.json) and "
                         f"may have trained on these rows: probe pretrained models only "
                         f"(base, a Hugging Face id or path)")


def eval_decision_probe(refs: list[str], cfg, limit: int = 0, folds: int = 5,
                        layers: list[int] | None = None, C: float = 1.0, seed: int = 0) -> dict:
    """Cross-validated probes on the training side's rows (qa recipe `cfg` sets the split and
    the prompt); `limit` keeps the first N rows (by pmid)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from .qa import pubmedqa_rows, qa_prompt
    from .tasks import models_to_compare

    rows = pubmedqa_rows("train", cfg.val_fraction)
    rows = rows[:limit] if limit else rows
    gold = [r["decision"] for r in rows]
    majority = Counter(gold).most_common(1)[0][0]
    out: dict = {"dataset": "pubmedqa-train (the training side; val and the held-out fold "
                            "excluded)", "split": "train", "n": len(rows),
                 "labels": dict(Counter(gold)), "majority_label": majority, "folds": folds,
                 "C": C, "seed": seed, "max_source_tokens": cfg.max_source_tokens,
                 "features": {}}

    def add(name, X):
        out["features"][name] = probe_metrics(oof_proba(X, gold, folds, seed, C), gold,
                                              majority, seed=seed)

    add("tfidf", TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        .fit_transform([f"{r['question']}\n{r['context']}" for r in rows]))
    models = models_to_compare(refs, refuse_tuned) if refs else ()
    for label, name, model, tok in models:
        feats = hidden_features(model, tok, [qa_prompt(tok, r, cfg.max_source_tokens)
                                             for r in rows], layers, desc=label)
        for i, X in feats.items():
            add(f"{label} L{i}", X)
    print_probe(out)
    return out


def print_probe(res: dict) -> None:
    print(f"{res['n']} PubMedQA questions of the training side {res['labels']}, "
          f"{res['folds']}-fold out-of-fold linear probes (C={res['C']}, seed {res['seed']})")
    print(f"{'features':24s} {'AUC y/n':>8s} {'acc':>6s} {'majority':>9s} {'gain':>7s} "
          f"{'gain 95% interval':>19s}")
    for name, m in res["features"].items():
        auc = m["auc_yes_no"]
        print(f"{name:24s} {'-' if auc is None else f'{auc:.3f}':>8s} {m['accuracy']:6.3f} "
              f"{m['majority_baseline']:9.3f} {m['gain']:+7.3f} "
              f"[{m['gain_ci95'][0]:+.3f}, {m['gain_ci95'][1]:+.3f}]")
    print(f"majority = always {res['majority_label']!r}; gain = accuracy - majority; AUC y/n: "
          f"how well log P(yes) - log P(no) separates yes from no questions (0.5 = not at "
          f"all). Several feature sets are shown: the best of them is an optimistic pick")


def plot_probe(result: dict, path: str) -> None:
    from rag_app.ui_admin import grouped_bars

    series = {name: {"accuracy": m["accuracy"], "majority": m["majority_baseline"],
                     "AUC yes/no": m["auc_yes_no"] or 0.0}
              for name, m in result["features"].items()}
    fig = grouped_bars(series, ["accuracy", "majority", "AUC yes/no"],
                       f"PubMedQA decision probes, training side, {result['folds']}-fold "
                       f"(n={result['n']})", figsize=(9, 4), fontsize=8)
    fig.savefig(path, dpi=100)
