"""`rag model merge`: a real LoRA adapter folded into its base is a standalone checkpoint with
the adapter's logits (not the base's), registered as a generator; clear errors for what cannot
be merged; `rag model list|activate|rollback`."""
import json
from pathlib import Path

import pytest

from rag_app.cli import main
from rag_app.models import ModelRegistry, is_adapter_dir, merge_adapter

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Gout is a form of arthritis caused by"


@pytest.fixture(scope="module")
def registry(tiny_adapter, tmp_path_factory):
    """A registry of its own holding the adapter "lora-a", merged once through the CLI."""
    root = tmp_path_factory.mktemp("merge") / "models"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAG_MODELS_DIR", str(root))
        mp.setenv("RAG_BASE_CACHE", str(REPO / "models"))  # the base, converted once per machine
        reg = ModelRegistry()
        reg.register("lora-a", "generator", tiny_adapter, base_model="base",
                     training_type="instruct", metrics={"eval_loss": 1.5})
        assert main(["model", "merge", "lora-a", "--activate"]) == 0
        yield reg


def _next_token_logits(model, tokenizer):
    import torch

    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        return model(**ids).logits[0, -1]


def test_merged_checkpoint_matches_the_adapter(registry, tiny_adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rag_app.generate import ensure_base_checkpoint

    path = registry.root / "generator" / "lora-a-merged"
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not is_adapter_dir(path)
    assert json.loads((path / "manifest.json").read_text())["merged_from"] == "lora-a"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    tokenizer = AutoTokenizer.from_pretrained(path)
    merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert not isinstance(merged, PeftModel)
    base_path = ensure_base_checkpoint(REPO / "models")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    lm = _next_token_logits(merged, tokenizer)
    lb = _next_token_logits(base, tokenizer)
    adapted = PeftModel.from_pretrained(base, str(tiny_adapter)).eval()
    la = _next_token_logits(adapted, tokenizer)
    assert torch.allclose(lm, la, atol=1e-4), float((lm - la).abs().max())
    assert float((lm - lb).abs().max()) > 1e-2


def test_merged_entry_is_registered_and_active(registry):
    entry = registry.get("lora-a-merged")
    assert entry["kind"] == "generator" and entry["manifest"]["merged_from"] == "lora-a"
    assert entry["training_type"] == "instruct" and entry["metrics"] == {"eval_loss": 1.5}
    assert registry.active("generator")["name"] == "lora-a-merged"
    assert registry.resolve_generator("tuned") == (entry["path"], None, "lora-a-merged")


def test_merge_errors(registry, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="'lora-a-merged' is not a LoRA adapter.*standalone"):
        merge_adapter("lora-a-merged", registry=registry)
    with pytest.raises(ValueError, match="'nope' is not registered"):
        merge_adapter("nope", registry=registry)
    registry.register("rel", "relevance", tmp_path)
    with pytest.raises(ValueError, match="relevance model: only generator adapters"):
        merge_adapter("rel", registry=registry)
    with pytest.raises(ValueError, match="already exists"):
        merge_adapter("lora-a", out=tmp_path, registry=registry)
    with pytest.raises(ValueError, match="name='tuned' is invalid"):
        merge_adapter("lora-a", new_name="tuned", registry=registry)
    monkeypatch.setenv("RAG_MODELS_DIR", str(registry.root))
    assert main(["model", "merge", "lora-a-merged"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a LoRA adapter" in err and "Traceback" not in err


def test_model_list_activate_rollback(registry, monkeypatch, capsys):
    monkeypatch.setenv("RAG_MODELS_DIR", str(registry.root))
    assert main(["model", "list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(r.startswith("* lora-a-merged") for r in rows)
    assert any(r.startswith("  lora-a ") for r in rows)
    assert main(["model", "activate", "lora-a"]) == 0
    assert "active generator model: lora-a" in capsys.readouterr().out
    assert registry.active("generator")["name"] == "lora-a"
    assert main(["model", "rollback", "generator"]) == 0
    assert registry.active("generator")["name"] == "lora-a-merged"
    assert main(["model", "activate", "nope"]) == 2
    assert "not registered" in capsys.readouterr().err
