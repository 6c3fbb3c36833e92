"""Logic of the Index, Fine-tune and Evaluate tabs (app.py wires it to components)."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pandas as pd

from .config import RetrievalConfig, indexes_dir
from .index import ChunkIndex, index_path, list_indexes
from .jobs import JobRunner, list_recipes
from .models import KINDS, ModelRegistry
from .pipeline import add_to_index, build_index

UPLOAD_TYPES = (".pdf", ".txt", ".md", ".html", ".jsonl")
MAX_UPLOAD_MB = 50
MAX_QA_EVAL = 200
EVAL_DATASETS = ("pubmedqa-trainval", "medquad-test")
EVAL_COLUMNS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


# ---------- Index tab ----------
def indexes_table(active: str) -> pd.DataFrame:
    rows = [{"active": "✔" if r["name"] == active else "", "name": r["name"],
             "chunks": r.get("n_chunks"), "documents": r.get("n_documents"),
             "embedder": r.get("embedder"), "type": r.get("index_type"),
             "built": r.get("created")} for r in list_indexes()]
    return pd.DataFrame(rows, columns=["active", "name", "chunks", "documents", "embedder",
                                       "type", "built"])


def ensure_index(name: str, progress=None) -> None:
    """The default medical index is built on first use (with progress); others must exist."""
    if (index_path(name) / "meta.json").exists():
        return
    if name != "default":
        raise ValueError(f"index {name!r} does not exist: create it in the Index tab or with "
                         f"`rag index build --name {name} --source FILES`")

    def callback(stage, done, total):
        if progress is not None:
            progress(done / max(total, 1), desc=f"First run: {stage} {done}/{total} chunks")

    build_index("default", progress=False, callback=callback)


def index_names() -> list[str]:
    return [r["name"] for r in list_indexes() if "error" not in r]


def safe_filename(name: str) -> str:
    """A plain file name: no folders, no leading dots, only [A-Za-z0-9._-]."""
    base = Path(str(name).replace("\\", "/")).name
    stem, suffix = Path(base).stem, Path(base).suffix.lower()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:80] or "document"
    return stem + re.sub(r"[^a-z0-9.]", "", suffix)


def check_uploads(files: list[str], max_mb: float = MAX_UPLOAD_MB) -> list[tuple[str, str]]:
    """[(path, safe name)] or ValueError naming every refused file and why."""
    if not files:
        raise ValueError("no file uploaded: choose pdf, txt, md, html or jsonl files")
    ok, refused, names = [], [], set()
    for f in files:
        p = Path(f)
        shown = safe_filename(p.name)
        if p.suffix.lower() not in UPLOAD_TYPES:
            refused.append(f"{shown}: type {p.suffix or '(none)'} is not accepted "
                           f"(use {', '.join(UPLOAD_TYPES)})")
        elif not p.is_file():
            refused.append(f"{shown}: the upload is missing")
        elif p.stat().st_size > max_mb * 2**20:
            refused.append(f"{shown}: {p.stat().st_size / 2**20:.1f} MB is over the "
                           f"{max_mb:g} MB limit per file")
        elif p.stat().st_size == 0:
            refused.append(f"{shown}: the file is empty")
        else:
            name = shown
            while name in names:  # two uploads with the same cleaned name
                name = f"{Path(name).stem}_{len(names)}{Path(name).suffix}"
            names.add(name)
            ok.append((str(p), name))
    if refused:
        raise ValueError("upload refused — " + "; ".join(refused))
    return ok


def uploads_dir(index: str) -> Path:
    """Uploaded files are kept (for rebuilds) beside the indexes, in a hidden folder."""
    index_path(index)  # validates the name
    return indexes_dir() / ".uploads" / index


def upload(files: list[str], index: str, max_mb: float = MAX_UPLOAD_MB,
           progress=None) -> str:
    """Copy the checked files under safe names, then build `index` or add to it."""
    index = (index or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", index):
        raise ValueError(f"index name {index!r} is invalid: use letters, digits, - and _")
    checked = check_uploads(files, max_mb)
    dest = uploads_dir(index) / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for src, name in checked:
        shutil.copyfile(src, dest / name)
        paths.append(str(dest / name))

    def callback(stage, done, total):
        if progress is not None:
            progress(done / max(total, 1), desc=f"{stage} {done}/{total} chunks")

    t = time.perf_counter()
    try:
        if (index_path(index) / "meta.json").exists():
            idx, rep, added = add_to_index(index, paths, progress=False, callback=callback)
            what = f"added {added} chunks to"
        else:
            idx, rep = build_index(index, paths, progress=False, callback=callback)
            what = f"built a new index with {len(idx)} chunks:"
    except ValueError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    skipped = "".join(f"\n- skipped {Path(w).name}: {why}" for w, why in rep.skipped)
    return (f"{what} **{index}** from {len(rep.documents)} documents in "
            f"{time.perf_counter() - t:.1f} s.{skipped}")


def rebuild(index: str, progress=None) -> str:
    """Rebuild an index from its recorded sources with the embedder and chunking it used."""
    from .config import ChunkConfig

    meta = ChunkIndex.load(index_path(index)).meta
    sources = [s for s in meta.get("sources", []) if s != "default-medical"]
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise ValueError(f"cannot rebuild {index}: its sources are gone ({', '.join(missing)})")

    def callback(stage, done, total):
        if progress is not None:
            progress(done / max(total, 1), desc=f"{stage} {done}/{total} chunks")

    t = time.perf_counter()
    idx, rep = build_index(index, sources or None, meta.get("index_type", "flat"),
                           meta["embedder"].get("ref", "default"),
                           ChunkConfig(**meta["chunking"]), progress=False, callback=callback)
    return f"rebuilt **{index}**: {len(idx)} chunks in {time.perf_counter() - t:.1f} s"


# ---------- Fine-tune tab ----------
def training_kinds(jobs: JobRunner) -> list[str]:
    return sorted(list_recipes(jobs.recipes_dir))


def recipes_for(jobs: JobRunner, kind: str) -> list[str]:
    return [Path(r).name for r in list_recipes(jobs.recipes_dir).get(kind, [])]


def start_job(jobs: JobRunner, kind: str, recipe: str, steps, lr, batch) -> str:
    if not kind or not recipe:
        raise ValueError("pick a training type and a recipe first")
    overrides = {"steps": int(steps or 0), "learning_rate": float(lr or 0),
                 "batch_size": int(batch or 0)}
    st = jobs.start(kind, recipe, overrides)
    return f"started job {st['id']} ({kind}, {Path(recipe).name}) → model **{st['name']}**"


def job_view(jobs: JobRunner) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """(status markdown, loss curve frame, before/after metrics frame) of the current job."""
    st = jobs.status()
    curve = pd.DataFrame(columns=["step", "loss"])
    if st is None:
        return "No training job yet.", curve, pd.DataFrame(columns=["metric", "value"])
    if st["curve"]:
        curve = pd.DataFrame(st["curve"], columns=["step", "loss"])
    lines = [f"**Job {st['id']}** · {st['kind']} · {Path(st['recipe']).name} · "
             f"status **{st['status']}** · model `{st['name']}`"]
    if st["total"]:
        pct = 100 * (st["step"] or 0) / st["total"]
        lines.append(f"step {st['step']}/{st['total']} ({pct:.0f}%)"
                     + (f" · loss {st['loss']:.4f}" if st["loss"] is not None else "")
                     + (f" · ETA {_fmt_s(st['eta_s'])}" if st["eta_s"] is not None else ""))
    if st["status"] == "done":
        lines.append("Finished: review the metrics, then **Promote** to use the model.")
    if st["status"] in ("error", "failed"):
        lines.append(f"Failed: {st['error'] or 'the trainer stopped without finishing'}")
        if st["log_tail"]:
            lines.append("```\n" + st["log_tail"][-800:].replace("```", "'''") + "\n```")
    return "\n\n".join(lines), curve, metrics_table(st["metrics"])


def _fmt_s(s) -> str:
    s = int(s or 0)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


BEFORE_PREFIXES = ("before_", "baseline_", "base_cosine_", "base_")


def metrics_table(metrics: dict) -> pd.DataFrame:
    """Before/after rows from {"before": {...}, "after": {...}}, or from flat metrics where
    before_X / baseline_X / base_X (the untuned model) pairs with X (the trained one)."""
    before, after = dict(metrics.get("before") or {}), dict(metrics.get("after") or {})
    for k, v in metrics.items():
        if isinstance(v, dict) or k in ("before", "after"):
            continue
        prefix = next((p for p in BEFORE_PREFIXES if k.startswith(p)), None)
        if prefix:
            before[k[len(prefix):]] = v
        else:
            after[k[6:] if k.startswith("after_") else k] = v
    rows = []
    for k in list(dict.fromkeys(list(after) + list(before))):
        b, a = before.get(k), after.get(k)
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append({"metric": k, "before": _num(b), "after": _num(a), "change": _num(delta)})
    return pd.DataFrame(rows, columns=["metric", "before", "after", "change"])


def _num(x):
    return round(float(x), 4) if isinstance(x, (int, float)) else x


def promote(jobs: JobRunner) -> str:
    st = jobs.status()
    if st is None or st["status"] != "done":
        raise ValueError("no finished training job to promote: wait for the job to finish")
    reg = ModelRegistry()
    out = Path(st["model_output"]).resolve()
    entry = next((e for e in reg.list() if Path(e["path"]).resolve() == out), None) \
        or reg.get(out.name)  # the registered folder, else its name
    entry = reg.set_active(entry["kind"], entry["name"])
    return f"promoted **{entry['name']}**: it is now the active {entry['kind']} model"


def rollback(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: choose one of {KINDS}")
    entry = ModelRegistry().rollback(kind)
    return (f"rolled back: active {kind} model is now **{entry['name']}**" if entry
            else f"rolled back: no {kind} model is active, the base one is used")


def models_table() -> pd.DataFrame:
    reg = ModelRegistry()
    active = {k: (reg.active(k) or {}).get("name") for k in KINDS}
    rows = [{"active": "✔" if active.get(e["kind"]) == e["name"] else "", "name": e["name"],
             "kind": e["kind"], "created": e["created"],
             "metrics": json.dumps(e.get("metrics") or {})[:120]} for e in reg.list()]
    return pd.DataFrame(rows, columns=["active", "name", "kind", "created", "metrics"])


# ---------- Evaluate tab ----------
def run_eval(state, dataset: str, limit, modes: list[str]) -> tuple[pd.DataFrame, dict]:
    """Retrieval metrics of the active index on a built-in dataset, saved to the history."""
    from .datasets import load_retrieval_dataset
    from .evaluate import retrieval_metrics, run_retrieval

    if dataset not in EVAL_DATASETS:
        raise ValueError(f"dataset={dataset!r} is invalid: choose one of {EVAL_DATASETS}")
    modes = [m for m in (modes or []) if m in ("bm25", "dense", "hybrid")]
    if not modes:
        raise ValueError("choose at least one retrieval mode (bm25, dense, hybrid)")
    limit = int(limit or 0)
    if not 1 <= limit <= 5000:
        raise ValueError(f"limit={limit} is invalid: use 1..5000 queries")
    ds = load_retrieval_dataset(dataset, limit)
    from .retrieve import Retriever

    # the app's loaded index and embedder, with this evaluation's candidate count
    retriever = Retriever(state.base.index, state.base.embedder, RetrievalConfig(candidates=200))
    t = time.perf_counter()
    result = {"dataset": dataset, "index": state.index_name, "queries": len(ds.queries),
              "modes": {}, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    for mode in modes:
        result["modes"][mode] = retrieval_metrics(run_retrieval(retriever, ds, mode),
                                                  ds.qrels)
    result["seconds"] = round(time.perf_counter() - t, 1)
    state.feedback.add_eval_run(result)
    return eval_table(result), result


def eval_table(result: dict) -> pd.DataFrame:
    rows = [{"mode": m} | {c: round(v.get(c, 0.0), 4) for c in EVAL_COLUMNS}
            for m, v in result["modes"].items()]
    return pd.DataFrame(rows, columns=["mode", *EVAL_COLUMNS])


def grouped_bars(series: dict[str, dict], metrics: list[str], title: str,
                 figsize=(6, 3.2), fontsize=None):
    """One group of bars per metric, one bar per series (a mode, a model); values in 0..1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(series)
    fig, ax = plt.subplots(figsize=figsize)
    w = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        ax.bar([j + i * w for j in range(len(metrics))],
               [series[n].get(m) or 0.0 for m in metrics], w, label=n)
    ax.set_xticks([j + w * (len(names) - 1) / 2 for j in range(len(metrics))], metrics,
                  fontsize=fontsize)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


