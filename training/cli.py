"""`rag train ...` and the training-side `rag eval ...` commands, plugged into rag_app.cli.

    rag train relevance|retriever|synthetic-queries|instruct|summarize|qa|pretrain|vocab|
              synthetic-prefs|reward|dpo|ppo
        --recipe training/recipes/X.yaml
        [--set key=value ...] [--max-steps N] [--base-model M] [--name NAME]
        [--output DIR] [--progress-file F] [--resume] [--activate]
    rag eval relevance --model tuned|NAME|PATH [--recipe R] [--out results/X.json]
    rag eval ranking --index eval --model tuned|NAME|PATH [--model ...] [--limit N]
        [--candidates 50] [--out results/X.json]
    rag eval lm --model base|NAME|PATH --text domain-heldout|domain-val|general|PATH [--limit N]
        [--block-size 256] [--out results/X.json]
    rag eval reward --model NAME|reward [--model ...] [--pairs 300] [--out results/X.json]
    rag eval policy --model base|tuned|NAME [--model ...] [--reward NAME] [--n 24]
        [--out results/X.json]
    rag eval summarize --model base --model NAME [--limit N] [--max-new-tokens 48] [--num-beams N]
        [--length-penalty L] [--mbr] [--out results/X.json]
    rag eval qa-gold --model base --model NAME [--limit N] [--max-new-tokens 96]
        [--out results/X.json]
    rag eval grounding --model base --model NAME [--split val] [--n 80] [--n-sources K]
        [--gate cosine|REF [--gate-only]] [--out results/X.json]
    rag eval decision-probe --model base [--model HF_ID|PATH] [--folds 5] [--layers 8,15]
        [--out results/X.json]
"""
from __future__ import annotations

import json
import time
from pathlib import Path

TRAIN_TYPES = ("relevance", "retriever", "synthetic-queries", "instruct", "summarize", "qa",
               "pretrain", "vocab", "synthetic-prefs", "reward", "dpo", "ppo")
DEFAULT_RECIPES = {"relevance": "relevance.yaml", "retriever": "retriever.yaml",
                   "synthetic-queries": "synthetic.yaml", "instruct": "instruct.yaml",
                   "summarize": "summarize.yaml", "qa": "qa.yaml",
                   "pretrain": "pretrain.yaml", "vocab": "vocab.yaml", "reward": "reward.yaml",
                   "synthetic-prefs": "synthetic-prefs.yaml", "dpo": "dpo.yaml",
                   "ppo": "ppo.yaml"}


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model (see training/recipes/)")
    tsub = p.add_subparsers(dest="kind", required=True)
    for kind in TRAIN_TYPES:
        t = tsub.add_parser(kind, help=f"train: {kind}")
        t.add_argument("--recipe", help=f"YAML recipe (default training/recipes/"
                       f"{DEFAULT_RECIPES[kind]})")
        t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key (repeatable)")
        t.add_argument("--max-steps", type=int)
        t.add_argument("--base-model", help="default | HF id | local path")
        t.add_argument("--name", help="registry name (default <type>-<timestamp>)")
        t.add_argument("--output", help="run folder (checkpoints, manifest); default runs/...")
        t.add_argument("--progress-file", help="append JSON-lines progress events here")
        t.add_argument("--resume", action="store_true",
                       help="continue from the last checkpoint in --output")
        t.add_argument("--activate", action="store_true",
                       help="make the trained model the active one of its kind")


