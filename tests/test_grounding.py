"""`rag eval grounding`: the rates on hand-made answers (saying so when the gold is absent,
over-refusal when present, raw citation validity, citing the gold), the prompts (held-out or
validation groups only, half without the gold, the app's passage count), and the command end
to end on the real base generator (JSON + PNG)."""
import json

import pytest

from rag_app.prompts import NO_ANSWER
from rag_app.types import Source
from training.data import InstructExample
from training.grounding import grounding_metrics


def _ex(source, gold, n=3):
    srcs = [Source(k, f"p{k}#0", f"p{k}", f"t{k}", f"text {k}", 0.0) for k in range(1, n + 1)]
    return InstructExample("q", source, "g", "question?", srcs, "", gold)


def test_rates_on_handmade_answers():
    items = [_ex("pubmedqa", []), _ex("medquad", []),  # gold absent
             _ex("pubmedqa", [2]), _ex("medquad", [1]), _ex("medquad", [3]), _ex("pubmedqa", [1])]
    answers = [NO_ANSWER, "Aspirin helps [1].",  # says so once of two absent
               "Yes. It works [2].",  # answers, cites the gold
               "The sources provided do not mention it.",  # over-refusal (a variant)
               "It is common [1][7].",  # cites a non-gold source and an invalid number
               "No. Nothing cited."]  # answers without citing
    m = grounding_metrics(answers, items)
    assert (m["n"], m["n_gold_absent"], m["n_gold_present"]) == (6, 2, 4)
    assert m["says_so_when_absent"] == 0.5
    assert m["refuses_when_present"] == 0.25
    assert m["citation_validity"] == pytest.approx(5 / 6)
    assert m["cites_when_answering"] == pytest.approx(2 / 3)
    assert m["cites_gold"] == pytest.approx(1 / 3)
    only_absent = grounding_metrics([NO_ANSWER], [_ex("medquad", [])])
    assert only_absent["says_so_when_absent"] == 1.0 and only_absent["refuses_when_present"] is None
    with pytest.raises(ValueError, match="same length"):
        grounding_metrics([NO_ANSWER], items)


def test_prompts_are_split_side_only_half_without_gold_with_the_apps_passage_count():
    from transformers import AutoTokenizer

    from rag_app.config import RetrievalConfig
    from rag_app.datasets import pubmedqa_heldout_pmids
    from rag_app.generate import ensure_base_checkpoint
    from training.grounding import grounding_items
    from training.instruct import InstructConfig

    tok = AutoTokenizer.from_pretrained(ensure_base_checkpoint())
    held = pubmedqa_heldout_pmids()
    for split in ("eval", "val"):
        items = grounding_items(InstructConfig(), tok, 20, split)
        assert len(items) == 20 and sum(e.gold_absent for e in items) == 10
        assert {e.source for e in items} == {"pubmedqa", "medquad"}
        assert all(len(e.sources) == RetrievalConfig().top_k for e in items)
        pm = {e.group for e in items if e.source == "pubmedqa"}
        assert pm <= held if split == "eval" else not pm & held
    assert len(grounding_items(InstructConfig(), tok, 4, "eval", n_sources=2)[0].sources) == 2
    with pytest.raises(ValueError, match="never on train"):
        grounding_items(InstructConfig(), tok, 4, "train")


@pytest.mark.slow
@pytest.mark.parametrize("gate", [None, "cosine"])
def test_grounding_command_end_to_end(tmp_path, capsys, gate):
    from rag_app.cli import main
    from rag_app.pipeline import WEAK_EVIDENCE_TEXT

    out = tmp_path / "grounding.json"
    assert main(["eval", "grounding", "--model", "base", "--n", "4", "--n-sources", "2",
                 "--max-new-tokens", "8", "--batch-size", "4", "--split", "val",
                 "--out", str(out)] + (["--gate", gate] if gate else [])) == 0
    res = json.loads(out.read_text())
    m = res["models"]["base"]
    assert m["n"] == 4 and m["n_gold_absent"] == 2 and len(m["rows"]) == 4
    assert res["n_sources"] == 2 and res["split"] == "val" and res["max_new_tokens"] == 8
    if gate:  # a gated prompt gets the app's weak-evidence text, the others the generator's
        assert res["gate"]["scorer"] == "bi-encoder cosine"
        for r in m["rows"]:
            assert (r["answer"] == WEAK_EVIDENCE_TEXT) == (r["gate_score"] < 0.35) == r["gated"]
        assert m["says_so_when_absent"] >= res["gate"]["blocks_when_absent"]
    else:
        assert "gate" not in res and "gated" not in m["rows"][0]
    assert all(len(r["answer"].split()) <= 8 or r.get("gated") for r in m["rows"])
    assert set(m["by_source"]) == {"pubmedqa", "medquad"}
    assert out.with_suffix(".png").is_file()
    assert "says so|absent" in capsys.readouterr().out


def test_gate_scores_the_passages_as_the_app_does():
    """The cosine gate (the app without a relevance classifier): a prompt holding the
    question's own answer passage scores above the app's threshold, one holding only passages
    about other things below it."""
    from rag_app.rerank import COSINE_WEAK
    from training.grounding import gate_rates, gate_scores

    def ex(texts, gold):
        srcs = [Source(k, f"p{k}#0", f"p{k}", "", t, 0.0) for k, t in enumerate(texts, 1)]
        return InstructExample("q", "medquad", "g", "What are the symptoms of glaucoma?",
                               srcs, "", gold)

    items = [ex(["Glaucoma often has no symptoms at first; later, side vision is lost and "
                 "eye pain or blurred vision may occur.", "Knee replacement surgery."], [1]),
             ex(["Knee replacement surgery replaces a damaged joint.",
                 "Tax returns are due in April."], [])]
    best, threshold, kind = gate_scores(items)
    assert (threshold, kind) == (COSINE_WEAK, "bi-encoder cosine")
    assert best[0] >= threshold > best[1]
    rates = gate_rates(best, items, threshold)
    assert (rates["blocks_when_absent"], rates["blocks_when_present"]) == (1.0, 0.0)
    assert rates["median_score_present"] == pytest.approx(best[0])


def test_gate_only_scores_the_gate_without_a_generator(tmp_path, capsys):
    from rag_app.cli import main

    out = tmp_path / "gate.json"
    assert main(["eval", "grounding", "--gate", "cosine", "--gate-only", "--n", "6",
                 "--split", "val", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    g = res["gate"]
    assert res["models"] == {} and res["n"] == 6 and g["scorer"] == "bi-encoder cosine"
    assert set(g["by_source"]) == {"pubmedqa", "medquad"}
    assert 0 <= g["blocks_when_absent"] <= 1 and g["median_score_present"] > 0
    assert out.with_suffix(".png").is_file() and "gate only" in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs a gate"):
        from training.grounding import eval_grounding
        from training.instruct import InstructConfig

        eval_grounding([], InstructConfig(), 4, gate_only=True)