def eval_figure(result: dict):
    """Grouped bars: recall@10, MRR@10 and nDCG@10 per retrieval mode."""
    return grouped_bars(result["modes"], ["recall@10", "mrr@10", "ndcg@10"],
                        f"{result['dataset']} on {result['index']} ({result['queries']} queries)")


HISTORY_COLUMNS = ("recall@10", "ndcg@10", "accuracy", "rouge_l", "citation_validity")


def eval_history(store) -> pd.DataFrame:
    """One row per (run, retrieval mode) and per (QA run, model), newest first."""
    rows = []
    for r in store.eval_runs():
        systems = ({f"qa: {k}": v for k, v in r.get("models", {}).items()}
                   if r.get("kind") == "qa" else r.get("modes", {}))
        for m, v in systems.items():
            rows.append({"when": r.get("when"), "dataset": r.get("dataset"),
                         "index": r.get("index"), "queries": r.get("queries"), "mode": m}
                        | {c: (round(v[c], 4) if v.get(c) is not None else None)
                           for c in HISTORY_COLUMNS})
    return pd.DataFrame(rows, columns=["when", "dataset", "index", "queries", "mode",
                                       *HISTORY_COLUMNS])


def run_qa_eval(state, dataset: str, limit, progress=None) -> tuple[pd.DataFrame, dict]:
    """Answer `limit` held-out questions with the base and (if one is active) the tuned
    generator on the active index; score both; save the run to the history."""
    from .qa_eval import QA_DATASETS, evaluate_qa, qa_items

    if dataset not in QA_DATASETS:
        raise ValueError(f"dataset={dataset!r} is invalid: choose one of {QA_DATASETS}")
    limit = int(limit or 0)
    if not 1 <= limit <= MAX_QA_EVAL:
        raise ValueError(f"limit={limit} is invalid: use 1..{MAX_QA_EVAL} questions "
                         f"(each is a generated answer; `rag eval qa` runs the full set)")
    state.sync_models()
    items = qa_items(dataset, limit)
    systems = [("base", state.base)]
    if state.tuned_available():
        state.share_retrieval()
        systems.append(("tuned", state.tuned))
    t = time.perf_counter()
    result = {"kind": "qa", "dataset": dataset, "index": state.index_name,
              "queries": len(items), "models": {}, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    for i, (label, pipe) in enumerate(systems):
        def step(done, total, i=i, label=label):
            if progress:
                progress((i * total + done) / (len(systems) * total),
                         desc=f"{label}: {done}/{total} answers")
        r = evaluate_qa(pipe, dataset, items, progress=step)
        r.pop("rows")
        result["models"][label] = r
    result["seconds"] = round(time.perf_counter() - t, 1)
    state.feedback.add_eval_run(result)
    return qa_table(result), result


def qa_table(result: dict) -> pd.DataFrame:
    from .qa_eval import QA_COLUMNS

    rows = [{"system": k, "model": v.get("model")} |
            {c: (round(v[c], 4) if v.get(c) is not None else None) for c in QA_COLUMNS}
            for k, v in result["models"].items()]
    return pd.DataFrame(rows, columns=["system", "model", *QA_COLUMNS])


def qa_figure(result: dict):
    """Grouped bars: base vs tuned on the answer-quality metrics of this dataset."""
    metrics = [m for m in ("accuracy", "rouge_l", "token_f1", "citation_validity",
                           "answers_with_citation")
               if any(v.get(m) is not None for v in result["models"].values())]
    return grouped_bars(result["models"], metrics,
                        f"{result['dataset']} on {result['index']} ({result['queries']} "
                        "questions)", figsize=(7, 3.2), fontsize=8)