def add_eval_parsers(esub) -> None:
    r = esub.add_parser("relevance", help="held-out relevance classification P/R/F1")
    r.add_argument("--model", action="append", default=[],
                   help="tuned | registered name | path (repeatable; NAME=REF to label)")
    _recipe_args(r, "relevance.yaml", "data settings (queries, seed)")
    k = esub.add_parser("ranking", help="nDCG@10/MRR@10/Recall@10: hybrid vs + reranker")
    k.add_argument("--index", default="default")
    k.add_argument("--model", action="append", default=[],
                   help="tuned | registered name | path (repeatable; NAME=REF to label)")
    k.add_argument("--datasets", default="medquad-test,pubmedqa-heldout")
    k.add_argument("--limit", type=int, default=50, help="queries per dataset")
    k.add_argument("--candidates", type=int, default=50)
    k.add_argument("--no-cosine", action="store_true", help="skip the bi-encoder rerank row")
    k.add_argument("--build-index", action="store_true",
                   help="first (re)build --index from the evaluation corpus: every passage of 40 "
                        "held-out MedQuAD titles and of the PubMedQA held-out fold, plus "
                        "distractors (training.data.eval_corpus; ~2k chunks)")
    k.add_argument("--embedder", default="default",
                   help="with --build-index: the embedder (default | tuned | registered "
                        "name | path); queries then use the index's embedder")
    k.add_argument("--weights", default="",
                   help="classifier shares to fuse with the hybrid scores, e.g. 0.3,0.5,1 "
                        "(one row each, one scoring pass; default: the serving weight)")
    k.add_argument("--out", help="write JSON here (+ a .png plot)")
    m = esub.add_parser("lm", help="language-model perplexity on held-out domain / general text")
    m.add_argument("--model", action="append", default=[],
                   help="base | minilm | tuned | registered name | path (repeatable; "
                   "NAME=REF to label)")
    m.add_argument("--text", default="domain-heldout",
                   help="domain-heldout | domain-val (the train side's validation slice, for "
                        "choosing hyper-parameters) | general | PATH (.txt or .jsonl)")
    m.add_argument("--limit", type=int, default=32, help="blocks (0 = all)")
    m.add_argument("--chars", type=int, default=0,
                   help="instead of --limit blocks: the first N characters of --text, all "
                        "scored, so models with different tokenizers see the same text")
    m.add_argument("--doc-chars", type=int, default=0,
                   help="with or without --chars: only the first N characters of every "
                        "document, so the sample spans all documents (the leading ones of "
                        "domain-val are mostly MedQuAD)")
    m.add_argument("--shuffle-docs", type=int, default=None, metavar="SEED",
                   help="take the documents in a random order (this seed) before --chars: "
                        "a random sample of whole documents within the budget")
    m.add_argument("--block-size", type=int, default=256)
    m.add_argument("--batch-size", type=int, default=4)
    m.add_argument("--objective", default="auto", choices=["auto", "clm", "mlm"])
    m.add_argument("--split-seed", type=int, default=0, help="as the pretrain run's split_seed")
    m.add_argument("--heldout-fraction", type=float, default=0.05)
    m.add_argument("--rare-terms", type=int, default=200,
                   help="causal LMs on domain text: next-token accuracy on the N most frequent "
                        "rare domain terms (0 = skip)")
    m.add_argument("--out", help="write JSON here (+ a .png plot)")
    w = esub.add_parser("reward", help="reward models: held-out pairwise accuracy per origin")
    w.add_argument("--model", action="append", default=[],
                   help="reward (the active one) | untrained | registered name | path "
                        "(repeatable; NAME=REF to label)")
    w.add_argument("--pairs", type=int, default=300, help="data-derived pairs per split")
    w.add_argument("--out", help="write JSON here (+ a .png plot)")
    o = esub.add_parser("policy", help="generators as policies: reward, rubric, win rate, KL")
    o.add_argument("--model", action="append", default=[],
                   help="base | tuned | registered name | path; the FIRST is the reference "
                        "for win rates (repeatable; NAME=REF to label)")
    o.add_argument("--reward", default="reward", help="reward model (default: the active one)")
    o.add_argument("--n", type=int, default=24, help="held-out prompts (eval split)")
    o.add_argument("--max-new-tokens", type=int, default=64)
    o.add_argument("--out", help="write JSON here (+ a .png plot)")
    cw = esub.add_parser("choose-weight", help="apply the rerank-weight rule to `rag eval "
                         "ranking --weights` results on the validation sets")
    cw.add_argument("results", nargs="+", help="JSON files written by rag eval ranking --out")
    cw.add_argument("--max-drop", type=float, default=0.01,
                    help="largest nDCG@10 drop below the hybrid order allowed on any set")
    cw.add_argument("--out", help="write JSON here")
    c = esub.add_parser("curves", help="training-loss curves of registered runs on one plot "
                        "(e.g. random vs curriculum sampling)")
    c.add_argument("--model", action="append", default=[],
                   help="registered run name (repeatable; NAME=REF to label)")
    c.add_argument("--out", help="write JSON here (+ a .png plot)")
    g = esub.add_parser("grounding", help="generators: held-out RAFT prompts, half without the "
                        "gold passage: says so when the evidence is absent, over-refusal when "
                        "present, citation validity, cites the gold")
    g.add_argument("--model", action="append", default=[],
                   help="base | tuned | registered name | path (repeatable; NAME=REF to label)")
    g.add_argument("--n", type=int, default=80, help="prompts (half PubMedQA, half MedQuAD)")
    g.add_argument("--n-sources", type=int, default=0,
                   help="passages per prompt (0 = the app's top_k)")
    g.add_argument("--max-new-tokens", type=int, default=0, help="0 = the app's limit")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--split", choices=("val", "eval"), default="eval",
                   help="eval = held-out (report); val = validation slice (choose settings)")
    g.add_argument("--gate", help="score what the app serves: its weak-evidence gate first, "
                   "by the bi-encoder cosine ('cosine', the app without a classifier) or a "
                   "relevance classifier (tuned | registered name | path)")
    g.add_argument("--gate-only", action="store_true",
                   help="score the --gate alone on the prompts (block rates), no generator")
    _recipe_args(g, "instruct.yaml", "gold count per prompt from here")
    d = esub.add_parser("decision-probe", help="pretrained generators: cross-validated "
                        "linear probes of PubMedQA's yes/no/maybe on the training side (is "
                        "the decision signal there to learn?)")
    d.add_argument("--model", action="append", default=[],
                   help="base | Hugging Face id | path, not a model tuned here (repeatable; "
                        "NAME=REF to label); none: the text-only probe alone")
    d.add_argument("--folds", type=int, default=5)
    d.add_argument("--layers", default="",
                   help="comma-separated layer numbers (default: a quarter, half, three "
                        "quarters and all of the model's depth)")
    d.add_argument("--limit", type=int, default=0, help="first N training-side rows (0 = all)")
    d.add_argument("--C", type=float, default=1.0,
                   help="inverse L2 strength of every probe (scikit-learn's C; fixed, not tuned)")
    _recipe_args(d, "qa.yaml", "split and prompt settings")
    for what, recipe, tokens, about in (
            ("summarize", "summarize.yaml", 48,
             "generators: ROUGE-1/2/L of greedy summaries of the held-out MeQSum questions"),
            ("qa-gold", "qa.yaml", 96, "generators: held-out PubMedQA with the gold abstracts "
             "(no retrieval): decision accuracy vs the majority class, ROUGE-L"),
            ("robustness", "instruct.yaml", 16, "generators: held-out PubMedQA decision "
             "accuracy under the serving instruction and 5 phrasings unseen in training "
             "(prompts as the instruct recipe renders them)")):
        s = esub.add_parser(what, help=about)
        s.add_argument("--model", action="append", default=[],
                       help="base | tuned | registered name | path (repeatable; NAME=REF to "
                            "label)")
        s.add_argument("--limit", type=int, default=0, help="first N held-out rows (0 = all)")
        s.add_argument("--max-new-tokens", type=int, default=tokens)
        s.add_argument("--batch-size", type=int, default=8)
        _recipe_args(s, recipe, "prompt settings taken from this recipe")
        s.add_argument("--split", choices=("val", "eval"), default="eval",
                       help="eval = the held-out fold (report); val = the training side's "
                            "validation slice (choose settings here)")
        if what == "robustness":
            s.add_argument("--calibrate", nargs="?", const="content-free",
                           choices=("content-free", "relative", "matched"),
                           help="offset the first token's Yes/No logits under each phrasing "
                                "(no labels used) by a content-free prompt's yes-vs-no "
                                "log-odds (contextual calibration): to 0 (content-free, the "
                                "default) or to the serving instruction's (relative); or so "
                                "that each phrasing says Yes to as many unlabelled "
                                "training-side questions as the serving one (matched)")
            s.add_argument("--pool", type=int, default=60,
                           help="--calibrate matched: how many training-side questions "
                                "(unlabelled) to match the phrasings on")
        if what == "summarize":
            s.add_argument("--num-beams", type=int, default=1,
                           help="1 = greedy; more = beam search with that many beams")
            s.add_argument("--length-penalty", type=float, default=1.0,
                           help="beam search only: finished beams are ranked by "
                                "log-probability / length ** this (higher favours longer "
                                "summaries; 1 = transformers' default)")
            s.add_argument("--mbr", action="store_true",
                           help="beam search only: keep the consensus beam (highest mean ROUGE "
                                "against the other finished beams: minimum Bayes risk) instead "
                                "of the most probable")


