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


# -- rag model soup

@pytest.fixture(scope="module")
def soup_registry(registry, tmp_path_factory):
    """lora-a (rank 4, q/v) and lora-b (rank 2, q/k/v, other seed), souped 0.25/0.75 once
    through the CLI into "ab-soup" (RAG_MODELS_DIR is the registry's, set by `registry`)."""
    from conftest import make_tiny_adapter

    b = make_tiny_adapter(tmp_path_factory.mktemp("lora-b") / "b", seed=1, r=2,
                          targets=("q_proj", "k_proj", "v_proj"))
    registry.register("lora-b", "generator", b, base_model="base", training_type="instruct")
    assert main(["model", "soup", "lora-a", "lora-b", "--weights", "0.25,0.75",
                 "--register", "ab-soup"]) == 0
    return registry


def _merged_state(base_path, adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


def test_soup_weights_are_the_weighted_mean_of_the_models(soup_registry):
    """Merged into the base, the soup's every weight is 0.25 x lora-a's merged weight + 0.75 x
    lora-b's (a model soup), including k_proj, which only lora-b adapts."""
    import torch

    from rag_app.generate import ensure_base_checkpoint

    base_path = ensure_base_checkpoint(REPO / "models")
    entry = soup_registry.get("ab-soup")
    assert is_adapter_dir(entry["path"]) and entry["training_type"] == "instruct"
    manifest = json.loads((Path(entry["path"]) / "manifest.json").read_text())
    assert manifest["souped_from"] == ["lora-a", "lora-b"] and manifest["weights"] == [0.25, 0.75]
    assert not [p for p in Path(entry["path"]).parent.iterdir() if p.name.startswith(".")]
    sa = _merged_state(base_path, soup_registry.get("lora-a")["path"])
    sb = _merged_state(base_path, soup_registry.get("lora-b")["path"])
    ss = _merged_state(base_path, entry["path"])
    assert ss.keys() == sa.keys()
    moved = 0
    for key, w in ss.items():
        assert torch.allclose(w, 0.25 * sa[key] + 0.75 * sb[key], atol=1e-5), key
        moved += not torch.allclose(sa[key], sb[key])
    assert moved >= 3 * 30  # q, k and v of every layer differ between the two models
    assert soup_registry.resolve_generator("ab-soup")[1] == entry["path"]


def test_soup_errors(soup_registry, tmp_path, capsys):
    from rag_app.models import soup_adapters

    reg = soup_registry
    with pytest.raises(ValueError, match="two or more different adapters"):
        soup_adapters(["lora-a"], "x", registry=reg)
    with pytest.raises(ValueError, match="two or more different adapters"):
        soup_adapters(["lora-a", "lora-a"], "x", registry=reg)
    with pytest.raises(ValueError, match="summing to 1"):
        soup_adapters(["lora-a", "lora-b"], "x", [0.5, 0.6], registry=reg)
    with pytest.raises(ValueError, match="summing to 1"):
        soup_adapters(["lora-a", "lora-b"], "x", [1.5, -0.5], registry=reg)
    with pytest.raises(ValueError, match="'lora-a-merged' is not a LoRA generator adapter"):
        soup_adapters(["lora-a", "lora-a-merged"], "x", registry=reg)
    with pytest.raises(ValueError, match="already exists"):
        soup_adapters(["lora-a", "lora-b"], "x", out=tmp_path, registry=reg)
    with pytest.raises(ValueError, match="name='tuned' is invalid"):
        soup_adapters(["lora-a", "lora-b"], "tuned", registry=reg)
    other = tmp_path / "other-base"
    make_b = json.loads((Path(reg.get("lora-b")["path"]) / "adapter_config.json").read_text())
    other.mkdir()
    for f in Path(reg.get("lora-b")["path"]).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "adapter_config.json").write_text(json.dumps(
        {**make_b, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-360M-Instruct"}))
    reg.register("lora-c", "generator", other)
    with pytest.raises(ValueError, match="different base models"):
        soup_adapters(["lora-a", "lora-c"], "x", registry=reg)
    assert main(["model", "soup", "lora-a", "lora-b", "--weights", "half,half",
                 "--register", "y"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--weights='half,half' is invalid" in err
    assert "Traceback" not in err
    assert not (reg.root / "generator" / "x").exists() and "y" not in {
        e["name"] for e in reg.list()}
