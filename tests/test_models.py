"""Model registry: register, activate, rollback, resolve, and its error messages."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rag_app.models import ModelRegistry  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def model_dir(root: Path, name: str, adapter: bool = False, base: str = "base") -> Path:
    path = root / name
    path.mkdir(parents=True)
    if adapter:
        (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    else:
        (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def reg(tmp_path):
    return ModelRegistry(tmp_path / "models")


def test_empty_registry(reg):
    assert reg.list() == [] and reg.active("generator") is None
    assert not reg.file.exists()  # reading never creates the file


def test_register_get_list(reg):
    p = model_dir(reg.root, "gen-a")
    entry = reg.register("gen-a", "generator", p, base_model="base", training_type="instruct",
                         metrics={"rougeL": 0.31}, manifest={"seed": 1})
    assert entry["path"] == str(p)
    got = reg.get("gen-a")
    assert got["kind"] == "generator" and got["metrics"] == {"rougeL": 0.31}
    assert got["training_type"] == "instruct" and got["manifest"] == {"seed": 1} and got["created"]
    raw = json.loads(reg.file.read_text())
    assert raw["models"]["gen-a"]["path"] == "gen-a"  # stored relative to the registry folder
    reg.register("rel-a", "relevance", model_dir(reg.root, "rel-a"))
    assert [e["name"] for e in reg.list()] == ["gen-a", "rel-a"]
    assert [e["name"] for e in reg.list("relevance")] == ["rel-a"]
    assert reg.active("generator") is None  # registering does not activate
    # a second instance (another process) sees the same state
    assert ModelRegistry(reg.root).get("rel-a")["kind"] == "relevance"


def test_register_validates(reg, tmp_path):
    p = model_dir(tmp_path, "m")
    with pytest.raises(ValueError, match="kind='decoder'"):
        reg.register("m", "decoder", p)
    with pytest.raises(ValueError, match="not a directory"):
        reg.register("m", "generator", tmp_path / "missing")
    for bad in ("tuned", "base", "", "a b", "../x"):
        with pytest.raises(ValueError, match="name="):
            reg.register(bad, "generator", p)
    reg.register("m", "generator", p)
    with pytest.raises(ValueError, match="already registered as a generator"):
        reg.register("m", "relevance", p)
    with pytest.raises(ValueError, match="not registered.*'m'"):
        reg.get("other")


def test_activate_and_rollback(reg):
    for name in ("v1", "v2", "v3"):
        reg.register(name, "generator", model_dir(reg.root, name))
    reg.set_active("generator", "v1")
    reg.register("v2", "generator", reg.root / "v2", activate=True)
    reg.set_active("generator", "v3")
    reg.set_active("generator", "v3")  # no-op: no duplicate in the history
    assert reg.active("generator")["name"] == "v3"
    assert json.loads(reg.file.read_text())["history"]["generator"] == ["v1", "v2"]
    assert reg.rollback("generator")["name"] == "v2"
    assert reg.active("generator")["name"] == "v2"
    assert reg.rollback("generator")["name"] == "v1"
    assert reg.rollback("generator") is None  # back to the base model
    assert reg.active("generator") is None
    with pytest.raises(ValueError, match="no active generator"):
        reg.rollback("generator")


def test_every_kind_can_roll_back_from_the_cli(reg, monkeypatch, capsys):
    from rag_app import cli
    from rag_app.models import KINDS

    monkeypatch.setenv("RAG_MODELS_DIR", str(reg.root))
    for kind in KINDS:
        for name in ("a", "b"):
            reg.register(f"{kind}-{name}", kind, model_dir(reg.root, f"{kind}-{name}"),
                         activate=True)
        assert cli.main(["model", "rollback", kind]) == 0
        assert reg.active(kind)["name"] == f"{kind}-a"


def test_set_active_checks_kind_and_name(reg):
    reg.register("r1", "relevance", model_dir(reg.root, "r1"))
    with pytest.raises(ValueError, match="is a relevance model, not a generator"):
        reg.set_active("generator", "r1")
    with pytest.raises(ValueError, match="not registered"):
        reg.set_active("relevance", "nope")
    assert reg.active("relevance") is None  # failed updates write nothing


def test_corrupt_registry(reg):
    reg.root.mkdir(parents=True)
    reg.file.write_text('{"models": {"a": ')
    with pytest.raises(ValueError, match=f"{reg.file}.*corrupt"):
        reg.list()
    with pytest.raises(ValueError, match="corrupt"):
        reg.register("x", "generator", model_dir(reg.root, "x"))
    assert reg.file.read_text() == '{"models": {"a": '  # left as it was
    reg.file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="corrupt"):
        reg.active("generator")


def test_tuned_without_registration(reg):
    with pytest.raises(ValueError, match="no tuned generator is registered yet.*rag train instruct"):
        reg.resolve_generator("tuned")


def test_resolve_generator(reg, tmp_path, monkeypatch):
    base_ckpt = str(REPO / "models" / "base" / "smollm2-135m-instruct")
    monkeypatch.setenv("RAG_BASE_CACHE", str(REPO / "models"))  # converted once per machine
    base, adapter, name = reg.resolve_generator("base")
    assert (base, adapter, name) == (base_ckpt, None, "base")
    assert reg.resolve_generator("default")[0] == base_ckpt

    full = model_dir(tmp_path, "full-model")
    reg.register("full-v1", "generator", full, base_model="base", activate=True)
    assert reg.resolve_generator("tuned") == (str(full), None, "full-v1")

    lora = model_dir(reg.root, "lora-v2", adapter=True, base="/elsewhere/smollm2-135m-instruct")
    reg.register("lora-v2", "generator", lora, base_model="", activate=True)
    assert reg.resolve_generator("tuned") == (base_ckpt, str(lora), "lora-v2")
    assert reg.resolve_generator("full-v1") == (str(full), None, "full-v1")  # by name

    # local folders: full model, and adapter whose base is a HF id
    assert reg.resolve_generator(str(full)) == (str(full), None, "full-model")
    other = model_dir(tmp_path, "hub-lora", adapter=True, base="HuggingFaceTB/SmolLM2-360M")
    assert reg.resolve_generator(str(other)) == ("HuggingFaceTB/SmolLM2-360M", str(other),
                                                 "hub-lora")
    assert reg.resolve_generator("Org/some-model") == ("Org/some-model", None, "Org/some-model")
    with pytest.raises(ValueError, match="not an existing directory"):
        reg.resolve_generator("/no/such/dir")

    reg.register("rel", "relevance", model_dir(tmp_path, "rel"))
    with pytest.raises(ValueError, match="not a generator"):
        reg.resolve_generator("rel")

    reg.rollback("generator")
    assert reg.resolve_generator("tuned")[2] == "full-v1"
    full.rename(tmp_path / "moved")
    with pytest.raises(ValueError, match="does not exist.*rollback"):
        reg.resolve_generator("tuned")