def resolve_model(ref: str, kind: str = "relevance") -> str:
    from rag_app.models import ModelRegistry

    reg = ModelRegistry()
    if ref in ("tuned", "active"):
        entry = reg.active(kind)
        if entry is None:
            raise ValueError(f"no active {kind} model: train one with `rag train "
                             f"{'relevance' if kind == 'relevance' else 'retriever'} "
                             "--activate`, or pass a registered name or a path")
        return entry["path"]
    if Path(ref).is_dir():
        return ref
    return reg.get(ref)["path"]


def _labelled(refs: list[str], kind: str = "relevance") -> dict[str, str]:
    out = {}
    for ref in refs:
        label, _, r = ref.partition("=") if "=" in ref else (ref, "", ref)
        out[label] = resolve_model(r, kind)
    return out


def _train_config(args, cls):
    from .common import load_config

    recipe = args.recipe or DEFAULT_RECIPES[args.kind]
    return load_config(cls, recipe, args.set, max_steps=args.max_steps,
                       base_model=args.base_model, name=args.name)


def run_train(args) -> int:
    t = time.time()
    if args.kind == "relevance":
        from .relevance import RelevanceConfig, run
    elif args.kind == "retriever":
        from .retriever import RetrieverConfig as RelevanceConfig, run  # noqa: N814
    elif args.kind == "synthetic-queries":
        from .synthetic import SyntheticConfig as RelevanceConfig, run  # noqa: N814
    elif args.kind == "instruct":
        from .instruct import InstructConfig as RelevanceConfig, run  # noqa: N814
    elif args.kind == "summarize":
        from .summarize import SummarizeConfig as RelevanceConfig, run  # noqa: N814
    elif args.kind == "qa":
        from .qa import QAConfig as RelevanceConfig, run  # noqa: N814
    elif args.kind == "pretrain":
        from .pretrain import PretrainConfig as RelevanceConfig, run  # noqa: N814
    elif args.kind == "vocab":
        from .vocab import VocabConfig as RelevanceConfig, run  # noqa: N814
    elif args.kind == "reward":
        from .reward import RewardConfig as RelevanceConfig, run  # noqa: N814
    elif args.kind == "dpo":
        from .dpo import DPOConfig as RelevanceConfig, run  # noqa: N814
    elif args.kind == "ppo":
        from .ppo import PPOConfig as RelevanceConfig, run  # noqa: N814
    elif args.kind == "synthetic-prefs":
        from .synthetic_prefs import SyntheticPrefsConfig as RelevanceConfig, run  # noqa: N814
    else:
        raise ValueError(f"unknown training type {args.kind!r}: choose one of {TRAIN_TYPES}")
    cfg = _train_config(args, RelevanceConfig)
    res = run(cfg, output=args.output, progress_file=args.progress_file, resume=args.resume,
              activate=args.activate)
    m = res["manifest"]
    print(json.dumps({"metrics_before": _brief(m.get("metrics_before", {})),
                      "metrics_after": _brief(m.get("metrics_after", {}))}, indent=2))
    entry = res.get("entry")
    if entry:
        print(f"registered {entry['kind']} model {entry['name']} -> {entry['path']}"
              f"{' (active)' if args.activate else ' (not active: use --activate)'}")
    print(f"run folder {res['run_dir']}  wall {time.time() - t:.0f}s")
    return 0


