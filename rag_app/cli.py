"""`rag` console script: index | ask | eval | model (| train)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_index_cmds(sub) -> None:
    p = sub.add_parser("index", help="build, extend and inspect indexes")
    isub = p.add_subparsers(dest="action", required=True)
    b = isub.add_parser("build", help="build indexes/NAME from files (default: medical corpus)")
    b.add_argument("--name", default="default")
    b.add_argument("--source", nargs="+", help="files or folders: jsonl (text, id, title), "
                   "txt, md, html, pdf. Without it: MedQuAD + PubMedQA from ../shared/data")
    b.add_argument("--type", default="flat", choices=["flat", "hnsw", "ivf"])
    b.add_argument("--embedder", default="default",
                   help="sentence-transformers id or path (default: packaged MiniLM)")
    b.add_argument("--backend", default="torch", choices=["torch", "openvino"],
                   help="embedding backend; queries use the same one")
    b.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8", "auto"],
                   help="openvino precision (auto: bf16/int8 where the CPU has them)")
    b.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk")
    b.add_argument("--chunk-overlap", type=int, default=32)
    a = isub.add_parser("add", help="append documents to an existing index")
    a.add_argument("--name", default="default")
    a.add_argument("--source", nargs="+", required=True)
    i = isub.add_parser("info", help="print an index's meta.json")
    i.add_argument("--name", default="default")
    isub.add_parser("list", help="list the built indexes")


def _add_ask(sub) -> None:
    p = sub.add_parser("ask", help="answer a question (or a batch) from the index")
    p.add_argument("question", nargs="?")
    p.add_argument("--index", default="default")
    p.add_argument("--model", default="base", help="base | tuned | registered name | path | "
                   "Hugging Face id")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--mode", default="hybrid", choices=["hybrid", "dense", "bm25"])
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--questions", help="jsonl of {id, question}: batch mode")
    p.add_argument("--out", help="batch output jsonl (with --questions)")
    p.add_argument("--compare", action="store_true", help="retrieve once, answer with the base "
                   "model and the tuned one (--model, default: the active generator)")


def _add_model(sub) -> None:
    p = sub.add_parser("model", help="list, activate, roll back, merge and soup registered "
                       "models")
    msub = p.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="list the registered models (* = active)")
    a = msub.add_parser("activate", help="make NAME the active model of its kind")
    a.add_argument("name")
    r = msub.add_parser("rollback", help="re-activate the previous model of KIND")
    from .models import KINDS

    r.add_argument("kind", choices=list(KINDS))
    m = msub.add_parser("merge", help="merge a LoRA generator into a standalone checkpoint")
    m.add_argument("name", help="registered adapter name, or tuned (the active generator)")
    m.add_argument("--out", help="output folder (default <models_dir>/generator/NAME-merged)")
    m.add_argument("--register", dest="new_name", help="registry name (default NAME-merged)")
    m.add_argument("--activate", action="store_true", help="make the merged model active")
    s = msub.add_parser("soup", help="average LoRA generators of one base in weight space")
    s.add_argument("names", nargs="+", help="two or more registered adapter names")
    s.add_argument("--register", dest="new_name", required=True, help="registry name of the soup")
    s.add_argument("--weights", help="comma-separated, one per model, summing to 1 "
                   "(default: equal)")
    s.add_argument("--out", help="output folder (default <models_dir>/generator/NAME)")
    s.add_argument("--activate", action="store_true", help="make the soup the active model")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate retrieval and QA")
    esub = p.add_subparsers(dest="what", required=True)
    r = esub.add_parser("retrieval", help="Recall@1/5/10/100, MRR@10, nDCG@10")
    r.add_argument("--dataset", default="pubmedqa-trainval",
                   help="pubmedqa-trainval | medquad-test (ignored with --queries); "
                   "medquad-dev (training side) for choosing settings")
    r.add_argument("--queries", help="jsonl {id, question}")
    r.add_argument("--qrels", help="tsv query_id<TAB>passage_id[<TAB>grade]")
    r.add_argument("--index", default="default")
    r.add_argument("--modes", default="bm25,dense,hybrid")
    r.add_argument("--fusion", choices=["cc", "rrf"], default="cc",
                   help="hybrid fusion: cc = convex combination of min-max normalised scores "
                   "(the product's default), rrf = weighted reciprocal rank fusion")
    r.add_argument("--dense-weight", type=float, help="share of dense in the hybrid fusion "
                   "(default: the product's setting for that fusion)")
    r.add_argument("--limit", type=int, help="first N queries only")
    r.add_argument("--out", help="write the results as JSON here")
    q = esub.add_parser("qa", help="answer held-out questions and score the answers")
    q.add_argument("--dataset", default="pubmedqa-heldout",
                   choices=["pubmedqa-heldout", "medquad-test"])
    q.add_argument("--index", default="default")
    q.add_argument("--model", default="base")
    q.add_argument("--limit", type=int, default=30)
    q.add_argument("--max-new-tokens", type=int, default=128)
    q.add_argument("--out", help="write the results as JSON here")
    return esub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag", description="Medical QA from retrieved "
                                     "evidence: index documents, ask, evaluate.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_index_cmds(sub)
    _add_ask(sub)
    esub = _add_eval(sub)
    _add_model(sub)
    try:  # the fine-tuning side plugs its commands in (training/cli.py)
        from training.cli import add_eval_parsers, add_train_parser
    except ImportError:
        return parser
    add_train_parser(sub)
    add_eval_parsers(esub)
    return parser


def cmd_index(args) -> int:
    from .config import ChunkConfig
    from .index import ChunkIndex, index_path, list_indexes
    from .pipeline import add_to_index, build_index

    if args.action == "list":
        rows = list_indexes()
        if not rows:
            print("no indexes yet: `rag index build` builds the default medical one")
        for r in rows:
            print(f"{r['name']:20s} {r.get('n_chunks')!s:>8} chunks  {r.get('n_documents')!s:>7}"
                  f" docs  {r.get('index_type')}  {r.get('embedder')}  {r.get('created')}")
        return 0
    if args.action == "info":
        print(json.dumps(ChunkIndex.load(index_path(args.name)).meta, indent=2))
        return 0
    t = time.perf_counter()
    if args.action == "build":
        from .embed import make_embedder

        emb = make_embedder(args.embedder, args.backend, args.precision)
        index, rep = build_index(args.name, args.source, args.type, emb,
                                 ChunkConfig(args.chunk_size, args.chunk_overlap))
        added = len(index)
    else:
        index, rep, added = add_to_index(args.name, args.source)
    for where, why in rep.skipped:
        print(f"skipped {where}: {why}", file=sys.stderr)
    print(f"{args.action}: {args.name}: {added} chunks from {len(rep.documents)} documents "
          f"({len(rep.skipped)} skipped) in {time.perf_counter() - t:.1f}s -> {index.path}")
    return 0


def _pipeline(args):
    from .config import GenerationConfig, RetrievalConfig
    from .pipeline import RagPipeline

    return RagPipeline(args.index, args.model, RetrievalConfig(mode=args.mode, top_k=args.top_k),
                       GenerationConfig(max_new_tokens=args.max_new_tokens))


def _print_answer(ans) -> None:
    print(ans.text)
    print()
    for s in ans.sources:
        mark = "*" if s.id in ans.citations else " "
        print(f"{mark}[{s.number}] {s.title} ({s.id}, score {s.score:.3f})")
    print(f"\nmodel: {ans.model}   " + "  ".join(f"{k} {v:.0f} ms"
                                                for k, v in ans.timings_ms.items()))
    print("Not medical advice: for decisions about your health, consult a clinician.")


def _final(answers):
    """The last (final) Answer of a RagPipeline.stream()."""
    final = None
    for final in answers:
        pass
    return final


def ask_compare(args) -> int:
    """Retrieve once; answer with the base model and the tuned one on the same sources."""
    from .config import GenerationConfig, RetrievalConfig
    from .pipeline import RagPipeline

    tuned_ref = "tuned" if args.model in ("base", "default") else args.model
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    ret = RetrievalConfig(mode=args.mode, top_k=args.top_k)
    base = RagPipeline(args.index, "base", ret, gen)
    tuned = RagPipeline(args.index, tuned_ref, ret, gen)
    _ = tuned.generator  # fails fast (no active tuned generator) before anything loads
    q = base.check_question(args.question)
    chunks = base.retrieve(q)
    tuned.share_retrieval_from(base)
    answers = {"base": _final(base.stream(q, chunks=chunks)),
               "tuned": _final(tuned.stream(q, chunks=chunks))}
    if args.json:
        print(json.dumps({"question": q, "sources": answers["base"].to_dict()["sources"]}
                         | {k: a.to_dict() for k, a in answers.items()}, ensure_ascii=False))
        return 0
    for label, ans in answers.items():
        print(f"=== {label}: {ans.model} ===")
        print(ans.text + "\n")
    for s in answers["base"].sources:
        cited = [label for label, a in answers.items() if s.id in a.citations]
        print(f"[{s.number}] {s.title} ({s.id}, score {s.score:.3f})"
              + (f"  cited by {', '.join(cited)}" if cited else ""))
    print("Not medical advice: for decisions about your health, consult a clinician.")
    return 0


def cmd_ask(args) -> int:
    if bool(args.questions) != bool(args.out):
        raise ValueError("--questions and --out go together (batch mode)")
    if not args.questions and args.question is None:
        raise ValueError("give a QUESTION, or --questions FILE --out FILE")
    if args.compare:
        if args.questions:
            raise ValueError("--compare answers one QUESTION: leave out --questions")
        return ask_compare(args)
    pipe = _pipeline(args)
    if not args.questions:
        ans = pipe.answer(args.question)
        if args.json:
            print(json.dumps(ans.to_dict(), ensure_ascii=False))
        else:
            _print_answer(ans)
        return 0
    from tqdm.auto import tqdm

    rows = [json.loads(line) for line in Path(args.questions).read_text().splitlines()
            if line.strip()]
    failed = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for i, row in enumerate(tqdm(rows, desc="answering", unit="q")):
            rid = row.get("id", i)
            try:
                out = {"id": rid} | pipe.answer(row.get("question", "")).to_dict()
            except ValueError as e:
                failed += 1
                out = {"id": rid, "question": row.get("question"), "error": str(e)}
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"answered {len(rows) - failed}/{len(rows)} -> {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .eval_cli import eval_qa, eval_retrieval

    if args.what == "retrieval":
        return eval_retrieval(args)
    if args.what == "qa":
        return eval_qa(args)
    from training.cli import run_eval

    return run_eval(args)


def cmd_model(args) -> int:
    from .models import ModelRegistry, merge_adapter, soup_adapters

    reg = ModelRegistry()
    if args.action == "list":
        rows = reg.list()
        if not rows:
            print("no registered models yet: `rag train ...` registers them (base is built in)")
        for e in rows:
            mark = "*" if (reg.active(e["kind"]) or {}).get("name") == e["name"] else " "
            print(f"{mark} {e['name']:28s} {e['kind']:10s} {e.get('training_type') or '-':10s} "
                  f"{e['created']}  {e['path']}")
        return 0
    if args.action == "activate":
        entry = reg.set_active(reg.get(args.name)["kind"], args.name)
        print(f"active {entry['kind']} model: {entry['name']}")
        return 0
    if args.action == "rollback":
        entry = reg.rollback(args.kind)
        now = entry["name"] if entry else "none (the built-in default is used)"
        print(f"active {args.kind} model: {now}")
        return 0
    t = time.perf_counter()
    if args.action == "soup":
        try:
            weights = [float(w) for w in args.weights.split(",")] if args.weights else None
        except ValueError as exc:
            raise ValueError(f"--weights={args.weights!r} is invalid: give numbers separated "
                             "by commas, e.g. 0.5,0.5") from exc
        entry = soup_adapters(args.names, args.new_name, weights, args.out, args.activate)
        print(f"souped {' + '.join(args.names)} (weights {entry['manifest']['weights']}) -> "
              f"generator {entry['name']} at {entry['path']} in {time.perf_counter() - t:.1f}s"
              f"{' (active)' if args.activate else ''}")
        return 0
    entry = merge_adapter(args.name, args.out, args.new_name, args.activate)
    print(f"merged {args.name} -> generator {entry['name']} at {entry['path']} in "
          f"{time.perf_counter() - t:.1f}s{' (active)' if args.activate else ''}")
    return 0


def cmd_train(args) -> int:
    from training.cli import run_train

    return run_train(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"index": cmd_index, "ask": cmd_ask, "eval": cmd_eval, "model": cmd_model,
                "train": cmd_train}[args.command](args)
    except ValueError as e:  # user input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was changed on disk", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
