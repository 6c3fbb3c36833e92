"""The packaged generator: GGUF conversion, loading, generation and streaming with real data."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rag_app import generate as gen  # noqa: E402
from rag_app.config import GenerationConfig  # noqa: E402
from rag_app.generate import (BASE_NAME, Generator, HFGenerator,  # noqa: E402
                              ensure_base_checkpoint, resolve_generator_path)
from rag_app.types import Source  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "models"  # the conversion is cached here, once per machine
os.environ.setdefault("RAG_BASE_CACHE", str(CACHE))  # "base" resolves to the cached conversion
PASSAGES = [  # two real MedQuAD passages (NIHSeniorHealth), abridged
    ("NIHSeniorHealth_0000027_Sec3", "Glaucoma",
     "Glaucoma can develop in one or both eyes. The most common type of glaucoma, open-angle "
     "glaucoma, has no symptoms at first. It causes no pain, and vision seems normal. Without "
     "treatment, people with glaucoma will slowly lose their peripheral, or side vision. They "
     "seem to be looking through a tunnel. Over time, straight-ahead vision may decrease until "
     "no vision remains."),
    ("NIHSeniorHealth_0000036_Sec2", "High Blood Pressure",
     "High blood pressure is a common disease in which blood flows through blood vessels "
     "(arteries) at higher than normal pressures. High blood pressure often has no symptoms."),
]


@pytest.fixture(scope="session")
def base_path():
    return ensure_base_checkpoint(CACHE)


@pytest.fixture(scope="session")
def generator(base_path):
    g = HFGenerator("base", config=GenerationConfig(max_new_tokens=40))
    g.warm_up()
    return g


@pytest.fixture
def sources():
    return [Source(i, f"{pid}#0", pid, title, text, 0.9 - i / 10)
            for i, (pid, title, text) in enumerate(PASSAGES, start=1)]


def test_conversion_is_idempotent_and_recorded(base_path):
    assert base_path == CACHE / "base" / BASE_NAME
    info = json.loads((base_path / "conversion.json").read_text())
    assert info["source_file"] == gen.GGUF_FILE and len(info["sha256"]) == 64 and info["date"]
    stamp = (base_path / "model.safetensors").stat().st_mtime
    with pytest.MonkeyPatch.context() as mp:  # cached: a second call converts nothing
        mp.setattr(gen, "_convert_gguf", lambda *a: pytest.fail("converted a second time"))
        assert ensure_base_checkpoint(CACHE) == base_path
    assert (base_path / "model.safetensors").stat().st_mtime == stamp
    assert resolve_generator_path("base") == str(ensure_base_checkpoint())
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (base_path / name).is_file()
    assert "quantization_config" not in json.loads((base_path / "config.json").read_text())


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    calls = []

    def fake_convert(out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")
        (out / gen.CONVERSION_FILE).write_text("{}")

    monkeypatch.setattr(gen, "_convert_gguf", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_base_checkpoint(tmp_path)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    target = tmp_path / "base" / BASE_NAME
    assert results[0] == target and (target / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == [BASE_NAME]


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gen, "_convert_gguf", broken)
    with pytest.raises(RuntimeError):
        ensure_base_checkpoint(tmp_path)
    assert [p.name for p in (tmp_path / "base").iterdir() if not p.name.endswith(".lock")] == []


def test_incomplete_checkpoint_folder_is_reported(tmp_path):
    (tmp_path / "base" / BASE_NAME).mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{BASE_NAME}.*delete the folder"):
        ensure_base_checkpoint(tmp_path)


def test_loaded_checkpoint(generator, base_path):
    assert isinstance(generator, Generator)
    assert generator.name == "base" and generator.base_path == str(base_path)
    n_params = sum(p.numel() for p in generator.model.parameters())
    assert 130e6 < n_params < 140e6
    assert generator.tokenizer.pad_token_id is not None
    assert not generator.model.training


def test_generate_answers_from_real_sources(generator, sources):
    t0 = time.perf_counter()
    text = generator.generate("What are the symptoms of glaucoma?", sources)
    seconds = time.perf_counter() - t0
    usage = generator.last_usage
    print(f"\n{usage['new_tokens']} tokens in {seconds:.1f} s "
          f"({usage['new_tokens'] / usage['seconds']:.1f} tokens/s): {text!r}")
    assert text and text == text.strip() and "<|im_end|>" not in text
    assert 0 < usage["new_tokens"] <= 40  # speed is bench/bench_generate.py's, not a test's
    assert any(w in text.lower() for w in ("vision", "glaucoma", "eye"))


def test_stream_grows_to_generate(generator, sources):
    question = "What is high blood pressure?"
    parts = list(generator.stream(question, sources))
    assert len(parts) > 3
    for before, after in zip(parts, parts[1:]):
        assert after.startswith(before) and len(after) > len(before)
    assert parts[-1] == generator.generate(question, sources)


def test_stream_can_stop_early(generator, sources, monkeypatch):
    made, generate = [], generator.model.generate

    def counting(**kwargs):  # how many tokens the generation thread went on to make
        out = generate(**kwargs)
        made.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out
    monkeypatch.setattr(generator.model, "generate", counting)
    stream = generator.stream("What is glaucoma?", sources)
    first = next(stream)
    stream.close()  # stops the generation thread instead of letting it finish
    assert first and len(made) == 1
    generator.generate("What is glaucoma?", sources)  # the same answer, run to its end
    assert len(made) == 2 and 0 < made[0] < made[1]


def test_generate_from_prompt_is_raw(generator):
    prompt = generator.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True)
    assert "Paris" in generator.generate_from_prompt(prompt)


def test_question_too_long(generator, sources):
    with pytest.raises(ValueError, match="max_question_chars"):
        generator.generate("x" * 3000, sources)


def test_constructor_is_cheap_and_validates(tmp_path):
    g = HFGenerator("/no/such/model")  # nothing loaded yet
    assert g.name == "/no/such/model" and g._model is None
    with pytest.raises(ValueError, match="model=''"):
        HFGenerator("")
    with pytest.raises(ValueError, match="adapter="):
        HFGenerator("base", adapter=str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="model='tuned'"):
        HFGenerator("tuned", adapter=str(tmp_path))
    with pytest.raises(ValueError, match="config="):
        HFGenerator("base", config={"max_new_tokens": 5})


def test_bad_paths_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="/no/such/model"):
        HFGenerator("/no/such/model").warm_up()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{broken}"):
        HFGenerator(str(broken)).warm_up()