def _brief(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("train_loss_log",)}


def print_classification(res: dict) -> None:
    print(f"{'system':28s} {'prec':>6s} {'recall':>6s} {'F1':>6s} {'AUC':>6s} {'thresh':>7s}"
          f"   F1@0.5")
    for name, m in res.items():
        if name.startswith("_"):
            continue
        print(f"{name:28s} {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} "
              f"{m['auc']:6.3f} {m['threshold']:7.3f}   {m['at_0.5']['f1']:.3f}")
    print("called relevant at the chosen threshold, by pair kind (positives: recall; "
          "the rest: false-positive rate):")
    for name, m in res.items():
        if not name.startswith("_") and m.get("by_kind"):
            print(f"  {name:26s} " + "  ".join(f"{k} {v['called_relevant']:.3f} (n={v['n']})"
                                              for k, v in sorted(m["by_kind"].items())))
    print("validation pairs (where the threshold and the settings are chosen):")
    for name, m in res.items():
        if not name.startswith("_") and m.get("val"):
            v = m["val"]
            print(f"  {name:26s} P {v['precision']:.3f}  R {v['recall']:.3f}  F1 {v['f1']:.3f}"
                  f"  AUC {v['auc']:.3f}")
    print("counts:", res.get("_counts"))


def print_ranking(res: dict) -> None:
    for d, r in res["datasets"].items():
        print(f"{d}: {r['queries']} queries, hybrid top-{res['candidates']} from index "
              f"{res['index']} ({res['n_chunks']} chunks)")
        print(f"  {'system':36s} {'nDCG@10':>8s} {'MRR@10':>8s} {'R@10':>8s} {'ms/q':>8s}")
        for name, m in r["systems"].items():
            print(f"  {name:36s} {m['ndcg@10']:8.4f} {m['mrr@10']:8.4f} {m['recall@10']:8.4f} "
                  f"{m.get('rerank_ms_per_query', 0):8.0f}")


