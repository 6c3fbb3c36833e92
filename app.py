"""Gradio app: layout and event wiring only (the logic lives in rag_app)."""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gradio as gr  # noqa: E402

from rag_app.config import RetrievalConfig  # noqa: E402
from rag_app.index import index_path  # noqa: E402
from rag_app.pipeline import RagPipeline, build_index  # noqa: E402
from rag_app.present import DISCLAIMER, answer_markdown, sources_markdown  # noqa: E402


def make_app(index: str = "default", model: str = "base") -> gr.Blocks:
    pipe = RagPipeline(index, model, build_if_missing=False)

    def ensure_index(progress=gr.Progress()):
        if not (index_path(index) / "meta.json").exists():
            if index != "default":
                raise gr.Error(f"index '{index}' does not exist: build it with "
                               f"`rag index build --name {index} --source FILES`")
            progress(0, desc="Building the default medical index (first run only)")
            build_index("default", callback=lambda stage, done, total: progress(
                done / max(total, 1), desc=f"First run: {stage} {done}/{total} chunks"))
        return pipe

    def ask(question, top_k, progress=gr.Progress()):
        try:
            p = ensure_index(progress)
            p.retrieval = RetrievalConfig(top_k=int(top_k))
            p._retriever = None
            for ans in p.stream(question):
                yield answer_markdown(ans), sources_markdown(ans)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="Medical QA from evidence") as demo:
        gr.Markdown("# Medical questions, answered from sources\n"
                    "Answers are generated only from the retrieved passages, which are cited "
                    "as [1], [2]… and shown below.")
        with gr.Row():
            question = gr.Textbox(label="Question", lines=2, scale=5,
                                  placeholder="e.g. What are the symptoms of gout?")
            top_k = gr.Slider(1, 10, value=5, step=1, label="Sources", scale=1)
        btn = gr.Button("Ask", variant="primary")
        answer = gr.Markdown(label="Answer")
        gr.Markdown(f"<sub>⚕️ {DISCLAIMER}</sub>")
        sources = gr.Markdown(label="Sources")
        btn.click(ask, [question, top_k], [answer, sources], api_name="ask")
        question.submit(ask, [question, top_k], [answer, sources], api_name=False)
    return demo


def main() -> None:
    ap = argparse.ArgumentParser(description="Medical QA web app")
    ap.add_argument("--index", default="default")
    ap.add_argument("--model", default="base")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    ap.add_argument("--share", action="store_true", help="public gradio share link (off)")
    args = ap.parse_args()
    auth = None
    if os.environ.get("RAG_APP_AUTH"):  # "user:password"
        user, _, pw = os.environ["RAG_APP_AUTH"].partition(":")
        auth = (user, pw)
    make_app(args.index, args.model).queue(default_concurrency_limit=2).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth)


if __name__ == "__main__":
    main()
