"""Fine-tuning jobs in a separate worker process, one at a time, surviving page reloads.

A job runs `python -m rag_app.cli train KIND --recipe R --progress-file F --output DIR`
(niced, in its own process group) and appends JSON lines to F:
    {"event": "start"|"step"|"eval"|"done"|"error", "step", "total", "loss", "eta_s",
     "epoch", "metrics": {...}, "output": path, "time": unix}
On "done" the trainer has registered the model in the ModelRegistry under the output folder's
name. The job's description lives in `<jobs_dir>/current.json`, so any page (or a restarted
app) sees the same job. Cancelling kills the process group; the registry is never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from .config import REPO_ROOT, models_dir

RECIPES_DIR = REPO_ROOT / "training" / "recipes"
# Hyper-parameters the UI can override, and the recipe keys each may be spelled as.
OVERRIDES = {"steps": ("max_steps", "steps", "num_steps", "train_steps"),
             "learning_rate": ("learning_rate", "lr"),
             "batch_size": ("batch_size", "per_device_train_batch_size", "train_batch_size")}
ACTIVE = ("starting", "running")


def jobs_dir() -> Path:
    env = os.environ.get("RAG_JOBS_DIR")
    return Path(env) if env else models_dir().parent / "jobs"


VARIANTS = ("tiny", "small", "test", "full", "large", "base")


def recipe_kind(stem: str, stems: set[str]) -> str:
    """`relevance-tiny` -> `relevance` (a variant of another recipe, or a known variant
    suffix; the shortest such prefix, so `pretrain-ewc-tiny` -> `pretrain`);
    `synthetic-queries` stays itself."""
    parts = stem.split("-")
    for n in range(1, len(parts)):
        prefix = "-".join(parts[:n])
        if prefix in stems or all(p in VARIANTS for p in parts[n:]):
            return prefix
    return stem


def list_recipes(recipes_dir: Path | None = None) -> dict[str, list[str]]:
    """{training kind: [recipe paths]} from `training/recipes/KIND[-variant].yaml`."""
    root = Path(recipes_dir or RECIPES_DIR)
    files = sorted(root.glob("*.y*ml")) if root.is_dir() else []
    stems = {p.stem for p in files}
    try:  # the training side names its types (e.g. synthetic.yaml -> synthetic-queries)
        from training.cli import DEFAULT_RECIPES
        alias = {Path(v).stem: k for k, v in DEFAULT_RECIPES.items()}
    except ImportError:
        alias = {}
    out: dict[str, list[str]] = {}
    for p in files:
        # a training type's own recipe name wins (longest first), so synthetic-prefs-tiny
        # belongs to synthetic-prefs, not to a variant of synthetic.yaml
        own = [s for s in sorted(alias, key=len, reverse=True)
               if p.stem == s or p.stem.startswith(s + "-")]
        kind = own[0] if own else recipe_kind(p.stem, stems)
        out.setdefault(alias.get(kind, kind), []).append(str(p))
    return out


def read_events(path: str | Path) -> list[dict]:
    """The progress file's events; a torn last line (being written) is ignored."""
    events = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(ev, dict):
                    events.append(ev)
    except FileNotFoundError:
        pass
    return events


