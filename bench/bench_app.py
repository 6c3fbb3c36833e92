"""Ask latency of the Gradio app under 8 concurrent API clients, without and with a training
job running in the background (the Fine-tune tab's worker process); prints p50/p95 and the
ratio. Loopback only, a bounded number of requests, every request must succeed.

    .venv/bin/python bench/bench_app.py [--clients 8] [--requests 2] [--max-new-tokens 24]
                                        [--trainer fake|real]

`fake` (default) is a niced worker that trains a small torch MLP on the JobRunner's thread
budget for the whole phase, like a real job; `real` runs `rag train relevance` with
training/recipes/relevance-tiny.yaml (restarted if it finishes early).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile, save  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["What are the symptoms of gout?", "How is glaucoma treated?",
             "What causes shingles?", "What are the symptoms of shingles?",
             "How is gout diagnosed?", "What is glaucoma?", "Who gets gout?",
             "Can shingles be prevented?"]

BURNER = textwrap.dedent('''
    import argparse, json, time, torch
    ap = argparse.ArgumentParser(); ap.add_argument("kind"); ap.add_argument("--recipe")
    ap.add_argument("--progress-file"); ap.add_argument("--output"); a = ap.parse_args()
    net = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1))
    opt = torch.optim.AdamW(net.parameters(), 1e-4); x = torch.randn(256, 512); y = torch.randn(256, 1)
    step = 0
    while True:  # until cancelled
        loss = torch.nn.functional.mse_loss(net(x), y); opt.zero_grad(); loss.backward(); opt.step()
        step += 1
        if step % 20 == 0:
            with open(a.progress_file, "a") as f:
                f.write(json.dumps({"event": "step", "step": step, "total": 10**9,
                                    "loss": float(loss), "time": time.time()}) + "\\n")
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_phase(url: str, clients: int, requests: int) -> dict:
    from gradio_client import Client

    lat, errors = [], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def worker(i: int) -> None:
        c = Client(url, verbose=False)
        barrier.wait()
        for r in range(requests):
            q = QUESTIONS[(i + r * clients) % len(QUESTIONS)]
            t = time.perf_counter()
            try:
                out = c.predict(q, 3, api_name="/ask")
                assert 'class="src"' in out[1] and "latency" in out[2], "incomplete answer"
                with lock:
                    lat.append(time.perf_counter() - t)
            except Exception as e:  # counted, reported, and fails the benchmark
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(lat) + len(errors), "failed": len(errors), "errors": errors[:5],
            "p50_s": round(percentile(lat, 50), 2) if lat else None,
            "p95_s": round(percentile(lat, 95), 2) if lat else None,
            "wall_s": round(wall, 1), "throughput_rps": round(len(lat) / wall, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2, help="per client and phase (<= 10)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--trainer", choices=["fake", "real"], default="fake")
    args = ap.parse_args()
    if not 1 <= args.requests <= 10 or not 1 <= args.clients <= 32:
        ap.error("use 1..32 clients and 1..10 requests per client")

    tmp = Path(tempfile.mkdtemp(prefix="bench-app-"))
    os.environ["RAG_INDEXES_DIR"] = str(tmp / "indexes")
    os.environ["RAG_FEEDBACK_DB"] = str(tmp / "feedback.sqlite")
    os.environ["RAG_JOBS_DIR"] = str(tmp / "jobs")
    models = tmp / "models"
    models.mkdir()
    (REPO / "models" / "base").mkdir(parents=True, exist_ok=True)
    (models / "base").symlink_to(REPO / "models" / "base", target_is_directory=True)
    os.environ["RAG_MODELS_DIR"] = str(models)
    sys.path.insert(0, str(REPO))

    from app import make_app
    from rag_app.config import GenerationConfig
    from rag_app.jobs import JobRunner
    from rag_app.pipeline import build_index

    build_index("bench", [str(REPO / "tests" / "data" / "corpus.jsonl")], progress=False)
    if args.trainer == "fake":
        script = tmp / "burner.py"
        script.write_text(BURNER)
        recipes = tmp / "recipes"
        recipes.mkdir()
        (recipes / "relevance-tiny.yaml").write_text("max_steps: 1\n")
        runner = JobRunner(command=lambda k, r, p, o: [sys.executable, str(script), k,
                                                       "--recipe", r, "--progress-file", p,
                                                       "--output", o], recipes_dir=recipes)
        recipe = "relevance-tiny.yaml"
    else:
        runner, recipe = JobRunner(), "relevance-tiny.yaml"

    demo = make_app("bench", generation=GenerationConfig(max_new_tokens=args.max_new_tokens),
                    jobs=runner)
    port = free_port()
    demo.queue(default_concurrency_limit=2).launch(server_name="127.0.0.1", server_port=port,
                                                   prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        run_phase(url, 2, 1)  # warm-up: models loaded, not measured
        idle = run_phase(url, args.clients, args.requests)
        print(f"without a job: {idle}")
        stop = threading.Event()
        runner.start("relevance", recipe)

        def keep_running():  # a real tiny job can finish early: restart it
            while not stop.wait(1.0):
                st = runner.status()
                if st and st["status"] not in ("starting", "running"):
                    runner.start("relevance", recipe)

        keeper = threading.Thread(target=keep_running, daemon=True)
        keeper.start()
        time.sleep(3)  # let the worker start burning CPU
        busy = run_phase(url, args.clients, args.requests)
        stop.set()
        keeper.join()
        print(f"with a job:    {busy}")
        if (runner.status() or {}).get("status") in ("starting", "running"):
            runner.cancel()
    finally:
        demo.close()
    ratio = (busy["p50_s"] / idle["p50_s"]) if idle["p50_s"] and busy["p50_s"] else None
    result = {"clients": args.clients, "requests_per_client": args.requests,
              "max_new_tokens": args.max_new_tokens, "trainer": args.trainer,
              "without_job": idle, "with_job": busy,
              "p50_ratio_with_vs_without": round(ratio, 2) if ratio else None,
              "p95_ratio_with_vs_without": round(busy["p95_s"] / idle["p95_s"], 2)
              if idle["p95_s"] and busy["p95_s"] else None}
    print(f"p50 {idle['p50_s']} s -> {busy['p50_s']} s with a training job "
          f"(ratio {result['p50_ratio_with_vs_without']}); p95 {idle['p95_s']} s -> "
          f"{busy['p95_s']} s; failures {idle['failed'] + busy['failed']}")
    save(f"bench_app_{args.trainer}", result)
    return 1 if idle["failed"] or busy["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
