"""Gradio app: layout and event wiring only (the logic lives in rag_app.ui_logic / ui_admin).

Tabs: Ask (base vs tuned answer on the same sources, ratings), Index (list, upload, rebuild,
choose), Fine-tune (background training job, promote / roll back), Evaluate (retrieval, and
base-vs-tuned answer quality).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import os
import tempfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gradio as gr  # noqa: E402

from rag_app import ui_admin as admin  # noqa: E402
from rag_app import ui_logic as ui  # noqa: E402
from rag_app.config import GenerationConfig  # noqa: E402
from rag_app.feedback import FeedbackStore  # noqa: E402
from rag_app.jobs import JobRunner  # noqa: E402
from rag_app.models import KINDS  # noqa: E402
from rag_app.qa_eval import QA_DATASETS  # noqa: E402

CSS = """<style>
.src {border-left: 3px solid #8aa; padding: 2px 10px; margin: 8px 0;}
.src mark {background: #fff3a3; color: inherit;}
.weak {background: #fff4e5; border: 1px solid #f0a040; padding: 6px 10px; border-radius: 6px;
       margin: 6px 0;}
.ans {white-space: normal; line-height: 1.5; min-height: 2em;}
.notice {color: #777;}
.disclaimer {color: #666;}
</style>"""


def _user_errors(fn):
    """ValueErrors (bad user input) become a clear message in the UI / API, no traceback."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*a, **k):
            try:
                yield from fn(*a, **k)
            except ValueError as e:
                raise gr.Error(str(e)) from None
        return gen

    @functools.wraps(fn)
    def call(*a, **k):
        try:
            return fn(*a, **k)
        except ValueError as e:
            raise gr.Error(str(e)) from None
    return call


def make_app(index: str = "default", model: str = "base",
             generation: GenerationConfig | None = None, feedback_db: str | None = None,
             jobs: JobRunner | None = None, max_upload_mb: float = admin.MAX_UPLOAD_MB,
             poll_s: float = 1.0) -> gr.Blocks:
    state = ui.AppState(index, model, generation or GenerationConfig(),
                        FeedbackStore(feedback_db))
    jobs = jobs or JobRunner()

    # ---------- handlers (thin: logic is in rag_app) ----------
    @_user_errors
    def ask(question, top_k, progress=gr.Progress()):
        if state.first_run is None:  # a missing non-default index: a clear error
            admin.ensure_index(state.index_name, progress)
        yield from state.ask(question, int(top_k))

    @_user_errors
    def rate(iid, which, rating):
        msg = ui.rate(state.feedback, iid, which, rating)
        return msg, ui.feedback_summary(state.feedback)

    @_user_errors
    def prefer(iid, choice):
        msg = ui.prefer(state.feedback, iid, choice)
        return msg, ui.feedback_summary(state.feedback)

    def export():
        path = os.path.join(tempfile.mkdtemp(prefix="prefs-"), "preferences.jsonl")
        n = state.feedback.export_preferences(path)
        return path, f"exported {n} preference pairs · {ui.feedback_summary(state.feedback)}"

    def indexes_view():
        names = admin.index_names()
        return (admin.indexes_table(state.index_name),
                gr.update(choices=names, value=state.index_name if state.index_name in names
                          else None))

    @_user_errors
    def set_index(name):
        if name not in admin.index_names():
            raise ValueError(f"index {name!r} does not exist: upload documents to create it")
        state.set_index(name)
        return (f"active index: **{name}**", *indexes_view())

    @_user_errors
    def upload(files, target, progress=gr.Progress()):
        paths = [getattr(f, "name", f) for f in (files or [])]
        msg = admin.upload(paths, target or state.index_name, max_upload_mb, progress)
        if (target or state.index_name) == state.index_name:
            state.reload_index()  # the grown index, same models
        return (msg, *indexes_view())

    @_user_errors
    def rebuild(name, progress=gr.Progress()):
        if name and name not in admin.index_names():
            raise ValueError(f"index {name!r} does not exist: pick one from the list")
        msg = admin.rebuild(name or state.index_name, progress)
        if (name or state.index_name) == state.index_name:
            state.reload_index()
        return (msg, *indexes_view())

    def recipes(kind):
        names = admin.recipes_for(jobs, kind)
        return gr.update(choices=names, value=names[0] if names else None)

    @_user_errors
    def start_job(kind, recipe, steps, lr, batch):
        return admin.start_job(jobs, kind, recipe, steps, lr, batch)

    @_user_errors
    def cancel_job():
        st = jobs.cancel()
        return f"cancelled job {st['id']}: the model registry is unchanged"

    def job_status():
        return admin.job_view(jobs)

    def first_run_banner():
        return state.first_run_text()

    @_user_errors
    def promote():
        msg = admin.promote(jobs)
        state.reload_models()  # the next answer uses the promoted model
        return msg, admin.models_table()

    @_user_errors
    def rollback(kind):
        msg = admin.rollback(kind)
        state.reload_models()
        return msg, admin.models_table()

    @_user_errors
    def run_eval(dataset, limit, modes, progress=gr.Progress()):
        progress(0, desc=f"evaluating {dataset}")
        table, result = admin.run_eval(state, dataset, limit, modes)
        return table, admin.eval_figure(result), admin.eval_history(state.feedback)

    @_user_errors
    def run_qa_eval(dataset, limit, progress=gr.Progress()):
        progress(0, desc=f"answering {dataset}")
        table, result = admin.run_qa_eval(state, dataset, limit, progress)
        return table, admin.qa_figure(result), admin.eval_history(state.feedback)

    # ---------- layout ----------
    with gr.Blocks(title="Medical QA from evidence") as demo:
        gr.HTML(CSS)
        gr.Markdown("# Medical questions, answered from sources")
        first_run = gr.Markdown(state.first_run_text(), elem_id="first-run-banner")
        with gr.Tab("Ask"):
            iid = gr.State(None)
            with gr.Row():
                question = gr.Textbox(label="Question", lines=2, scale=5,
                                      placeholder="e.g. What are the symptoms of gout?")
                top_k = gr.Slider(1, 10, value=5, step=1, label="Sources", scale=1)
            ask_btn = gr.Button("Ask", variant="primary")
            status = gr.HTML()
            with gr.Row(equal_height=False):
                with gr.Column():
                    gr.Markdown("### Base model")
                    base_out = gr.HTML(elem_id="base-answer")
                with gr.Column():
                    gr.Markdown("### Tuned model")
                    tuned_out = gr.HTML(elem_id="tuned-answer")
            gr.HTML(ui.disclaimer_html())
            with gr.Row():
                which = gr.Radio(["base", "tuned"], value="base", label="Rate the answer of")
                rating = gr.Radio([1, 2, 3, 4, 5], value=None, label="Rating (1-5)",
                                  elem_id="rating")
                rate_btn = gr.Button("Save rating")
            with gr.Row():
                choice = gr.Radio(["base", "tuned", "tie"], value=None,
                                  label="Which answer is better?")
                prefer_btn = gr.Button("Save preference")
            feedback_msg = gr.Markdown(elem_id="feedback-msg")
            gr.Markdown("### Sources")
            sources = gr.HTML(elem_id="sources")
            with gr.Accordion("Feedback data", open=False):
                summary = gr.Markdown(ui.feedback_summary(state.feedback))
                export_btn = gr.Button("Export preference pairs (jsonl)")
                export_file = gr.File(label="preference pairs", interactive=False)

        with gr.Tab("Index"):
            index_msg = gr.Markdown(f"active index: **{state.index_name}**")
            indexes = gr.Dataframe(admin.indexes_table(state.index_name), interactive=False,
                                   label="Indexes")
            with gr.Row():
                index_choice = gr.Dropdown(admin.index_names(), value=state.index_name,
                                           label="Index", allow_custom_value=True)
                use_btn = gr.Button("Use this index")
                rebuild_btn = gr.Button("Rebuild it")
                refresh_btn = gr.Button("Refresh list")
            files = gr.File(label=f"Documents ({', '.join(admin.UPLOAD_TYPES)}; at most "
                            f"{max_upload_mb:g} MB each)", file_count="multiple",
                            file_types=list(admin.UPLOAD_TYPES))
            target = gr.Textbox(value=state.index_name, label="Add to index (new or existing)")
            upload_btn = gr.Button("Upload and index", variant="primary")

        with gr.Tab("Fine-tune"):
            kinds = admin.training_kinds(jobs)
            with gr.Row():
                kind = gr.Dropdown(kinds, value=kinds[0] if kinds else None,
                                   label="Training type")
                first = admin.recipes_for(jobs, kinds[0]) if kinds else []
                # the choices follow the training type; JobRunner checks the name itself
                recipe = gr.Dropdown(first, value=first[0] if first else None, label="Recipe",
                                     allow_custom_value=True)
            with gr.Row():
                steps = gr.Number(0, precision=0, label="Steps (0 = recipe)")
                lr = gr.Number(0, label="Learning rate (0 = recipe)")
                batch = gr.Number(0, precision=0, label="Batch size (0 = recipe)")
            with gr.Row():
                start_btn = gr.Button("Start training", variant="primary")
                cancel_btn = gr.Button("Cancel", variant="stop")
            job_msg = gr.Markdown()
            job_md = gr.Markdown(elem_id="job-status")
            loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=260)
            metrics = gr.Dataframe(label="Metrics before / after", interactive=False)
            with gr.Row():
                promote_btn = gr.Button("Promote the new model", variant="primary")
                rb_kind = gr.Dropdown(list(KINDS), value="relevance", label="Roll back kind")
                rollback_btn = gr.Button("Roll back")
            models = gr.Dataframe(admin.models_table(), label="Registered models",
                                  interactive=False)
            timer = gr.Timer(poll_s)

        with gr.Tab("Evaluate"):
            with gr.Row():
                dataset = gr.Dropdown(list(admin.EVAL_DATASETS), value=admin.EVAL_DATASETS[0],
                                      label="Dataset")
                limit = gr.Number(50, precision=0, label="Queries (limit)")
                modes = gr.CheckboxGroup(["bm25", "dense", "hybrid"],
                                         value=["bm25", "dense", "hybrid"], label="Modes")
            eval_btn = gr.Button("Run retrieval evaluation", variant="primary")
            eval_table = gr.Dataframe(label="Results", interactive=False)
            eval_plot = gr.Plot(label="Recall@10 / MRR@10 / nDCG@10")
            gr.Markdown("### Answer quality: base vs tuned generator on held-out questions")
            with gr.Row():
                qa_dataset = gr.Dropdown(list(QA_DATASETS), value=QA_DATASETS[0],
                                         label="QA dataset")
                qa_limit = gr.Number(10, precision=0,
                                     label=f"Questions (1-{admin.MAX_QA_EVAL})")
            qa_btn = gr.Button("Run QA evaluation")
            qa_table = gr.Dataframe(label="QA results", interactive=False)
            qa_plot = gr.Plot(label="Accuracy / ROUGE-L / token F1 / citations")
            history = gr.Dataframe(admin.eval_history(state.feedback), label="History",
                                   interactive=False)

        # ---------- events (every one with an explicit api_name) ----------
        ask_out = [status, sources, base_out, tuned_out, iid]
        ask_btn.click(ask, [question, top_k], ask_out, api_name="ask")
        question.submit(ask, [question, top_k], ask_out, api_name="ask_submit",
                        api_visibility="private")
        rate_btn.click(rate, [iid, which, rating], [feedback_msg, summary], api_name="rate")
        prefer_btn.click(prefer, [iid, choice], [feedback_msg, summary], api_name="prefer")
        export_btn.click(export, None, [export_file, summary], api_name="export_preferences")
        refresh_btn.click(indexes_view, None, [indexes, index_choice], api_name="list_indexes")
        use_btn.click(set_index, index_choice, [index_msg, indexes, index_choice],
                      api_name="set_index")
        rebuild_btn.click(rebuild, index_choice, [index_msg, indexes, index_choice],
                          api_name="rebuild")
        upload_btn.click(upload, [files, target], [index_msg, indexes, index_choice],
                         api_name="upload")
        kind.change(recipes, kind, recipe, api_name="recipes")
        start_btn.click(start_job, [kind, recipe, steps, lr, batch], job_msg,
                        api_name="start_job")
        cancel_btn.click(cancel_job, None, job_msg, api_name="cancel_job")
        job_out = [job_md, loss_plot, metrics]
        timer.tick(job_status, None, job_out, api_name="job_status", show_progress="hidden")
        timer.tick(first_run_banner, None, first_run, api_name="first_run_status",
                   show_progress="hidden")
        demo.load(job_status, None, job_out, api_name="job_status_on_load",
                  api_visibility="private")
        promote_btn.click(promote, None, [job_msg, models], api_name="promote")
        rollback_btn.click(rollback, rb_kind, [job_msg, models], api_name="rollback")
        eval_btn.click(run_eval, [dataset, limit, modes], [eval_table, eval_plot, history],
                       api_name="run_eval")
        qa_btn.click(run_qa_eval, [qa_dataset, qa_limit], [qa_table, qa_plot, history],
                     api_name="run_qa_eval")
    demo.rag_state = state  # for tests and benchmarks: the shared pipelines
    demo.rag_jobs = jobs
    return demo


def main() -> None:
    ap = argparse.ArgumentParser(description="Medical QA web app")
    ap.add_argument("--index", default="default")
    ap.add_argument("--model", default="base")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    ap.add_argument("--share", action="store_true", help="public gradio share link (off)")
    ap.add_argument("--auth", help="require a login, 'user:password' (or RAG_APP_AUTH)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    args = ap.parse_args()
    auth = None
    spec = args.auth or os.environ.get("RAG_APP_AUTH")
    if spec:
        user, sep, pw = spec.partition(":")
        if not sep or not user or not pw:
            ap.error("--auth / RAG_APP_AUTH must be 'user:password'")
        auth = (user, pw)
    app = make_app(args.index, args.model, GenerationConfig(max_new_tokens=args.max_new_tokens))
    app.queue(default_concurrency_limit=2).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth,
        max_file_size=f"{admin.MAX_UPLOAD_MB}mb")


if __name__ == "__main__":
    main()
