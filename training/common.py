"""Shared by every training type: seeds, recipes (YAML -> one config dataclass per type, with
CLI overrides), the run manifest, the progress callback (THE contract the app's fine-tune tab
tails), resumable checkpoints, and saving + registering the trained model.

Progress file: one JSON object per line,
    {"event": "start"|"step"|"eval"|"done"|"error", "step", "total", "loss", "eta_s",
     "epoch", "metrics": {...}, "output": path, "time": unix}
Every key is present on every line (null when unknown).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from rag_app.config import REPO_ROOT, models_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
RUNS_DIR = REPO_ROOT / "runs"
EVENTS = ("start", "step", "eval", "done", "error")


# ---------- seeds and versions ----------
def set_seed(seed: int) -> None:
    import transformers

    transformers.set_seed(seed)


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "sentence-transformers", "datasets", "faiss-cpu",
                "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ---------- configs ----------
@dataclass
class TrainConfig:
    """Fields every training type shares. Subclasses add their own."""
    base_model: str = "default"  # "default" = the packaged MiniLM; or an HF id / local path
    name: str = ""  # registry name (default: <type>-<timestamp>)
    seed: int = 42
    max_steps: int = 100
    batch_size: int = 16
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 256
    logging_steps: int = 5
    save_steps: int = 50
    eval_steps: int = 0  # 0 = evaluate at the end only
    bf16: bool = False  # mixed precision; TRL's configs default it ON, but a CPU without bf16
    # units (AVX2 only, as here) emulates it: a reward-model step ran ~5x slower with it
    # data
    n_queries: int = 1000  # training queries (sampled); None-like 0 = all
    n_val_queries: int = 200
    n_eval_queries: int = 300  # held-out queries for the classification eval
    sources: str = "medquad,pubmedqa"
    # share of the TRAINING queries drawn from PubMedQA (0 = in proportion to the split:
    # ~3% of the training side, too few to learn what an abstract's relevance looks like)
    pubmedqa_share: float = 0.0
    n_hard: int = 2  # hard negatives per query (same focus/other qtype + bi-encoder mined)
    n_random: int = 1
    mine_top: int = 30
    mine_pool: int = 3000  # passages embedded for mining (positives + same-focus + random)
    mine_words: int = 96  # embed the first N words of a passage for mining (0 = all)
    # evaluation after training
    eval_index: str = ""  # index for the ranking eval ("" = skip it)
    eval_ranking_limit: int = 100  # queries per dataset in the ranking eval
    candidates: int = 50

    def __post_init__(self):
        for f in ("max_steps", "batch_size", "max_length", "logging_steps"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)!r} is invalid: use a positive integer")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate={self.learning_rate!r} is invalid: use 0 < lr < 1")
        if not 0 <= self.pubmedqa_share <= 1:
            raise ValueError(f"pubmedqa_share={self.pubmedqa_share!r} is invalid: use 0..1")

    @property
    def source_list(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.sources.split(",") if s.strip())

    @property
    def train_shares(self) -> dict[str, float]:
        """Per-source shares of the training queries for `data.sample_by_source` ({} =
        proportional sampling)."""
        return {"pubmedqa": self.pubmedqa_share} if self.pubmedqa_share and \
            "pubmedqa" in self.source_list else {}


def _cast(value: Any, typ) -> Any:
    typ = typ if isinstance(typ, type) else {"int": int, "float": float, "str": str,
                                             "bool": bool}.get(str(typ), str)
    if isinstance(value, str) and typ is not str:
        if typ is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{value!r} is not a boolean: use true or false")
            return value.lower() in ("true", "1", "yes")
        return typ(float(value)) if typ is int and "e" in value.lower() else typ(value)
    if typ is float and isinstance(value, int):
        return float(value)
    return value


def load_config(cls, recipe: str | Path | None = None, overrides: list[str] | None = None,
                **explicit) -> Any:
    """Recipe YAML -> `cls`, then `--set key=value` overrides, then explicit flags (not None)."""
    import yaml

    values: dict = {}
    if recipe:
        path = Path(recipe)
        if not path.exists() and (RECIPES_DIR / path.name).exists():
            path = RECIPES_DIR / path.name
        if not path.exists():
            raise ValueError(f"recipe {str(recipe)!r} not found: pass a YAML file, e.g. "
                             f"{RECIPES_DIR.relative_to(REPO_ROOT)}/relevance.yaml")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"recipe {path} must be a mapping of key: value")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is invalid: use key=value")
        k, v = item.split("=", 1)
        values[k.strip()] = v.strip()
    values.update({k: v for k, v in explicit.items() if v is not None})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}: known keys are "
                         f"{sorted(known)}")
    return cls(**{k: _cast(v, known[k].type) for k, v in values.items()})


# ---------- manifest ----------
@dataclass
class RunManifest:
    training_type: str
    base_model: str
    config: dict
    seed: int
    data: dict = field(default_factory=dict)  # description + counts
    metrics_before: dict = field(default_factory=dict)
    metrics_after: dict = field(default_factory=dict)
    library_versions: dict = field(default_factory=library_versions)
    started: float = field(default_factory=time.time)
    wall_time_s: float | None = None
    output: str = ""
    train_log: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".manifest-{uuid.uuid4().hex[:8]}.json"
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        os.replace(tmp, folder / "manifest.json")
        return folder / "manifest.json"


# ---------- progress ----------
class ProgressCallback(TrainerCallback):
    """Appends one JSON line per event to `progress_file` (see the module docstring)."""

    def __init__(self, progress_file: str | Path | None):
        self.path = Path(progress_file) if progress_file else None
        self.loss: float | None = None
        self.t0 = time.time()
        self.first_step = 0
        self.losses: list[tuple[int, float]] = []

    def emit(self, event: str, step: int | None = None, total: int | None = None,
             loss: float | None = None, eta_s: float | None = None, epoch: float | None = None,
             metrics: dict | None = None, output: str | None = None) -> dict:
        if event not in EVENTS:
            raise ValueError(f"event={event!r} is invalid: choose one of {EVENTS}")
        rec = {"event": event, "step": step, "total": total, "loss": loss,
               "eta_s": None if eta_s is None else round(eta_s, 1),
               "epoch": None if epoch is None else round(float(epoch), 4),
               "metrics": _jsonable(metrics or {}), "output": output, "time": time.time()}
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
        return rec

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.time()
        self.first_step = state.global_step  # > 0 when resuming
        self.emit("start", state.global_step, state.max_steps, epoch=state.epoch or 0.0,
                  output=args.output_dir)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self.losses.append((state.global_step, self.loss))

    def on_step_end(self, args, state, control, **kw):
        done = state.global_step - self.first_step
        eta = (time.time() - self.t0) / done * (state.max_steps - state.global_step) \
            if done > 0 else None
        self.emit("step", state.global_step, state.max_steps, self.loss, eta, state.epoch)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.emit("eval", state.global_step, state.max_steps, self.loss, epoch=state.epoch,
                  metrics=metrics)

    def done(self, output: str, metrics: dict, step: int | None = None,
             total: int | None = None) -> dict:
        return self.emit("done", step, total, self.loss, 0.0, metrics=metrics,
                         output=str(output))

    def error(self, message: str) -> dict:
        return self.emit("error", loss=self.loss, metrics={"message": message})


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _jsonable(v)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        else:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                out[k] = str(v)
    return out


# ---------- runs, checkpoints, registry ----------
def run_dir(training_type: str, output: str | None) -> Path:
    """`output`, or a new folder runs/TYPE-YYYYmmdd-HHMMSS[-N] of its own: two runs started in
    the same second (say, two seeds launched together) never share one."""
    if output:
        path = Path(output)
        path.mkdir(parents=True, exist_ok=True)
        return path
    stem = RUNS_DIR / f"{training_type}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = stem if n == 1 else stem.with_name(f"{stem.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder next to {stem}")


def resume_checkpoint(output: Path, resume: bool) -> str | None:
    """The last checkpoint-N folder in `output` when --resume is given (None = start fresh)."""
    if not resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(output)) if output.exists() else None
    if last is None:
        raise ValueError(f"--resume: no checkpoint-N folder in {output}: pass the --output of "
                         "the interrupted run, or drop --resume to start fresh")
    return last


def trainer_args_common(cfg: TrainConfig, output: Path, has_eval: bool) -> dict:
    """The TrainingArguments every type shares (CPU, offline, checkpointing for --resume)."""
    return dict(output_dir=str(output), max_steps=cfg.max_steps,
                per_device_train_batch_size=cfg.batch_size,
                per_device_eval_batch_size=max(cfg.batch_size, 32),
                learning_rate=cfg.learning_rate, warmup_steps=int(cfg.warmup_ratio * cfg.max_steps),
                weight_decay=cfg.weight_decay, logging_steps=cfg.logging_steps,
                save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
                eval_strategy="steps" if has_eval and cfg.eval_steps else "no",
                eval_steps=cfg.eval_steps or None, seed=cfg.seed, data_seed=cfg.seed,
                use_cpu=True, report_to="none", dataloader_num_workers=0,
                disable_tqdm=False, bf16=cfg.bf16)


def save_and_register(model, kind: str, training_type: str, manifest: RunManifest,
                      name: str = "", activate: bool = False, folder: str | None = None) -> dict:
    """Save `model` (anything with save_pretrained) to <models_dir>/<folder or kind>/<name>,
    written to a temporary folder and renamed into place, with its manifest.json; register it
    in the ModelRegistry (kind "relevance" | "embedder" | "generator" | "base") with its
    metrics; active only if asked."""
    from rag_app.models import ModelRegistry

    name = name or f"{training_type}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest = models_dir() / (folder or kind) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{name}-{uuid.uuid4().hex[:6]}"
    model.save_pretrained(str(tmp))
    manifest.output = str(dest)
    manifest.write(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return ModelRegistry().register(name, kind, dest, base_model=manifest.base_model,
                                    training_type=training_type,
                                    metrics=_jsonable(manifest.metrics_after),
                                    manifest={"file": str(dest / "manifest.json"),
                                              "seed": manifest.seed,
                                              "wall_time_s": manifest.wall_time_s},
                                    activate=activate)


def start_run(training_type: str, cfg: TrainConfig, output: str | None,
              progress_file: str | None, resume: bool):
    """The shared start of every training run: seed, run folder, progress callback, and the
    checkpoint to resume from (fails fast on --resume without one).
    Returns (t0, run folder, progress callback, checkpoint or None)."""
    t0 = time.time()
    set_seed(cfg.seed)
    out = run_dir(training_type, output)
    return t0, out, ProgressCallback(progress_file), resume_checkpoint(out, resume)


def finish_run(model, trainer, progress, manifest: RunManifest, kind: str, training_type: str,
               cfg: TrainConfig, activate: bool, out: Path, t0: float, metrics: dict,
               folder: str | None = None) -> dict:
    """The shared end of every training run: training log and wall time into the manifest,
    save + register the model, write the manifest into the run folder, emit "done"."""
    manifest.train_log = trainer.state.log_history
    manifest.wall_time_s = round(time.time() - t0, 1)
    entry = save_and_register(model, kind, training_type, manifest, cfg.name, activate, folder)
    manifest.write(out)
    progress.done(entry["path"], metrics, trainer.state.global_step, trainer.state.max_steps)
    return {"entry": entry, "manifest": manifest.to_dict(), "run_dir": str(out), "model": model}


def resolve_base(model: str) -> str:
    """default/base -> the packaged MiniLM; a registered model name (e.g. a "base" from `rag
    train pretrain`) -> its folder; else a path or HF id as given."""
    from rag_app.embed import resolve_embedder_path

    if model not in ("default", "base", "") and not Path(model).exists():
        from rag_app.models import ModelRegistry

        try:
            return ModelRegistry().get(model)["path"]
        except ValueError:
            pass
    return resolve_embedder_path(model)
