"""Files (jsonl, txt, md, html, pdf) and the default medical corpus -> Documents.

Unreadable, empty or malformed inputs are reported by name (never by content) and skipped:
one bad file or line never stops a build.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .config import shared_data_dir
from .types import Document

SUPPORTED = (".jsonl", ".txt", ".md", ".markdown", ".html", ".htm", ".pdf")
MAX_FILE_BYTES = 200 * 1024 * 1024


@dataclass
class IngestReport:
    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file or file:line, why)

    def extend(self, other: "IngestReport") -> None:
        self.documents.extend(other.documents)
        self.skipped.extend(other.skipped)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {e.start}); re-save it as UTF-8") from None


def _html_to_text(html: str) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    text = soup.get_text("\n", strip=True)
    return title, text


def _pdf_to_text(path: Path) -> str:
    from pypdf import PdfReader

    try:
        reader = PdfReader(str(path))
        return "\n".join((page.extract_text() or "") for page in reader.pages)
    except Exception as e:  # pypdf raises many types for broken files
        raise ValueError(f"unreadable PDF ({type(e).__name__})") from None


def _md_title(text: str) -> str:
    m = re.search(r"^#\s+(.+)$", text, flags=re.M)
    return m.group(1).strip() if m else ""


def _jsonl(path: Path, doc_prefix: str) -> IngestReport:
    rep = IngestReport()
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            rep.skipped.append((where, f"malformed JSON ({e.msg})"))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            rep.skipped.append((where, "no string 'text' field"))
            continue
        if not rec["text"].strip():
            rep.skipped.append((where, "empty text"))
            continue
        doc_id = str(rec.get("id") or rec.get("pid") or f"{doc_prefix}:{lineno}")
        meta = {k: v for k, v in rec.items() if k not in ("id", "text", "title")
                and isinstance(v, (str, int, float, bool))}
        rep.documents.append(Document(doc_id, rec["text"], str(rec.get("title") or ""),
                                      str(path), meta))
    return rep


def load_file(path: Path, root: Path | None = None) -> IngestReport:
    """One file -> Documents. Ids are the path relative to `root` (stable across machines)."""
    path = Path(path)
    rel = path.relative_to(root).as_posix() if root else path.name
    rep = IngestReport()
    suffix = path.suffix.lower()
    try:
        if suffix not in SUPPORTED:
            raise ValueError(f"unsupported type {suffix!r}; supported: {', '.join(SUPPORTED)}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES // 2**20} MiB")
        if suffix == ".jsonl":
            return _jsonl(path, rel)
        if suffix == ".pdf":
            title, text = path.stem, _pdf_to_text(path)
        elif suffix in (".html", ".htm"):
            title, text = _html_to_text(_read_text(path))
            title = title or path.stem
        else:
            text = _read_text(path)
            title = _md_title(text) if suffix in (".md", ".markdown") else ""
            title = title or path.stem
    except (OSError, ValueError) as e:
        rep.skipped.append((str(path), str(e)))
        return rep
    if not text.strip():
        rep.skipped.append((str(path), "no text found (empty file or scanned PDF)"))
        return rep
    rep.documents.append(Document(rel, text, title, str(path)))
    return rep


def load_paths(paths: Iterable[str | Path]) -> IngestReport:
    """Files or folders (searched recursively, sorted for stable order) -> Documents."""
    rep = IngestReport()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            for f in files:
                rep.extend(load_file(f, root=p))
        elif p.is_file():
            rep.extend(load_file(p))
        else:
            rep.skipped.append((str(p), "no such file or folder"))
    seen: set[str] = set()
    unique = []
    for d in rep.documents:
        if d.id in seen:
            rep.skipped.append((d.id, "duplicate id (kept the first)"))
            continue
        seen.add(d.id)
        unique.append(d)
    rep.documents = unique
    return rep


def _iter_jsonl(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def default_corpus(data_dir: Path | None = None) -> list[Document]:
    """MedQuAD answers + PubMedQA abstract sections from ../shared/data (about 19.8k)."""
    data_dir = Path(data_dir or shared_data_dir())
    mq = data_dir / "medquad" / "medquad_passages.jsonl"
    pq = data_dir / "pubmedqa" / "pqal_passages.jsonl"
    for f in (mq, pq):
        if not f.exists():
            raise ValueError(f"default corpus file {f} is missing: put the project's shared data "
                             "beside the repo (../shared/data) or set RAG_SHARED_DATA")
    docs = [Document(r["pid"], r["text"], r["title"], "medquad",
                     {"question": r.get("question", ""), "qtype": r.get("qtype", ""),
                      "url": r.get("url", "")})
            for r in _iter_jsonl(mq) if r.get("text", "").strip()]
    docs += [Document(r["pid"], r["text"], f"PubMed {r['pmid']} ({r.get('section', '').lower()})",
                      "pubmedqa", {"pmid": r["pmid"], "section": r.get("section", "")})
             for r in _iter_jsonl(pq) if r.get("text", "").strip()]
    return docs
