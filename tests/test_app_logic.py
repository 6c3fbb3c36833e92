"""The UI logic without a server: escaping, citation links, highlights, upload checks."""
import pytest

from rag_app import ui_admin as admin
from rag_app import ui_logic as ui
from rag_app.types import Answer, Source

EVIL = '<script>alert(1)</script> ![x](http://evil.example/p.png) <img src=x onerror=alert(1)>'
SOURCES = [Source(1, "gout#0", "gout", "Gout <b>", "Gout is arthritis. Uric acid crystals form "
                  "in the joints and cause sudden pain. " + EVIL, 0.71),
           Source(2, "flu#0", "flu", "Flu", "Flu causes fever.", 0.4)]


def test_sources_and_answers_are_escaped_data():
    ans = Answer("q", "Crystals of uric acid cause sudden joint pain [1]. " + EVIL + " [7]",
                 SOURCES, ["gout#0"], "base<i>")
    for out in (ui.answer_html(ans), ui.sources_html(SOURCES, [ans])):
        assert "<script" not in out and "<img" not in out and "<b>[1] Gout <b>" not in out
        assert "&lt;script&gt;" in out
    a = ui.answer_html(ans)
    assert '<a class="cite" href="#src-1">[1]</a>' in a and "[7]" in a and "#src-7" not in a
    assert "base&lt;i&gt;" in a


def test_supporting_sentence_of_a_cited_source_is_highlighted():
    ans = Answer("q", "Uric acid crystals in the joints cause sudden pain [1].", SOURCES,
                 ["gout#0"], "base")
    html = ui.sources_html(SOURCES, [ans])
    assert "<mark>Uric acid crystals form in the joints and cause sudden pain.</mark>" in html
    assert "<mark>Gout is arthritis.</mark>" not in html
    assert "cited by base" in html and html.count("<mark>") == 1


def test_weak_evidence_banner_and_latency():
    weak = Answer("q", "I could not find sources", SOURCES, [], "base", True,
                  timings_ms={"total": 1234.0})
    out = ui.answer_html(weak)
    assert "Weak evidence" in out and "latency 1.2 s" in out


@pytest.mark.parametrize("name,safe", [("../../etc/passwd.txt", "passwd.txt"),
                                       ("My Notes (v2)!.MD", "My_Notes_v2.md"),
                                       (".bashrc.txt", "bashrc.txt"), ("<x>.html", "x.html"),
                                       ("...", "document")])
def test_safe_filenames(name, safe):
    assert admin.safe_filename(name) == safe


def test_upload_checks_name_every_refused_file(tmp_path):
    (tmp_path / "a.exe").write_text("MZ")
    (tmp_path / "big.txt").write_text("x" * 3000)
    (tmp_path / "empty.md").write_text("")
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(ValueError) as e:
        admin.check_uploads([str(tmp_path / n) for n in ("a.exe", "big.txt", "empty.md",
                                                         "ok.txt")], max_mb=0.001)
    msg = str(e.value)
    assert "a.exe: type .exe is not accepted" in msg
    assert "big.txt" in msg and "0.001 MB limit" in msg and "empty.md: the file is empty" in msg
    assert "ok.txt" not in msg
    assert admin.check_uploads([str(tmp_path / "ok.txt")]) == [(str(tmp_path / "ok.txt"),
                                                                 "ok.txt")]
    with pytest.raises(ValueError, match="no file uploaded"):
        admin.check_uploads([])


def test_metrics_table_before_after():
    t = admin.metrics_table({"before": {"auc": 0.5}, "after": {"auc": 0.75}, "after_f1": 0.6})
    rows = t.to_dict("records")
    assert rows[0] == {"metric": "auc", "before": 0.5, "after": 0.75, "change": 0.25}
    assert rows[1]["metric"] == "f1" and rows[1]["after"] == 0.6
