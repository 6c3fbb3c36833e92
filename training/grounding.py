"""`rag eval grounding`: does a generator answer from the evidence it is given, cite it, and
say so when the evidence is missing?

Held-out RAFT prompts, built as `rag train instruct` builds its examples (the gold passage
among distractors from other questions, rendered by THE serving prompt) from the held-out
PubMedQA fold and MedQuAD test titles (`--split val`: the training side's validation slice),
half of them (seeded) without any gold passage. By default each prompt holds as many passages
as the app gives the generator (RetrievalConfig.top_k) within the app's prompt budget
(GenerationConfig.max_prompt_tokens), and answers are as long as the app allows
(GenerationConfig.max_new_tokens): what a user of the app would see.

Per model, overall and per source:
- says_so_when_absent: gold-absent prompts answered with the no-evidence statement
  (prompts.is_no_answer) -- the issue's "answers without evidence say so";
- refuses_when_present: gold-present prompts answered with it anyway (over-refusal);
- citation_validity: answers whose every citation number is one of the given sources,
  counted on the raw text (before the app's parser drops invalid ones);
- cites_when_answering / cites_gold: of the gold-present answers that do not refuse, the
  share citing any source / a gold one;
- mean_words.

`--gate` scores the answers the app would SERVE instead of the generator's alone: before
generating, the app's weak-evidence gate (RagPipeline.is_weak) reads the best score of the
prompt's passages -- the relevance classifier's probability (`--gate NAME|PATH|tuned`, a
cross-encoder) or, as the app does without one, the bi-encoder cosine (`--gate cosine`) --
and below the app's threshold (rerank.CLASSIFIER_WEAK / COSINE_WEAK, not tuned here) answers
with its weak-evidence text instead of running the generator. The gate's own rates are
reported beside (blocks_when_absent / blocks_when_present, median best score); with
`--gate-only` they are all that is scored (no generator runs: cheap, for choosing a gate).

    rag eval grounding --model base --model NAME [--split val] [--n 80]
        [--gate cosine|REF [--gate-only]] --out results/X.json
"""
from __future__ import annotations

import numpy as np

SPLIT_FILES = "rag_app/splits/pubmedqa_heldout_pmids.txt + MedQuAD test titles (by focus)"
RATES = ("says_so_when_absent", "refuses_when_present", "citation_validity",
         "cites_when_answering", "cites_gold")


def grounding_items(cfg, tokenizer, n: int, split: str = "eval", n_sources: int = 0,
                    seed: int = 0) -> list:
    """`n` RAFT examples of `split` (half PubMedQA, half MedQuAD; half without the gold
    passage), `n_sources` passages each (0: the app's top_k) within the app's prompt budget;
    the instruct recipe `cfg` gives the gold count and answer length."""
    from rag_app.config import GenerationConfig, RetrievalConfig

    from .data import instruction_examples
    from .tasks import check_eval_split

    check_eval_split(split)
    if n < 2:
        raise ValueError(f"n={n} is invalid: use >= 2 (half of the prompts lack the gold)")
    return instruction_examples(tokenizer, n, split, ("pubmedqa", "medquad"), 0.5,
                                n_sources or RetrievalConfig().top_k, cfg.max_gold, 0.5,
                                GenerationConfig().max_prompt_tokens,
                                cfg.answer_words, seed)


def grounding_metrics(answers: list[str], items: list) -> dict:
    """The rates above (None where no prompt qualifies), counts and mean words."""
    from rag_app.prompts import is_no_answer, parse_answer

    if len(answers) != len(items):
        raise ValueError("answers and prompts must have the same length")
    parsed = [parse_answer(a, e.sources) for a, e in zip(answers, items)]  # (text, cited, dropped)
    absent = [is_no_answer(a) for a, e in zip(answers, items) if e.gold_absent]
    present = [(a, e, cited) for a, e, (_, cited, _) in zip(answers, items, parsed)
               if not e.gold_absent]
    refused = [is_no_answer(a) for a, _, _ in present]
    answered = [(cited, e) for (_, e, cited), r in zip(present, refused) if not r]
    valid = [not dropped for _, _, dropped in parsed]

    def share(xs):
        return sum(xs) / len(xs) if xs else None

    return {"n": len(items), "n_gold_absent": len(absent), "n_gold_present": len(present),
            "says_so_when_absent": share(absent), "refuses_when_present": share(refused),
            "citation_validity": share(valid),
            "cites_when_answering": share([bool(c) for c, _ in answered]),
            "cites_gold": share([any(s.id in c for s in e.sources
                                     if s.number in e.gold_numbers) for c, e in answered]),
            "mean_words": share([len(a.split()) for a in answers]) or 0.0}


