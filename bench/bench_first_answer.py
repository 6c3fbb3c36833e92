"""Time from `python app.py` on a fresh install (no index yet) to the first answered question,
and to hybrid retrieval. The app is started as a subprocess with empty index and feedback
folders (the converted base checkpoint is reused: converting the GGUF is a one-off per machine,
timed separately by bench_generate.py); a gradio_client asks as soon as the server answers.

Baseline in the same run (with --wait-hybrid): the plain path without the progressive first
run, i.e. a first answer only once the dense index is on disk; the ratio is printed.

    .venv/bin/python bench/bench_first_answer.py [--wait-hybrid] [--port 7871]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
Q = "What are the symptoms of gout?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=7871)
    ap.add_argument("--wait-hybrid", action="store_true",
                    help="keep asking until the dense index is built (minutes)")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-first-"))
    models = tmp / "models"
    models.mkdir()
    (models / "base").symlink_to(REPO / "models" / "base", target_is_directory=True)
    env = os.environ | {"RAG_INDEXES_DIR": str(tmp / "indexes"),
                        "RAG_FEEDBACK_DB": str(tmp / "feedback.sqlite"),
                        "RAG_JOBS_DIR": str(tmp / "jobs"), "RAG_MODELS_DIR": str(models),
                        "PORT": str(args.port)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py")], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from gradio_client import Client

    result: dict = {}
    try:
        client = None
        while client is None:
            if proc.poll() is not None:
                raise SystemExit(f"app exited with {proc.returncode}")
            try:
                client = Client(f"http://127.0.0.1:{args.port}/", verbose=False)
            except Exception:
                time.sleep(0.5)
        result["server_up_s"] = round(time.perf_counter() - t0, 1)
        t = time.perf_counter()
        status, sources, base, _ = client.predict(Q, 3, api_name="/ask")
        result["first_answer_s"] = round(time.perf_counter() - t0, 1)
        result["first_answer_request_s"] = round(time.perf_counter() - t, 1)
        result["first_answer_keyword_only"] = "keyword search" in status
        assert 'class="src"' in sources and "latency" in base, "incomplete answer"
        print(f"server up {result['server_up_s']} s; first answer {result['first_answer_s']} s "
              f"after start (keyword-only: {result['first_answer_keyword_only']})")
        if args.wait_hybrid:
            while time.perf_counter() - t0 < args.timeout:
                banner = client.predict(api_name="/first_run_status")
                if not banner:
                    break
                time.sleep(5)
            result["dense_index_ready_s"] = round(time.perf_counter() - t0, 1)
            status, *_ = client.predict(Q, 3, api_name="/ask")
            result["hybrid_answer_s"] = round(time.perf_counter() - t0, 1)
            result["hybrid_after_build"] = "keyword search" not in status
            result["speedup_first_answer_vs_blocking_build"] = round(
                result["dense_index_ready_s"] / result["first_answer_s"], 1)
            print(f"dense index ready {result['dense_index_ready_s']} s; a blocking first run "
                  f"would answer {result['speedup_first_answer_vs_blocking_build']}x later")
    finally:
        proc.terminate()
        proc.wait(30)
    save("first_answer", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
