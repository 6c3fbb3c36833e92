import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def _isolated_dirs(tmp_path_factory):
    """Indexes and the model registry go to a temporary folder; the converted base model is
    and OpenVINO embedder are cached in the repo's models/ folder (gitignored) so they are
    converted once per machine."""
    root = tmp_path_factory.mktemp("rag")
    os.environ["RAG_INDEXES_DIR"] = str(root / "indexes")
    models = root / "models"
    models.mkdir()
    cache = REPO / "models" / "base"
    cache.mkdir(parents=True, exist_ok=True)
    (models / "base").symlink_to(cache, target_is_directory=True)
    ov_cache = REPO / "models" / "openvino"  # the OpenVINO query embedder, converted once
    ov_cache.mkdir(parents=True, exist_ok=True)
    (models / "openvino").symlink_to(ov_cache, target_is_directory=True)
    os.environ["RAG_MODELS_DIR"] = str(models)
    yield root


@pytest.fixture(scope="session")
def embedder():
    from rag_app.embed import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder().warm_up()


@pytest.fixture(scope="session")
def small_index(embedder, _isolated_dirs):
    """A real index of 96 real passages (MedQuAD + PubMedQA) built with the packaged MiniLM."""
    from rag_app.pipeline import build_index

    index, report = build_index("small", [str(DATA / "corpus.jsonl")], embedder=embedder,
                                progress=False)
    assert not report.skipped
    return index


@pytest.fixture(scope="module")
def tokenizer():
    """The generator's tokenizer (the packaged SmolLM2, converted once)."""
    from transformers import AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint

    return AutoTokenizer.from_pretrained(ensure_base_checkpoint())


@pytest.fixture(scope="module")
def tiny_examples(tokenizer):
    """24 instruction examples rendered with the serving prompt (training/data.py)."""
    from training.data import instruction_examples

    return instruction_examples(tokenizer, 24, n_sources=2, max_prompt_tokens=240, seed=0)


def make_tiny_adapter(out, seed: int = 0, r: int = 4, targets=("q_proj", "v_proj")):
    """Save a real LoRA adapter (peft) over the packaged base checkpoint to `out`. Its B
    weights are random, not zero (init_lora_weights=False), so it changes the logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rag_app.generate import ensure_base_checkpoint

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(ensure_base_checkpoint(), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                     init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory):
    """A real LoRA adapter over the packaged base checkpoint (make_tiny_adapter, seed 0)."""
    return make_tiny_adapter(tmp_path_factory.mktemp("lora") / "tiny-adapter")