def gate_scores(items: list, relevance: str | None = None) -> tuple[list[float], float, str]:
    """The app's weak-evidence gate on each prompt's passages, scored as the app's Reranker
    scores them: the best relevance-classifier probability (`relevance`: a cross-encoder
    folder) or, without one, the best bi-encoder cosine with the question. Returns the best
    score per prompt, the app's threshold for that scorer and the scorer's kind."""
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    from rag_app.embed import make_embedder
    from rag_app.rerank import Reranker
    from rag_app.types import Chunk

    # no index behind these passages: the cosine path embeds them itself, as it does for a
    # keyword-only index (Reranker.score)
    rr = Reranker(SimpleNamespace(faiss=None), None if relevance else make_embedder(),
                  relevance)
    best = [float(rr.score(e.question, [Chunk(s.id, s.doc_id, s.text, s.title)
                                        for s in e.sources]).max())
            for e in tqdm(items, desc="evidence gate", mininterval=2)]
    return best, rr.weak_threshold, ("relevance classifier" if relevance
                                     else "bi-encoder cosine")


def gate_rates(scores, items, threshold: float) -> dict:
    """Shares of the gold-absent / gold-present prompts the gate answers itself (best passage
    score below `threshold`), and the median best score of each."""
    def part(absent: bool):
        return [sc for sc, e in zip(scores, items) if e.gold_absent == absent]

    def share(xs):
        return sum(x < threshold for x in xs) / len(xs) if xs else None

    def median(xs):
        return float(np.median(xs)) if xs else None

    return {"blocks_when_absent": share(part(True)), "blocks_when_present": share(part(False)),
            "median_score_absent": median(part(True)),
            "median_score_present": median(part(False))}


def evaluate_gate(items: list, gate: str) -> tuple[list[float], list[bool], dict]:
    """`gate` ("cosine" or a relevance classifier's folder) on every prompt: best scores,
    blocked flags and the summary kept as the result's "gate" (overall and per source)."""
    relevance = None if gate == "cosine" else gate
    scores, threshold, kind = gate_scores(items, relevance)

    def of_source(src: str) -> dict:
        sel = [(sc, e) for sc, e in zip(scores, items) if e.source == src]
        return gate_rates([sc for sc, _ in sel], [e for _, e in sel], threshold) if sel else {}

    return scores, [sc < threshold for sc in scores], {
        "scorer": kind, "model": relevance, "threshold": threshold,
        **gate_rates(scores, items, threshold),
        "by_source": {src: of_source(src) for src in ("pubmedqa", "medquad")}}


