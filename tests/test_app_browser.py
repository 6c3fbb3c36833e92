"""The app in a real browser (Playwright + Debian's chromium): ask, see both answers and the
sources, rate one; saves docs/screenshot.png. Skipped when chromium or playwright is missing
(CI: `apt-get install -y chromium` and `pip install playwright`, never `playwright install`)."""
import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("RAG_CHROMIUM", "/usr/lib/chromium/chromium")
REPO = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"chromium not found at {CHROMIUM}: apt-get install -y chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright missing: pip install playwright")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(small_index, tmp_path_factory):
    from app import make_app
    from rag_app.config import GenerationConfig
    from test_jobs import fake_runner

    tmp = tmp_path_factory.mktemp("browser")
    demo = make_app("small", generation=GenerationConfig(max_new_tokens=40),
                    feedback_db=str(tmp / "fb.sqlite"), jobs=fake_runner(tmp))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                        quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_ask_compare_and_rate_in_a_browser(url, tmp_path):
    expect = sync_api.expect
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(
                "http://127.0.0.1") else r.abort())
            page.goto(url)
            box = page.get_by_label("Question")
            expect(box).to_be_visible(timeout=30_000)
            box.fill("What are the symptoms of gout?")
            page.get_by_role("button", name="Ask", exact=True).click()
            base = page.locator("#base-answer")
            expect(base.locator(".meta")).to_contain_text("latency", timeout=120_000)
            expect(base.locator(".ans")).not_to_be_empty()
            expect(page.locator("#tuned-answer")).to_contain_text("No tuned model yet")
            expect(page.locator("#sources .src").first).to_contain_text("Gout")
            expect(page.get_by_text("not medical advice", exact=False)).to_be_visible()
            page.screenshot(path=str(tmp_path / "answered.png"), full_page=True)
            page.locator("#rating").get_by_text("5", exact=True).click()
            page.get_by_role("button", name="Save rating").click()
            expect(page.locator("#feedback-msg")).to_contain_text("rated 5/5", timeout=30_000)
            shot = REPO / "docs" / "screenshot.png"
            shot.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(tmp_path / "shot.png"), full_page=True)
            shutil.copyfile(tmp_path / "shot.png", shot)
            for tab in ("Index", "Fine-tune", "Evaluate"):
                page.get_by_role("tab", name=tab).click()
            expect(page.get_by_role("button", name="Run retrieval evaluation")).to_be_visible()
        finally:
            browser.close()
