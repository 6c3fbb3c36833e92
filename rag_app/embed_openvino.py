"""OpenVINO backend for the embedder: same interface as SentenceTransformerEmbedder, 2-6x faster
on CPU.

The HF transformer inside a sentence-transformers model is converted locally (nothing is
downloaded) with `ov.convert_model`, optionally quantised to static int8 with NNCF (calibrated
on ~300 MedQuAD passages), and cached as OpenVINO IR under
`<models_dir>/openvino/<fingerprint>-<precision>/` (bf16 runs the fp32 IR with a bf16 inference
hint, so it shares the `-fp32` folder). Pooling and L2 normalisation are done here in numpy, as
the model's sentence-transformers Pooling module is configured.

Precisions: "fp32" (identical to torch), "bf16" (needs avx512_bf16 or AMX; cosine ~0.99999),
"int8" (static NNCF quantisation; cosine ~0.996; fast only with VNNI: on an AVX2-only CPU such as
AMD Zen1/Zen2 oneDNN falls back to a generic int8 gemm that measured ~2x SLOWER than fp32), and
"auto": bf16 where the CPU supports it, else int8 where it has VNNI, else fp32.

The fingerprint is the torch model's weight hash (the same model gives the same hash); the
backend and precision are recorded separately in `describe()`, and an index refuses an embedder
whose hash, backend or precision differ (rag_app.index.check_embedder).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import threading
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .config import models_dir, shared_data_dir
from .embed import DEFAULT_EMBEDDER, ProgressFn, SentenceTransformerEmbedder

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
INSTALL_HINT = "pip install openvino==2026.4.1 nncf==3.4.0"
CALIBRATION_SIZE = 300  # passages (one per NNCF dataset item)
CALIBRATION_SEED = 0
IR_FORMAT = 1  # bump when the conversion changes, so stale caches are rebuilt
_SUPPORTED_MODULES = {"Transformer", "Pooling", "Normalize"}
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_convert_lock = threading.Lock()


# ---------- CPU features / precision ----------
def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_supported(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def int8_fast(flags: set[str] | None = None) -> bool:
    """VNNI (or AMX int8): without it OpenVINO's int8 FullyConnected runs oneDNN's generic
    jit_gemm_I8, measured ~2x slower than fp32 on an AVX2-only AMD EPYC."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_precision(precision: str, flags: set[str] | None = None) -> str:
    """'auto' -> bf16 where the CPU has avx512_bf16/AMX (~4x, cosine 0.99999), else int8 where
    it has VNNI (~5.5x, cosine ~0.997: see shared/SPEED_NOTES.md), else fp32."""
    if precision == "auto":
        flags = cpu_flags() if flags is None else flags
        if bf16_supported(flags):
            return "bf16"
        return "int8" if int8_fast(flags) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is invalid for the openvino backend: choose "
                         f"one of {PRECISIONS + ('auto',)}")
    return precision


def cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"the openvino embedder backend needs the package {module!r}: "
                         f"{INSTALL_HINT}")


def ir_dir(fingerprint: str, precision: str) -> Path:
    """Where the converted IR of (weights, precision) is cached; bf16 uses the fp32 IR."""
    stored = "fp32" if precision == "bf16" else precision
    return models_dir() / "openvino" / f"{fingerprint}-{stored}"


def calibration_texts(n: int = CALIBRATION_SIZE, seed: int = CALIBRATION_SEED) -> list[str]:
    """n MedQuAD passages (a fixed random sample) to calibrate int8 quantisation."""
    path = shared_data_dir() / "medquad" / "medquad_passages.jsonl"
    if not path.exists():
        raise ValueError(f"int8 calibration needs the shared corpus file {path}: put the "
                         "project's shared data beside the repo (../shared/data) or set "
                         "RAG_SHARED_DATA, or use --precision fp32/bf16")
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                t = json.loads(line).get("text", "").strip()
                if t:
                    texts.append(t)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in sorted(pick)]


