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
    cached in the repo's models/ folder (gitignored) so it is converted once per machine."""
    root = tmp_path_factory.mktemp("rag")
    os.environ["RAG_INDEXES_DIR"] = str(root / "indexes")
    models = root / "models"
    models.mkdir()
    cache = REPO / "models" / "base"
    cache.mkdir(parents=True, exist_ok=True)
    (models / "base").symlink_to(cache, target_is_directory=True)
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
