"""Built-in evaluation datasets from ../shared/data, and the held-out splits training must
never see. Splits are deterministic (a hash of the focus title or the PubMed id) and saved
in rag_app/splits/ so that they never move when the code changes."""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import shared_data_dir

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
MEDQUAD_TEST_FILE = SPLITS_DIR / "medquad_test_titles.txt"
PUBMEDQA_HELDOUT_FILE = SPLITS_DIR / "pubmedqa_heldout_pmids.txt"
MEQSUM_HELDOUT_FILE = SPLITS_DIR / "meqsum_heldout_files.txt"
DATASETS = ("pubmedqa-trainval", "medquad-test", "medquad-dev")


@dataclass
class RetrievalDataset:
    name: str
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, set[str]] = field(default_factory=dict)  # query id -> relevant doc ids


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise ValueError(f"{path} is missing: put the shared data beside the repo "
                         "(../shared/data) or set RAG_SHARED_DATA")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _bucket(key: str, n: int) -> int:
    return int(hashlib.sha1(key.strip().lower().encode()).hexdigest(), 16) % n


def medquad_records() -> list[dict]:
    return _jsonl(shared_data_dir() / "medquad" / "medquad_passages.jsonl")


def medquad_test_titles() -> set[str]:
    """About 10% of MedQuAD foci (titles): a disease is never on both sides of the split."""
    if not MEDQUAD_TEST_FILE.exists():
        titles = sorted({r["title"] for r in medquad_records() if _bucket(r["title"], 10) == 0})
        SPLITS_DIR.mkdir(exist_ok=True)
        MEDQUAD_TEST_FILE.write_text("\n".join(titles) + "\n", encoding="utf-8")
    return set(MEDQUAD_TEST_FILE.read_text(encoding="utf-8").splitlines()) - {""}


def is_medquad_test(title: str) -> bool:
    return title in medquad_test_titles()


def pubmedqa_records() -> list[dict]:
    return _jsonl(shared_data_dir() / "pubmedqa" / "pqal_trainval.jsonl")


def pubmedqa_heldout_pmids() -> set[str]:
    """A fixed 20% fold of PubMedQA trainval (100 questions) kept for QA evaluation."""
    if not PUBMEDQA_HELDOUT_FILE.exists():
        pmids = sorted(r["pmid"] for r in pubmedqa_records() if _bucket(r["pmid"], 5) == 0)
        SPLITS_DIR.mkdir(exist_ok=True)
        PUBMEDQA_HELDOUT_FILE.write_text("\n".join(pmids) + "\n", encoding="utf-8")
    return set(PUBMEDQA_HELDOUT_FILE.read_text(encoding="utf-8").splitlines()) - {""}


def meqsum_records() -> list[dict]:
    """MeQSum: {"File", "CHQ" (consumer health question), "Summary"} (1,000 rows)."""
    return _jsonl(shared_data_dir() / "meqsum" / "meqsum.jsonl")


def meqsum_heldout_files() -> set[str]:
    """A fixed ~1/8 of MeQSum (by a hash of the row's File, 127 rows) kept for summarisation
    evaluation: `rag train summarize` never trains on it."""
    if not MEQSUM_HELDOUT_FILE.exists():
        files = sorted(r["File"] for r in meqsum_records() if _bucket(r["File"], 8) == 0)
        SPLITS_DIR.mkdir(exist_ok=True)
        MEQSUM_HELDOUT_FILE.write_text("\n".join(files) + "\n", encoding="utf-8")
    return set(MEQSUM_HELDOUT_FILE.read_text(encoding="utf-8").splitlines()) - {""}


def load_retrieval_dataset(name: str, limit: int | None = None) -> RetrievalDataset:
    if name == "pubmedqa-trainval":
        queries = {r["pmid"]: r["question"] for r in pubmedqa_records()}
        qrels: dict[str, set[str]] = {}
        with open(shared_data_dir() / "pubmedqa" / "pqal_qrels_trainval.tsv") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if int(row["grade"]) > 0:
                    qrels.setdefault(row["query_id"], set()).add(row["passage_id"])
    elif name in ("medquad-test", "medquad-dev"):
        # dev: a fixed ~10% of the TRAINING-side foci, for choosing settings (fusion weight);
        # results on it are never reported as evaluation results
        test = medquad_test_titles()
        keep = ((lambda t: t in test) if name == "medquad-test"
                else (lambda t: t not in test and _bucket(t, 10) == 1))
        queries, qrels, by_text = {}, {}, {}
        for r in medquad_records():
            if not keep(r["title"]) or not r.get("question"):
                continue
            key = (r["title"], r["question"].strip())
            qid = by_text.setdefault(key, r["pid"])
            queries[qid] = r["question"].strip()
            qrels.setdefault(qid, set()).add(r["pid"])
    else:
        raise ValueError(f"unknown dataset {name!r}: choose one of {DATASETS} or pass "
                         "--queries FILE --qrels FILE")
    ids = sorted(q for q in queries if q in qrels)
    if limit:
        ids = ids[:limit]
    return RetrievalDataset(name, {q: queries[q] for q in ids}, {q: qrels[q] for q in ids})


def load_retrieval_files(queries_file: str, qrels_file: str) -> RetrievalDataset:
    """queries: jsonl {"id", "question"|"text"}; qrels: tsv query_id, passage_id[, grade]."""
    queries = {}
    for r in _jsonl(Path(queries_file)):
        queries[str(r["id"])] = r.get("question") or r.get("text")
    qrels: dict[str, set[str]] = {}
    with open(qrels_file, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or parts[0] == "query_id":
                continue
            if len(parts) > 2 and parts[2].strip() and float(parts[2]) <= 0:
                continue
            qrels.setdefault(parts[0], set()).add(parts[1])
    ids = [q for q in queries if q in qrels]
    if not ids:
        raise ValueError(f"no query in {queries_file} has a relevant passage in {qrels_file}")
    return RetrievalDataset(Path(queries_file).stem, {q: queries[q] for q in ids},
                            {q: qrels[q] for q in ids})