def build_eval_index(name: str, embedder: str = "default") -> None:
    """indexes/NAME from the evaluation corpus (runs/eval_corpus.jsonl), embedded with
    `embedder` ("tuned" = the active embedder)."""
    from rag_app.index import index_path
    from rag_app.pipeline import build_index

    from .data import eval_corpus, write_jsonl

    if name == "default":
        raise ValueError("--build-index rebuilds --index from the evaluation corpus: name "
                         "another index (e.g. --index eval), not the app's default")
    if embedder != "default":
        embedder = resolve_model(embedder, "embedder")
    index_path(name)  # validates the name before any work
    corpus = write_jsonl(eval_corpus(), Path("runs") / "eval_corpus.jsonl")
    index, _ = build_index(name, [str(corpus)], embedder=embedder)
    print(f"built index {name}: {len(index)} chunks from {corpus} ({embedder})")


def _recipe_args(p, recipe: str, about: str) -> None:
    """--recipe (default `recipe`), --set KEY=VALUE overrides and --out of an evaluation."""
    p.add_argument("--recipe", default=recipe, help=about)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="write JSON here (+ a .png plot)")


def _save(out: str | None, result: dict, plot) -> None:
    if not out:
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2, default=str))
    plot(result, str(Path(out).with_suffix(".png")))
    print(f"saved {out} and {Path(out).with_suffix('.png')}")


# generator evaluations over held-out rows: what -> (module, config class, eval, plot)
GENERATOR_EVALS = {
    "summarize": ("summarize", "SummarizeConfig", "eval_summarize", "plot_summarize"),
    "qa-gold": ("qa", "QAConfig", "eval_qa_gold", "plot_qa_gold"),
    "robustness": ("robustness", "InstructConfig", "eval_robustness", "plot_robustness"),
}