# ---------- pooling (numpy, as sentence-transformers' Pooling module) ----------
def pool(hidden: np.ndarray, mask: np.ndarray, modes: tuple[str, ...]) -> np.ndarray:
    """Pool token embeddings (batch, seq, dim) with attention mask (batch, seq) per the
    sentence-transformers modes; several modes are concatenated, as there."""
    h = hidden.astype(np.float32, copy=False)
    m = mask.astype(np.float32)
    b, seq, dim = h.shape
    rows = np.arange(b)
    outs = []
    for mode in modes:
        if mode == "cls":
            outs.append(h[rows, np.argmax(mask, axis=1)])
        elif mode == "max":
            outs.append(np.where(m[..., None] > 0, h, -np.inf).max(axis=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            s = np.einsum("bsd,bs->bd", h, m)
            n = np.clip(m.sum(axis=1, keepdims=True), 1e-9, None)
            outs.append(s / (n if mode == "mean" else np.sqrt(n)))
        elif mode == "weightedmean":
            w = np.arange(1, seq + 1, dtype=np.float32)[None, :] - \
                np.argmax(mask, axis=1).astype(np.float32)[:, None]
            wm = m * w
            outs.append(np.einsum("bsd,bs->bd", h, wm) /
                        np.clip(wm.sum(axis=1, keepdims=True), 1e-9, None))
        elif mode == "lasttoken":
            flipped = mask[:, ::-1]
            idx = np.where(flipped.max(axis=1) == 0, seq - 1, np.argmax(flipped, axis=1))
            outs.append(h[rows, seq - 1 - idx] * m[rows, seq - 1 - idx][:, None])
        else:
            raise ValueError(f"pooling mode {mode!r} is not supported by the openvino backend: "
                             "use --backend torch")
    return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)


def l2_normalize(v: np.ndarray) -> np.ndarray:
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class OpenVINOEmbedder:
    """Lazy-loading OpenVINO embedder: construction is cheap; the first use loads the torch
    model (for its weight hash and tokenizer), then loads the cached IR or converts it once."""

    backend = "openvino"

    def __init__(self, model: str = DEFAULT_EMBEDDER, precision: str = "auto",
                 batch_size: int = 16, name: str | None = None,
                 performance_hint: str = "LATENCY", threads: int | None = None):
        _require("openvino")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: use a positive integer")
        if performance_hint not in ("LATENCY", "THROUGHPUT"):
            raise ValueError(f"performance_hint={performance_hint!r} is invalid: use LATENCY "
                             "or THROUGHPUT")
        self.precision = resolve_precision(precision)
        if self.precision == "int8":
            _require("nncf")
            if not int8_fast():
                log.warning("precision int8 on a CPU without VNNI runs a generic int8 kernel "
                            "that is slower than fp32 here: prefer --precision fp32 or auto")
        if self.precision == "bf16" and not bf16_supported():
            log.warning("precision bf16 requested but this CPU has neither avx512_bf16 nor AMX: "
                        "OpenVINO runs it in fp32 (same vectors within bf16 rounding)")
        self._torch = SentenceTransformerEmbedder(model, name=name)
        self.model_ref = model
        self.name = self._torch.name
        self.batch_size = batch_size
        self.performance_hint = performance_hint
        self.threads = threads or cpu_threads()
        self._compiled = None
        self._tokenizer = None
        self._info: dict | None = None
        self._load_lock = threading.Lock()
        self.load_seconds: float | None = None
        self.converted = False  # True when this instance converted (not a cache hit)

    # ---------- loading ----------
    def _source_info(self) -> dict:
        """Fingerprint, tokenizer, window, dim and pooling of the torch model (loaded once)."""
        if self._info is None:
            st = self._torch.model
            kinds = [type(mod).__name__ for mod in st]
            if not kinds or kinds[0] != "Transformer" or not set(kinds) <= _SUPPORTED_MODULES:
                raise ValueError(f"embedder {self.model_ref!r} has modules {kinds}: the openvino "
                                 "backend supports Transformer + Pooling (+ Normalize) only; use "
                                 "--backend torch")
            modes: tuple[str, ...] = ("mean",)
            for mod in st:
                if type(mod).__name__ == "Pooling":
                    pm = mod.pooling_mode
                    modes = (pm,) if isinstance(pm, str) else tuple(pm)
                    if getattr(mod, "include_prompt", True) is False and \
                            getattr(st, "default_prompt_name", None):
                        raise ValueError("pooling without the prompt is not supported by the "
                                         "openvino backend: use --backend torch")
            prompt = ""
            if getattr(st, "default_prompt_name", None):
                prompt = st.prompts.get(st.default_prompt_name, "")
            self._info = {"fingerprint": self._torch.fingerprint, "dim": self._torch.dim,
                          "max_seq_length": self._torch.max_seq_length, "modes": modes,
                          "prompt": prompt}
            self._tokenizer = self._torch.tokenizer
        return self._info

    def _convert_fp32(self):
        """torch -> OpenVINO model (fp32, dynamic batch and sequence length)."""
        import openvino as ov
        import torch

        st = self._torch.model
        hf = st[0].auto_model.eval()
        tok = self._torch.tokenizer
        example = tok(["a short example", "a slightly longer example sentence to convert"],
                      padding=True, truncation=True, return_tensors="pt")
        names = [k for k in _MODEL_INPUTS if k in example]

        class _Wrapper(torch.nn.Module):
            """Passes keyword arguments (transformers 5 BERT takes positional ones wrongly)."""

            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids=None):
                kw = {"input_ids": input_ids, "attention_mask": attention_mask}
                if token_type_ids is not None:
                    kw["token_type_ids"] = token_type_ids
                return self.inner(**kw).last_hidden_state

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings of branches constant for encoders
            ov_model = ov.convert_model(_Wrapper(hf), example_input={k: example[k] for k in names})
        ov_model.reshape({inp.get_any_name(): ov.PartialShape([-1, -1])
                          for inp in ov_model.inputs})
        ov_model.outputs[0].get_tensor().set_names({"token_embeddings"})
        return ov_model

    def _quantize_int8(self, ov_model):
        import nncf

        tok = self._torch.tokenizer
        items = []
        for t in calibration_texts():
            f = tok([t], truncation=True, max_length=self.max_seq_length, return_tensors="np")
            items.append({inp.get_any_name(): f[inp.get_any_name()] for inp in ov_model.inputs})
        return nncf.quantize(ov_model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(items))

    def _ir(self):
        """The cached IR for this (weights, precision), converting it once if missing."""
        import openvino as ov

        info = self._source_info()
        path = ir_dir(info["fingerprint"], self.precision)
        core = ov.Core()
        if (path / "model.xml").exists() and (path / "model.bin").exists():
            try:
                meta = json.loads((path / "meta.json").read_text())
                if meta.get("ir_format") == IR_FORMAT:
                    return core.read_model(str(path / "model.xml"))
                log.info("cached IR %s is an old format: converting again", path)
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("cached IR %s is unreadable (%s): converting again", path, e)
        with _convert_lock:
            t = time.perf_counter()
            stored = path.name.rsplit("-", 1)[1]
            fp32_dir = ir_dir(info["fingerprint"], "fp32")
            ov_model = None
            if stored == "int8" and (fp32_dir / "model.xml").exists():
                try:
                    ov_model = core.read_model(str(fp32_dir / "model.xml"))
                except RuntimeError:
                    ov_model = None
            if ov_model is None:
                log.info("converting embedder %s to OpenVINO (one time)", self.name)
                ov_model = self._convert_fp32()
            extra = {}
            if stored == "int8":
                log.info("quantising embedder %s to int8 with NNCF on %d passages (one time)",
                         self.name, CALIBRATION_SIZE)
                ov_model = self._quantize_int8(ov_model)
                import nncf

                extra = {"nncf": nncf.__version__, "calibration": "medquad_passages.jsonl",
                         "calibration_size": CALIBRATION_SIZE, "seed": CALIBRATION_SEED}
            self._save(ov_model, path, {
                "ir_format": IR_FORMAT, "fingerprint": info["fingerprint"],
                "precision": stored, "source": self.model_ref, "name": self.name,
                "openvino": ov.__version__, "seconds": round(time.perf_counter() - t, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})
            self.converted = True
            return ov_model

    @staticmethod
    def _save(ov_model, path: Path, meta: dict) -> None:
        """Write into a temporary sibling, then rename it into place (a concurrent writer that
        got there first wins; a stale or broken folder is replaced)."""
        import openvino as ov

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            ov.save_model(ov_model, str(tmp / "model.xml"), compress_to_fp16=False)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            if path.exists():
                old = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
                try:
                    os.replace(path, old)
                    shutil.rmtree(old, ignore_errors=True)
                except OSError:
                    pass
            try:
                os.replace(tmp, path)
            except OSError:  # another process put a fresh copy in place meanwhile
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _compile(self):
        if self._compiled is None:
            with self._load_lock:
                if self._compiled is None:
                    import openvino as ov

                    t = time.perf_counter()
                    ov_model = self._ir()
                    config = {"INFERENCE_NUM_THREADS": self.threads,
                              "PERFORMANCE_HINT": self.performance_hint,
                              "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16"
                              else "f32"}
                    self._input_names = [i.get_any_name() for i in ov_model.inputs]
                    self._compiled = ov.Core().compile_model(ov_model, "CPU", config)
                    self.load_seconds = time.perf_counter() - t
        return self._compiled

    def warm_up(self) -> "OpenVINOEmbedder":
        self._compile()
        return self

    # ---------- the Embedder interface ----------
    @property
    def dim(self) -> int:
        return int(self._source_info()["dim"])

    @property
    def tokenizer(self):
        self._source_info()
        return self._tokenizer

    @property
    def max_seq_length(self) -> int:
        return int(self._source_info()["max_seq_length"])

    @property
    def fingerprint(self) -> str:
        """The torch model's weight hash (backend and precision are recorded separately)."""
        return self._source_info()["fingerprint"]

    @property
    def cache_dir(self) -> Path:
        return ir_dir(self.fingerprint, self.precision)

    def describe(self) -> dict:
        return {"name": self.name, "ref": self.model_ref, "hash": self.fingerprint,
                "dim": self.dim, "normalized": True, "backend": self.backend,
                "precision": self.precision, "max_seq_length": self.max_seq_length}

    def _features(self, batch: list[str]) -> dict[str, np.ndarray]:
        f = self._tokenizer(batch, padding=True, truncation="longest_first",
                            max_length=self.max_seq_length, return_tensors="np")
        out = {}
        for name in self._input_names:
            if name in f:
                out[name] = f[name].astype(np.int64, copy=False)
            elif name == "token_type_ids":
                out[name] = np.zeros_like(f["input_ids"], dtype=np.int64)
            else:
                raise ValueError(f"the tokenizer gives no {name!r} for the OpenVINO model")
        return out

    def encode(self, texts: list[str], progress: bool = False,
               callback: ProgressFn | None = None, block: int = 1024) -> np.ndarray:
        """L2-normalised float32 embeddings, in input order. Texts are sorted by token length
        so each batch is padded only to its own longest text."""
        n = len(texts)
        compiled = self._compile()
        info = self._source_info()
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        if info["prompt"]:
            texts = [info["prompt"] + t for t in texts]
        lengths = [len(ids) for ids in self._tokenizer(
            list(texts), truncation=True, max_length=self.max_seq_length,
            return_attention_mask=False, return_token_type_ids=False)["input_ids"]]
        order = np.argsort([-x for x in lengths], kind="stable")
        modes = info["modes"]
        bar = tqdm(total=n, desc="embedding", unit="chunk", disable=not progress,
                   smoothing=0.05)

        def finish(hidden: np.ndarray, mask: np.ndarray, idx: np.ndarray) -> None:
            out[idx] = l2_normalize(pool(hidden, mask, modes))

        try:
            if self.performance_hint == "THROUGHPUT":
                import openvino as ov

                queue = ov.AsyncInferQueue(compiled)
                queue.set_callback(lambda req, ud: finish(req.get_output_tensor(0).data, *ud))
            else:
                request = compiled.create_infer_request()
            for s in range(0, n, block):
                blk = order[s:s + block]
                for b in range(0, len(blk), self.batch_size):
                    idx = blk[b:b + self.batch_size]
                    feats = self._features([texts[i] for i in idx])
                    if self.performance_hint == "THROUGHPUT":
                        queue.start_async(feats, (feats["attention_mask"], idx))
                    else:
                        finish(request.infer(feats)[0], feats["attention_mask"], idx)
                    bar.update(len(idx))
                if self.performance_hint == "THROUGHPUT":
                    queue.wait_all()
                if callback:
                    callback(min(s + block, n), n)
        finally:
            bar.close()
        return out