def apply_overrides(recipe: Path, overrides: dict, out: Path) -> Path:
    """Copy the YAML recipe to `out` with steps / learning_rate / batch_size replaced (found at
    the top level or one level down under any of their spellings). Unset values are skipped."""
    import yaml

    overrides = {k: v for k, v in overrides.items() if v not in (None, "", 0)}
    if not overrides:
        return recipe
    data = yaml.safe_load(recipe.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {recipe.name} is not a YAML mapping")
    for key, value in overrides.items():
        if key not in OVERRIDES:
            raise ValueError(f"hyper-parameter {key!r} cannot be overridden: use one of "
                             f"{tuple(OVERRIDES)}")
        if not _set_key(data, OVERRIDES[key], value):
            raise ValueError(f"recipe {recipe.name} has no {key} setting (looked for "
                             f"{', '.join(OVERRIDES[key])}): leave it empty to use the recipe")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _set_key(data: dict, names: tuple, value) -> bool:
    for d in [data] + [v for v in data.values() if isinstance(v, dict)]:
        for name in names:
            if name in d:
                d[name] = type(d[name])(value) if isinstance(d[name], (int, float)) else value
                return True
    return False


def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if started is not None and _proc_start(pid) not in (None, started):
        return False  # the pid now belongs to another process
    try:  # a zombie (exited, not reaped by a previous app process) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class JobRunner:
    """Start / watch / cancel one training job. `command` builds the argv (tests pass a fake
    trainer); by default it is `python -m rag_app.cli train KIND ...`."""

    def __init__(self, root: Path | None = None, command=None, nice: int = 10,
                 threads: int | None = None, recipes_dir: Path | None = None):
        self.root = Path(root) if root is not None else jobs_dir()
        self.recipes_dir = Path(recipes_dir or RECIPES_DIR)
        self.command = command or self.default_command
        self.nice = nice
        self.threads = threads or max(1, (os.cpu_count() or 2) - 1)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    @staticmethod
    def default_command(kind: str, recipe: str, progress: str, output: str) -> list[str]:
        return [sys.executable, "-m", "rag_app.cli", "train", kind, "--recipe", recipe,
                "--progress-file", progress, "--output", output, "--name", Path(output).name]

    @property
    def state_file(self) -> Path:
        return self.root / "current.json"

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write_state(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_file)

    # -- control
    def start(self, kind: str, recipe: str, overrides: dict | None = None) -> dict:
        recipes = list_recipes(self.recipes_dir)
        if kind not in recipes:
            raise ValueError(f"training type {kind!r} has no recipe in {self.recipes_dir}: "
                             f"choose one of {sorted(recipes) or 'none (no recipes yet)'}")
        match = [r for r in recipes[kind] if str(recipe) in (r, Path(r).name)]
        if not match:
            names = [Path(r).name for r in recipes[kind]]
            raise ValueError(f"recipe {recipe!r} is not a {kind} recipe: choose one of {names}")
        recipe = match[0]
        with self._lock:
            current = self.status()
            if current and current["status"] in ACTIVE:
                raise ValueError(f"job {current['id']} ({current['kind']}) is still running: "
                                 "wait for it or cancel it first (one job at a time)")
            # unique even for two jobs in the same second (the output folder is named after it)
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
            folder = self.root / job_id
            folder.mkdir(parents=True, exist_ok=True)
            output = models_dir() / f"{kind}-{job_id}"
            used = apply_overrides(Path(recipe), overrides or {}, folder / "recipe.yaml")
            progress = folder / "progress.jsonl"
            argv = self.command(kind, str(used), str(progress), str(output))
            if self.nice and shutil.which("nice"):
                argv = ["nice", "-n", str(self.nice)] + argv
            env = dict(os.environ, OMP_NUM_THREADS=str(self.threads),
                       MKL_NUM_THREADS=str(self.threads), TOKENIZERS_PARALLELISM="false",
                       PYTHONUNBUFFERED="1")
            env["PYTHONPATH"] = os.pathsep.join(
                [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
            with open(folder / "log.txt", "wb") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=str(REPO_ROOT), env=env,
                                        start_new_session=True)
            self._procs[job_id] = proc
            state = {"id": job_id, "kind": kind, "recipe": str(recipe), "used_recipe": str(used),
                     "overrides": overrides or {}, "pid": proc.pid,
                     "pid_start": _proc_start(proc.pid), "progress_file": str(progress),
                     "log": str(folder / "log.txt"), "output": str(output),
                     "name": output.name, "started": time.time(), "cancelled": False}
            self._write_state(state)
        return self.status()

    def cancel(self, timeout: float = 10.0) -> dict:
        """Kill the job's process group (TERM, then KILL); remove its unregistered output."""
        state = self._read_state()
        st = self.status()
        if not state or st["status"] not in ACTIVE:
            raise ValueError("no training job is running")
        if not self._running(state):  # never signal a group we no longer own
            raise ValueError("the training job already ended")
        try:
            os.killpg(state["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + timeout
        while time.time() < deadline and self._running(state):
            time.sleep(0.1)
        if self._running(state):
            try:
                os.killpg(state["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.2)
            self._running(state)
        state["cancelled"] = True
        state["ended"] = time.time()
        self._write_state(state)
        from .models import ModelRegistry

        names = {e["name"] for e in ModelRegistry().list()}
        if state["name"] not in names:
            shutil.rmtree(state["output"], ignore_errors=True)
        return self.status()

    def _running(self, state: dict) -> bool:
        proc = self._procs.get(state["id"])
        if proc is not None:
            return proc.poll() is None
        return _alive(state["pid"], state.get("pid_start"))

    def wait(self, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.status()
            if st is None or st["status"] not in ACTIVE:
                return st
            time.sleep(0.2)
        raise TimeoutError(f"training job still running after {timeout:.0f} s")

    # -- watching
    def status(self) -> dict | None:
        """The current (or last) job with its events and a status: starting, running, done,
        error, cancelled or failed (the process ended without a done/error event)."""
        state = self._read_state()
        if state is None:
            return None
        events = read_events(state["progress_file"])
        running = self._running(state)
        last = events[-1]["event"] if events else None
        if state.get("cancelled"):
            status = "cancelled"
        elif any(e.get("event") == "done" for e in events):
            status = "done"
        elif any(e.get("event") == "error" for e in events):
            status = "error"
        elif running:
            status = "running" if last else "starting"
        else:
            status = "failed"
        proc = self._procs.get(state["id"])
        steps = [e for e in events if e.get("event") == "step"]
        done = next((e for e in events if e.get("event") == "done"), None)
        error = next((e for e in events if e.get("event") == "error"), None)
        latest = steps[-1] if steps else {}
        return state | {
            "status": status, "events": events,
            "step": latest.get("step", 0), "total": latest.get("total") or next(
                (e.get("total") for e in events if e.get("total")), None),
            "loss": latest.get("loss"), "eta_s": latest.get("eta_s"),
            "epoch": latest.get("epoch"),
            "curve": [(e["step"], e["loss"]) for e in steps
                      if e.get("step") is not None and e.get("loss") is not None],
            "metrics": (done or {}).get("metrics", {}),
            "model_output": (done or {}).get("output") or state["output"],
            "error": (error or {}).get("message") or (error or {}).get("error"),
            "returncode": proc.poll() if proc is not None else None,
            "log_tail": self._log_tail(state) if status in ("failed", "error") else "",
        }

    @staticmethod
    def _log_tail(state: dict, n: int = 1500) -> str:
        try:
            return Path(state["log"]).read_text(errors="replace")[-n:]
        except OSError:
            return ""