def run_eval(args) -> int:
    if args.what == "relevance":
        from rag_app.embed import SentenceTransformerEmbedder

        from .common import load_config
        from .relevance import (RelevanceConfig, build_pairs, classification_eval,
                                cosine_scores, cross_scores, load_cross_encoder,
                                plot_classification)
        from sentence_transformers import CrossEncoder

        cfg = load_config(RelevanceConfig, args.recipe, args.set)
        emb = SentenceTransformerEmbedder(cfg.mining_embedder)
        cache = Path("runs/.cache")
        val, _ = build_pairs(cfg, "val", cfg.n_val_queries, emb, cache)
        ev, _ = build_pairs(cfg, "eval", cfg.n_eval_queries, emb, cache)
        base = load_cross_encoder(cfg.base_model, cfg.max_length, cfg.seed)
        scorers = {"bi-encoder cosine": lambda r: cosine_scores(emb, r),
                   "pretrained-as-classifier": lambda r: cross_scores(base, r)}
        for label, path in _labelled(args.model).items():
            m = CrossEncoder(path, device="cpu")
            scorers[label] = lambda r, m=m: cross_scores(m, r)
        res = classification_eval(scorers, val, ev)
        print_classification(res)
        _save(args.out, res, plot_classification)
        return 0
    if args.what == "ranking":
        from .relevance import plot_ranking, ranking_eval

        rr: dict = {} if args.no_cosine else {"hybrid + bi-encoder rerank": None}
        rr |= {f"hybrid + {k}": v for k, v in _labelled(args.model).items()}
        if args.build_index:
            build_eval_index(args.index, args.embedder)
        weights = tuple(float(w) for w in args.weights.split(",") if w.strip())
        res = ranking_eval(args.index, rr, tuple(d.strip() for d in args.datasets.split(",")),
                           args.limit, args.candidates, weights or None)
        print_ranking(res)
        _save(args.out, res, plot_ranking)
        return 0
    if args.what == "reward":
        from .rlhf_eval import eval_reward, plot_reward_eval

        _save(args.out, eval_reward(args.model or ["reward"], args.pairs), plot_reward_eval)
        return 0
    if args.what == "policy":
        from .rlhf_eval import eval_policy, plot_policy

        _save(args.out, eval_policy(args.model or ["base", "tuned"], args.reward, args.n,
                                   max_new_tokens=args.max_new_tokens), plot_policy)
        return 0
    if args.what in GENERATOR_EVALS:
        import importlib

        from .common import load_config

        mod = importlib.import_module(f"training.{GENERATOR_EVALS[args.what][0]}")
        cls, fn, plot = (getattr(mod, n) for n in GENERATOR_EVALS[args.what][1:])
        cfg = load_config(cls, args.recipe, args.set)
        extra = {"num_beams": args.num_beams, "length_penalty": args.length_penalty,
                 "mbr": args.mbr} if args.what == "summarize" else {}
        if args.what == "robustness":
            extra = {"calibrate": args.calibrate, "pool_size": args.pool}
        _save(args.out, fn(args.model or ["base", "tuned"], cfg, args.limit,
                           args.max_new_tokens, args.batch_size, split=args.split, **extra),
              plot)
        return 0
    if args.what == "grounding":
        from .common import load_config
        from .grounding import eval_grounding, plot_grounding
        from .instruct import InstructConfig

        gate = args.gate if args.gate in (None, "cosine") else resolve_model(args.gate)
        _save(args.out, eval_grounding(args.model or ["base", "tuned"],
                                       load_config(InstructConfig, args.recipe, args.set),
                                       args.n, args.max_new_tokens, args.batch_size,
                                       args.split, args.n_sources, args.seed,
                                       gate, args.gate_only), plot_grounding)
        return 0
    if args.what == "decision-probe":
        from .common import load_config
        from .decision_probe import eval_decision_probe, plot_probe
        from .qa import QAConfig

        layers = [int(x) for x in args.layers.split(",") if x.strip()] or None
        _save(args.out, eval_decision_probe(args.model, load_config(QAConfig, args.recipe,
                                                                    args.set),
                                            args.limit, args.folds, layers, args.C),
              plot_probe)
        return 0
    if args.what == "choose-weight":
        from .relevance import choose_weight, print_weight_choice

        res = choose_weight([json.loads(Path(f).read_text()) for f in args.results],
                            args.max_drop)
        print_weight_choice(res)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
        return 0
    if args.what == "curves":
        from .robustness import plot_curves, run_curves

        _save(args.out, run_curves(args.model), plot_curves)
        return 0
    if args.what == "lm":
        from .lm_eval import run_eval_lm

        run_eval_lm(args)
        return 0
    raise ValueError(f"unknown evaluation {args.what!r}")