def eval_grounding(refs: list[str], cfg, n: int = 80, max_new_tokens: int = 0,
                   batch_size: int = 8, split: str = "eval", n_sources: int = 0,
                   seed: int = 0, gate: str | None = None, gate_only: bool = False) -> dict:
    """`gate`: None (the generator alone), "cosine" or a relevance classifier's folder (the
    answers the app would serve behind its weak-evidence gate). `gate_only`: score the gate
    alone on the prompts (rendered with the base tokenizer), no generator runs."""
    from rag_app.config import GenerationConfig
    from rag_app.pipeline import WEAK_EVIDENCE_TEXT

    from .instruct import prompt_fingerprint
    from .tasks import generate_texts, models_to_compare, split_fields

    if gate_only and not gate:
        raise ValueError("gate_only needs a gate: 'cosine' or a relevance classifier")
    max_new_tokens = max_new_tokens or GenerationConfig().max_new_tokens
    out: dict = {"dataset": f"RAFT prompts, PubMedQA + MedQuAD "
                            f"{'held-out' if split == 'eval' else 'validation'}, half without "
                            f"the gold passage",
                 **split_fields(split, SPLIT_FILES), "max_new_tokens": max_new_tokens,
                 "seed": seed, "prompt": prompt_fingerprint(), "models": {}}
    if gate_only:
        from transformers import AutoTokenizer

        from rag_app.generate import ensure_base_checkpoint

        items = grounding_items(cfg, AutoTokenizer.from_pretrained(ensure_base_checkpoint()),
                                n, split, n_sources, seed)
        out["n"], out["n_sources"] = len(items), len(items[0].sources)
        out["gate"] = evaluate_gate(items, gate)[2]
        print_grounding(out)
        return out
    scores: list[float] = []
    for label, name, model, tok in models_to_compare(refs):
        items = grounding_items(cfg, tok, n, split, n_sources, seed)
        if gate and not scores:  # the passages do not depend on the model: score them once
            scores, blocked, out["gate"] = evaluate_gate(items, gate)
        run = [i for i in range(len(items)) if not (gate and blocked[i])]
        texts = generate_texts(model, tok, [items[i].prompt for i in run], max_new_tokens,
                               batch_size, desc=label)
        answers = [WEAK_EVIDENCE_TEXT] * len(items)
        for i, t in zip(run, texts):
            answers[i] = t
        m = grounding_metrics(answers, items) | {"model": name, "by_source": {
            src: grounding_metrics([a for a, e in zip(answers, items) if e.source == src],
                                   [e for e in items if e.source == src])
            for src in ("pubmedqa", "medquad")}}
        m["rows"] = [{"id": e.qid, "source": e.source, "gold_numbers": e.gold_numbers,
                      "n_sources": len(e.sources), "answer": a}
                     | ({"gate_score": scores[i], "gated": blocked[i]} if gate else {})
                     for i, (e, a) in enumerate(zip(items, answers))]
        out["models"][label] = m
        out["n"], out["n_sources"] = len(items), len(items[0].sources)
    print_grounding(out)
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_grounding(res: dict) -> None:
    gen = f", up to {res['max_new_tokens']} new tokens, greedy" if res["models"] else ""
    print(f"{res.get('n')} {res['dataset']} ({res['split']} split; {res.get('n_sources')} "
          f"passages per prompt{gen})")
    if res["models"]:
        print(f"{'model':22s} {'source':9s} {'says so|absent':>14s} {'refuses|present':>15s} "
              f"{'cite valid':>10s} {'cites|answers':>13s} {'cites gold':>10s} {'words':>6s}")
    for label, m in res["models"].items():
        for src, mm in [("all", m)] + list(m["by_source"].items()):
            print(f"{label:22s} {src:9s} " + " ".join(
                f"{_fmt(mm[k]):>{w}s}" for k, w in zip(RATES, (14, 15, 10, 13, 10)))
                + f" {mm['mean_words']:6.1f}")
    if g := res.get("gate"):
        print(f"{'served behind' if res['models'] else 'gate only:'} the app's weak-evidence "
              f"gate ({g['scorer']}{' ' + g['model'] if g['model'] else ''}, best passage "
              f"score < {g['threshold']}): " + "; ".join(
                  f"{src} blocks {_fmt(x['blocks_when_absent'])} absent / "
                  f"{_fmt(x['blocks_when_present'])} present (median best score "
                  f"{_fmt(x['median_score_absent'])} / {_fmt(x['median_score_present'])})"
                  for src, x in [("all", g)] + list(g["by_source"].items()) if x))
    print("says so|absent: gold-absent prompts answered 'the sources do not answer' (target "
          ">= 0.95); refuses|present: gold-present prompts refused all the same; cite valid: "
          "answers citing only given sources (raw text); cites|answers, cites gold: of the "
          "gold-present answers that do not refuse, the share citing any source / a gold one")


def plot_grounding(result: dict, path: str) -> None:
    from rag_app.ui_admin import grouped_bars

    series = {label: {k: m[k] for k in RATES} for label, m in result["models"].items()}
    keys = list(RATES)
    if not series:  # gate only
        keys = ["blocks_when_absent", "blocks_when_present"]
        series = {src: {k: g[k] for k in keys} for src, g in
                  [("all", result["gate"])] + list(result["gate"]["by_source"].items()) if g}
    gated = "" if not result.get("gate") else (", served behind the gate" if result["models"]
                                                else ", the gate alone")
    fig = grouped_bars(series, keys, f"grounding, {result['split']} split (n={result['n']}, "
                       f"{result.get('n_sources')} passages{gated})", figsize=(9, 3.6),
                       fontsize=7)
    fig.savefig(path, dpi=100)
