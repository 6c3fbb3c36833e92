"""Model registry: which base / tuned models exist, which one is active, and rollback.

One JSON file, `<models_dir>/registry.json`:
    {"models": {name: entry}, "active": {kind: name}, "history": {kind: [previous names]}}
An entry is {"name", "kind", "path", "base_model", "training_type", "created", "metrics",
"manifest"}. Paths inside the registry's folder are stored relative to it, so the folder can
move. Writes are atomic (temp file + os.replace) under a file lock.
`merge_adapter` folds a registered LoRA adapter into a standalone checkpoint (`rag model merge`);
`soup_adapters` averages LoRA adapters of one base in weight space (`rag model soup`).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rag_app.config import models_dir
from rag_app.generate import (BASE_ALIASES, BASE_NAME, ensure_base_checkpoint,
                              resolve_generator_path, write_atomically)

log = logging.getLogger(__name__)

KINDS = ("generator", "relevance", "embedder", "base", "reward")  # base: `rag train
# pretrain|vocab`; reward: `rag train reward` (read by PPO and `rag eval policy`)
REGISTRY_FILE = "registry.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
NO_TUNED = ("no tuned generator is registered yet; train one with `rag train instruct` "
            "or pass --model base|PATH")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: choose one of {KINDS}")


def _is_masked_lm(path: str | Path) -> bool:
    """True for a masked-LM encoder checkpoint (a "base" from `rag train pretrain` on MiniLM)."""
    try:
        archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return False
    return any(a.endswith("ForMaskedLM") for a in archs)


def is_adapter_dir(path: str | Path) -> bool:
    """True when the folder holds a peft adapter rather than a full model."""
    return (Path(path) / "adapter_config.json").is_file()


class ModelRegistry:
    """Read and update `registry.json` under `root` (default: models_dir())."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else models_dir()
        self.file = self.root / REGISTRY_FILE

    # -- storage
    def _read(self) -> dict:
        if not self.file.exists():
            return {"models": {}, "active": {}, "history": {}}
        try:
            data = json.loads(self.file.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
                raise ValueError("top level must be an object with a 'models' object")
        except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"model registry {self.file} is corrupt ({exc}): fix or delete the "
                             "file (models stay on disk and can be registered again)") from exc
        for key in ("models", "active", "history"):
            data.setdefault(key, {})
        return data

    def _write(self, data: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=self.root)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, self.file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextmanager
    def _update(self) -> Iterator[dict]:
        """Read-modify-write under an exclusive lock; writes only if the block succeeds."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{REGISTRY_FILE}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._read()
                yield data
                self._write(data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _store_path(self, path: Path) -> str:
        path = path.resolve()
        try:
            return str(path.relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def _public(self, entry: dict) -> dict:
        entry = dict(entry)
        entry["path"] = str(self.root / entry["path"])  # absolute paths stay absolute
        return entry

    # -- API
    def register(self, name: str, kind: str, path: str | Path, base_model: str = "",
                 training_type: str = "", metrics: dict | None = None,
                 manifest: dict | None = None, activate: bool = False) -> dict:
        """Add (or replace) a model entry; with activate=True make it the active one."""
        _check_new_name(name)
        _check_kind(kind)
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"path={str(path)!r} is not a directory: save the model first, "
                             "then register its folder")
        entry = {"name": name, "kind": kind, "path": self._store_path(path),
                 "base_model": base_model, "training_type": training_type,
                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "metrics": dict(metrics or {}), "manifest": dict(manifest or {})}
        with self._update() as data:
            old = data["models"].get(name)
            if old is not None and old["kind"] != kind:
                raise ValueError(f"name={name!r} is already registered as a {old['kind']} model: "
                                 "choose another name")
            if old is not None:
                log.info("replacing registered model %s", name)
            data["models"][name] = entry
            if activate:
                self._activate(data, kind, name)
        return self._public(entry)

    def get(self, name: str) -> dict:
        """The entry called `name`; ValueError listing the known names if absent."""
        models = self._read()["models"]
        if name not in models:
            raise ValueError(f"model {name!r} is not registered: known models are "
                             f"{sorted(models) or 'none'}")
        return self._public(models[name])

    def list(self, kind: str | None = None) -> list[dict]:
        """All entries (optionally of one kind), oldest first."""
        if kind is not None:
            _check_kind(kind)
        entries = [e for e in self._read()["models"].values() if kind in (None, e["kind"])]
        return [self._public(e) for e in sorted(entries, key=lambda e: (e["created"], e["name"]))]

    def active(self, kind: str) -> dict | None:
        """The active entry of this kind, or None (= the base model is used)."""
        _check_kind(kind)
        data = self._read()
        name = data["active"].get(kind)
        if name is None or name not in data["models"]:
            return None
        return self._public(data["models"][name])

    def set_active(self, kind: str, name: str) -> dict:
        """Make `name` the active model of `kind`; the previous one goes to the history."""
        _check_kind(kind)
        with self._update() as data:
            self._activate(data, kind, name)
            entry = data["models"][name]
        return self._public(entry)

    @staticmethod
    def _activate(data: dict, kind: str, name: str) -> None:
        entry = data["models"].get(name)
        if entry is None:
            raise ValueError(f"model {name!r} is not registered: register it first")
        if entry["kind"] != kind:
            raise ValueError(f"model {name!r} is a {entry['kind']} model, not a {kind} model")
        previous = data["active"].get(kind)
        if previous == name:
            return
        if previous is not None:
            data["history"].setdefault(kind, []).append(previous)
        data["active"][kind] = name

    def rollback(self, kind: str) -> dict | None:
        """Re-activate the previously active model; with no history, deactivate (-> base).

        Returns the newly active entry, or None when the base model is active again.
        """
        _check_kind(kind)
        with self._update() as data:
            if data["active"].get(kind) is None:
                raise ValueError(f"no active {kind} model to roll back from")
            history = data["history"].get(kind, [])
            while history and history[-1] not in data["models"]:
                history.pop()  # skip entries removed by hand
            name = history.pop() if history else None
            if name is None:
                data["active"].pop(kind, None)
            else:
                data["active"][kind] = name
            entry = data["models"].get(name) if name else None
        return self._public(entry) if entry else None

    # -- generators
    def resolve_generator(self, model: str) -> tuple[str, str | None, str]:
        """(base model path or HF id, adapter path or None, display name) for `model`.

        `model` is "base"/"default", "tuned" (the active generator), a registered name, a
        local folder (full model or peft adapter) or a Hugging Face id.
        """
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model={model!r} is invalid: use 'base', 'tuned', a registered "
                             "name, a local path or a Hugging Face id")
        model = model.strip()
        if model in BASE_ALIASES:
            return str(ensure_base_checkpoint()), None, "base"
        if model == "tuned":
            entry = self.active("generator")
            if entry is None:
                raise ValueError(NO_TUNED)
            return self._resolve_entry(entry)
        registered = self._read()["models"].get(model)
        if registered is not None:
            if registered["kind"] not in ("generator", "base") or _is_masked_lm(
                    self._public(registered)["path"]):
                raise ValueError(f"model {model!r} is a {registered['kind']} model, not a "
                                 "generator")
            return self._resolve_entry(self._public(registered))
        if Path(model).is_dir() and is_adapter_dir(model):
            return self._resolve_adapter(Path(model), "", Path(model).name)
        path = resolve_generator_path(model)
        return path, None, Path(path).name if Path(path).is_dir() else model

    def _resolve_entry(self, entry: dict) -> tuple[str, str | None, str]:
        path = Path(entry["path"])
        if not path.is_dir():
            raise ValueError(f"registered model {entry['name']!r} points to {path}, which does "
                             "not exist: retrain it, or `rollback` to the previous model")
        if is_adapter_dir(path):
            return self._resolve_adapter(path, entry.get("base_model", ""), entry["name"])
        return str(path), None, entry["name"]

    @staticmethod
    def _resolve_adapter(path: Path, base_model: str, name: str) -> tuple[str, str, str]:
        if not base_model:
            try:
                cfg = json.loads((path / "adapter_config.json").read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path / 'adapter_config.json'} is corrupt: {exc}") from exc
            base_model = cfg.get("base_model_name_or_path") or "base"
        if Path(base_model).name == BASE_NAME and not Path(base_model).is_dir():
            base_model = "base"  # trained on another machine: use the local conversion
        return resolve_generator_path(base_model), str(path), name


# -- merging an adapter into a standalone checkpoint

def _check_new_name(name: str) -> None:
    reserved = BASE_ALIASES + ("tuned",)
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in reserved:
        raise ValueError(f"name={name!r} is invalid: use letters, digits, '.', '_', '-' "
                         "(not 'base', 'default' or 'tuned')")


def _destination(reg: ModelRegistry, out: str | Path | None, name: str) -> Path:
    """`out`, or `<models_dir>/generator/<name>`; refused if it exists, its parent made."""
    dest = Path(out) if out else reg.root / "generator" / name
    if dest.exists():
        raise ValueError(f"{dest} already exists: pass another --out, or delete the folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def merge_adapter(name: str, out: str | Path | None = None, new_name: str | None = None,
                  activate: bool = False, registry: ModelRegistry | None = None) -> dict:
    """Fold the LoRA adapter of registered generator `name` ("tuned" = the active one) into
    its base model (peft `merge_and_unload`) and save a standalone transformers checkpoint
    (model + tokenizer, safetensors) to `out` (default `<models_dir>/generator/<name>-merged`),
    written to a temporary folder and renamed into place. Registers it as generator
    `new_name` (default `<name>-merged`), active only with activate=True; returns the entry."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg = registry or ModelRegistry()
    if name == "tuned":
        entry = reg.active("generator")
        if entry is None:
            raise ValueError(NO_TUNED)
    else:
        entry = reg.get(name)
    name = entry["name"]
    if entry["kind"] != "generator":
        raise ValueError(f"model {name!r} is a {entry['kind']} model: only generator adapters "
                         "can be merged")
    base, adapter, _ = reg.resolve_generator(name)
    if adapter is None:
        raise ValueError(f"model {name!r} is not a LoRA adapter (no adapter_config.json in "
                         f"{entry['path']}): it is already a standalone checkpoint, use it as is")
    new_name = new_name or f"{name}-merged"
    _check_new_name(new_name)
    dest = _destination(reg, out, new_name)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"could not load adapter {adapter!r} on {base!r}: {exc}") from exc

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = {"merged_from": name, "adapter": adapter, "base_model": base,
                    "training_type": entry.get("training_type", ""),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    write_atomically(dest, write)
    log.info("merged %s into %s in %.1f s", name, dest, time.perf_counter() - t0)
    return reg.register(new_name, "generator", dest, base_model=base,
                        training_type=entry.get("training_type", ""), metrics=entry["metrics"],
                        manifest={"merged_from": name, "file": str(dest / "manifest.json")},
                        activate=activate)


# -- a weight soup of LoRA adapters

def soup_adapters(names: list[str], new_name: str, weights: list[float] | None = None,
                  out: str | Path | None = None, activate: bool = False,
                  registry: ModelRegistry | None = None) -> dict:
    """Average registered LoRA generators of one base model in weight space (a "model soup"):
    the new adapter's weight change is sum_i w_i * (B_i A_i * scaling_i), exactly, through peft's
    `add_weighted_adapter(combination_type="cat")` (its rank is the sum of the ranks).
    `weights` (default equal) must be non-negative and sum to 1, so the souped model's weights
    are the weighted mean of the models' weights. Saved (adapter + manifest) to `out` (default
    `<models_dir>/generator/<new_name>`) through a temporary folder, registered as generator
    `new_name`, active only with activate=True; returns the entry."""
    import math

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reg = registry or ModelRegistry()
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"names={names!r}: a soup needs two or more different adapters")
    weights = [1.0 / len(names)] * len(names) if weights is None else [float(w) for w in weights]
    if (len(weights) != len(names) or not all(math.isfinite(w) and w >= 0 for w in weights)
            or abs(sum(weights) - 1.0) > 1e-6):
        raise ValueError(f"weights={weights!r} are invalid: give one non-negative weight per "
                         f"model ({len(names)}), summing to 1")
    _check_new_name(new_name)
    entries, adapters, bases, layers = [], [], set(), set()
    for name in names:
        entry = reg.get(name)
        base, adapter, _ = reg.resolve_generator(name) if entry["kind"] == "generator" else (
            None, None, None)
        if adapter is None:
            raise ValueError(f"model {name!r} is not a LoRA generator adapter: only adapters "
                             "can be souped")
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
        entries.append(entry)
        adapters.append(adapter)
        bases.add(str(Path(base).resolve()) if Path(base).is_dir() else base)
        layers.add(json.dumps(cfg.get("layers_to_transform")))
    if len(bases) != 1:
        raise ValueError(f"the adapters {names} were trained on different base models "
                         f"({sorted(bases)}): only adapters of one base can be souped")
    if len(layers) != 1:
        raise ValueError(f"the adapters {names} adapt different layers (lora_layers): they "
                         "cannot be souped")
    dest = _destination(reg, out, new_name)
    t0 = time.perf_counter()
    base = bases.pop()
    slots = [f"a{i}" for i in range(len(names))]
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name=slots[0])
        for slot, adapter in zip(slots[1:], adapters[1:]):
            model.load_adapter(adapter, adapter_name=slot)
        model.add_weighted_adapter(slots, weights, "default", combination_type="cat")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"could not soup {adapters} on {base!r}: {exc}") from exc
    types = {e.get("training_type", "") for e in entries}
    training_type = types.pop() if len(types) == 1 else "soup"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, selected_adapters=["default"])
        manifest = {"souped_from": names, "weights": weights, "adapters": adapters,
                    "base_model": base, "training_type": training_type,
                    "combination": "peft add_weighted_adapter cat: delta W = sum_i w_i delta W_i",
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    write_atomically(dest, write)
    log.info("souped %s into %s in %.1f s", names, dest, time.perf_counter() - t0)
    return reg.register(new_name, "generator", dest, base_model=base, training_type=training_type,
                        manifest={"souped_from": names, "weights": weights,
                                  "file": str(dest / "manifest.json")},
                        activate=activate)
