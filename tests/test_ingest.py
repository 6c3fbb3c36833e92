import json

from rag_app.ingest import default_corpus, load_paths

from pdfutil import write_pdf


def _make_folder(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("Gout is a form of arthritis caused by uric acid crystals.")
    (d / "b.md").write_text("# Asthma basics\n\nAsthma inflames and narrows the airways.")
    (d / "sub" / "c.html").write_text(
        "<html><head><title>Anemia</title><script>var x=1;</script></head>"
        "<body><p>Anemia means too few red blood cells.</p></body></html>")
    write_pdf(d / "d.pdf", "Glaucoma damages the optic nerve.")
    (d / "e.jsonl").write_text(
        json.dumps({"id": "x1", "title": "Shingles", "text": "Shingles is a painful rash."}) + "\n"
        + "{not json\n"
        + json.dumps({"title": "no text"}) + "\n"
        + json.dumps({"text": "Osteoporosis makes bones weak."}) + "\n")
    (d / "bad.txt").write_bytes(b"caf\xe9 latin-1 text \xff\xfe")
    (d / "empty.md").write_text("   \n")
    (d / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (d / "image.png").write_bytes(b"\x89PNG")
    return d


def test_every_format_is_read_and_bad_files_are_reported_by_name(tmp_path):
    rep = load_paths([_make_folder(tmp_path)])
    by_id = {d.id: d for d in rep.documents}
    assert set(by_id) == {"a.txt", "b.md", "sub/c.html", "d.pdf", "x1", "e.jsonl:4"}
    assert by_id["b.md"].title == "Asthma basics"
    assert by_id["sub/c.html"].title == "Anemia"
    assert "var x" not in by_id["sub/c.html"].text
    assert "optic nerve" in by_id["d.pdf"].text
    assert by_id["x1"].title == "Shingles"
    skipped = dict(rep.skipped)
    assert "UTF-8" in next(v for k, v in skipped.items() if k.endswith("bad.txt"))
    assert "malformed JSON" in skipped["e.jsonl:2"]
    assert "text" in skipped["e.jsonl:3"]
    assert any(k.endswith("empty.md") for k in skipped)
    assert any(k.endswith("broken.pdf") for k in skipped)
    assert "unsupported" in next(v for k, v in skipped.items() if k.endswith("image.png"))


def test_ids_are_stable_and_relative(tmp_path):
    d = _make_folder(tmp_path)
    first = [x.id for x in load_paths([d]).documents]
    moved = tmp_path / "elsewhere"
    d.rename(moved)
    assert [x.id for x in load_paths([moved]).documents] == first


def test_missing_path_and_duplicate_ids(tmp_path):
    f = tmp_path / "dup.jsonl"
    f.write_text(json.dumps({"id": "1", "text": "one"}) + "\n" + json.dumps({"id": "1", "text": "two"}) + "\n")
    rep = load_paths([f, tmp_path / "nope.txt"])
    assert [d.text for d in rep.documents] == ["one"]
    assert any("no such file" in why for _, why in rep.skipped)
    assert any("duplicate" in why for _, why in rep.skipped)


def test_default_corpus_is_medquad_plus_pubmedqa():
    docs = default_corpus()
    assert 19_000 < len(docs) < 20_500
    assert len({d.id for d in docs}) == len(docs)
    assert {d.source for d in docs} == {"medquad", "pubmedqa"}
