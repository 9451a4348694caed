"""The app in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium).

One app (python app.py in a subprocess) and one browser for the module. Screenshots of every
tab go to artifacts/screenshots/ for a person to look at.

Chromium: `apt-get install -y chromium` (root). Without it these tests are skipped with a message saying
so, except under CI (CI=true), where they fail.
"""

import os
from pathlib import Path

import pytest

from tests.app.app_server import REPO, app_folders, launch_app, stop_app, stop_training

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = REPO / "artifacts" / "screenshots"
TINY_MODEL = {"n-layer": "2", "n-head": "2", "n-embd": "32", "block-size": "32", "batch-size": "16",
              "max-iters": "100000", "eval-interval": "10"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, repo_data, tiny_phi):
    root = tmp_path_factory.mktemp("browser-app")
    ckpts, data, work = app_folders(root, repo_data)
    app = launch_app(root, ["--checkpoints", ckpts, "--story-ckpt", ckpts / "tiny-story", "--base", tiny_phi,
                            "--adapter", "none", "--data-dir", data, "--work-dir", work, "--device", "cpu"])
    app.ckpts, app.work, app.base_name = ckpts, work, tiny_phi.name
    yield app
    stop_training(work)
    stop_app(app)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        why = (f"Chromium not found at {CHROMIUM}: `bash scripts/setup-tests.sh` installs it as root (apt); "
               "without root, ask for `apt-get install chromium` or run `pytest -m 'not browser'`")
        if os.environ.get("CI"):
            pytest.fail(why)  # CI must run the browser tests, never skip them
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(app, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(app.url)
    page.wait_for_selector("#story-generate")
    yield page
    page.close()


def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def wait_for_text(page, selector, text, timeout=60_000):
    """Wait until the element shows `text`; on failure say what it showed, and keep a screenshot."""
    from playwright.sync_api import TimeoutError

    try:
        page.wait_for_function("([sel, text]) => (document.querySelector(sel)?.innerText || '').includes(text)",
                               arg=[selector, text], timeout=timeout)
    except TimeoutError:
        shot(page, "failure")
        shown = page.locator(selector).first.inner_text() if page.locator(selector).count() else "(no such element)"
        pytest.fail(f"{selector} did not show {text!r} within {timeout / 1000:.0f} s; it shows {shown[:500]!r}")


def open_tab(page, name):
    page.get_by_role("tab", name=name).click()


def test_story_streams_text(page):
    prompt = page.locator("#story-output textarea")
    page.locator("#story-generate").click()
    wait_for_text(page, "#story-note", "done")
    assert prompt.input_value().startswith("Dorothy looked at the Scarecrow and said")
    assert len(prompt.input_value()) > len("Dorothy looked at the Scarecrow and said") + 100
    wait_for_text(page, "#story-model-status", "loaded on cpu")
    shot(page, "story")


def test_chat_answers_and_the_history_survives_a_reload(page):
    open_tab(page, "Assistant")
    page.get_by_text("Sampling settings").click()
    page.locator("#chat-max-new input[type=number]").fill("16")
    page.locator("#chat-max-new input[type=number]").press("Enter")
    page.locator("#chat-message textarea").fill("Hello there, assistant!")
    page.locator("#chat-send").click()
    wait_for_text(page, "#chat-status", "tokens/s")
    bot = page.locator("#chatbot")
    assert "Hello there, assistant!" in bot.inner_text()
    assert bot.locator(".bot").count() >= 1 or bot.locator("[data-testid='bot']").count() >= 1
    wait_for_text(page, "#chat-model-status", "loaded on cpu")
    shot(page, "assistant")
    page.reload()
    page.wait_for_selector("#story-generate")
    open_tab(page, "Assistant")
    wait_for_text(page, "#chatbot", "Hello there, assistant!")


def assert_loss_lines_drawn(page):
    """Both loss lines are drawn with a colour and a legend, and the plot no longer warns of empty data.

    The page was opened before the run had any data: a plot whose first frame was empty kept its lines
    without a colour (axes, but no lines), so a first-ever run looked broken."""
    warnings = []
    page.on("console", lambda m: warnings.append(m.text) if "Infinite extent" in m.text else None)
    page.wait_for_function("[...document.querySelectorAll('#train-plot g.mark-line path')]"
                           ".filter(p => (p.getAttribute('d') || '').length > 20).length >= 2", timeout=60_000)
    lines = page.evaluate("[...document.querySelectorAll('#train-plot g.mark-line path')]"
                          ".map(p => p.getAttribute('stroke'))")
    assert len(lines) == 2 and all(lines) and lines[0] != lines[1], f"two coloured lines, got strokes {lines}"
    legend = page.evaluate("[...document.querySelectorAll('#train-plot g.role-legend text')].map(t => t.textContent)")
    assert {"train", "val"} <= set(legend), legend
    page.wait_for_timeout(4_000)  # two more refreshes of the plot
    assert not warnings, f"the plot warned of empty data while it had points: {warnings[:2]}"


def test_train_live_progress_reattach_after_reload_stop_and_pick(page, app):
    open_tab(page, "Train")
    for name, value in TINY_MODEL.items():  # the form's ids come from the config's field names
        page.locator(f"#train-story-{name} input, #train-story-{name} textarea").first.fill(value)
    page.locator("#train-name textarea, #train-name input").first.fill("browser-run")
    page.locator("#train-start").click()
    wait_for_text(page, "#train-message", "started browser-run")
    wait_for_text(page, "#train-command", "python -m llmb train-story")
    wait_for_text(page, "#train-status", "tokens/s")  # the timer brought the first metrics
    plot = page.locator("#train-plot")
    page.wait_for_function("document.querySelectorAll('#train-plot svg path, #train-plot canvas').length > 0")
    before = plot.inner_html()
    page.wait_for_function("(old) => document.querySelector('#train-plot').innerHTML !== old", arg=before)
    assert_loss_lines_drawn(page)
    assert page.locator("#train-sample textarea").input_value(), "the latest sample is shown"
    shot(page, "train-running")

    page.reload()  # a reload (or another browser) re-attaches to the running job from its state on disk
    page.wait_for_selector("#story-generate")
    open_tab(page, "Train")
    wait_for_text(page, "#train-status", "browser-run")
    wait_for_text(page, "#train-status", "running")

    page.locator("#train-stop").click()
    wait_for_text(page, "#train-message", "stop requested")
    wait_for_text(page, "#train-status", "stopped")
    wait_for_text(page, "#train-status", "story checkpoint picker")
    shot(page, "train-stopped")

    open_tab(page, "Continue the story")
    page.locator("#story-ckpt input").click()
    page.get_by_role("option", name="browser-run").click()
    page.locator("#story-generate").click()
    wait_for_text(page, "#story-note", "done")
    wait_for_text(page, "#story-model-status", "Story model browser-run")


def test_another_browsers_run_shows_no_uploads_key_and_no_server_path(page, app, tmp_path):
    """Browser B (an API client) uploads a diary and trains on it; this page's Train tab, log included,
    names it as B's Data picker does and shows neither B's uploads key nor a server path."""
    from gradio_client import Client, handle_file

    from tests.app.app_server import TINY_TRAIN

    diary = tmp_path / "private_diary.txt"
    diary.write_text("Dear diary, today I went to Oz. " * 200)
    other = Client(app.url, verbose=False)
    key = other.predict(files=[handle_file(str(diary))], selected=[], api_name="/train_upload")[3]
    started = other.predict(kind="story", name="diary-run", data=["uploads/private_diary.txt"], uploads_key=key,
                            api_name="/train_start", **TINY_TRAIN)[0]
    assert started == "started `diary-run`", started
    try:
        open_tab(page, "Train")
        page.get_by_text("Log").click()
        wait_for_text(page, "#train-command", "--data uploads/private_diary.txt")
        wait_for_text(page, "#train-status", "tokens/s")
        shown = page.locator("body").inner_text() + page.locator("#train-log textarea").input_value()
        assert "--out checkpoints/diary-run" in shown
        for secret in (key, str(app.work), str(app.ckpts), str(REPO)):
            assert secret not in shown and secret not in page.content(), secret
        shot(page, "train-another-browser")
    finally:
        other.predict(api_name="/train_stop")
        stop_training(app.work)


def test_a_finished_adapter_exports_to_gguf_from_the_train_tab(page, app):
    """After a QLoRA run finishes, the Train tab offers Export to GGUF: a job like the others, with its
    progress in the status, and the file to download when it is written."""
    from gguf import GGUFReader
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    started = client.predict(kind="qlora", name="lora-export", data=["data/chats.jsonl"], qlora_max_steps=2,
                             qlora_max_seq_len=64, qlora_batch_size=2, qlora_skip_bad_rows=True,
                             api_name="/train_start")[0]
    assert started == "started `lora-export`", started
    open_tab(page, "Train")
    assert not page.locator("#train-export").is_visible(), "no export before an adapter is finished"
    wait_for_text(page, "#train-status", "assistant's adapter picker", timeout=240_000)
    page.locator("#train-export-type").get_by_label("q8_0").check()
    page.locator("#train-export").click()
    wait_for_text(page, "#train-message", "started lora-export-q8_0")
    wait_for_text(page, "#train-command", "python -m llmb export-gguf --base")
    wait_for_text(page, "#train-status", "wrote lora-export-q8_0.gguf", timeout=120_000)
    page.locator("#train-download a").first.wait_for(timeout=30_000)  # the download link
    assert "lora-export-q8_0.gguf" in "".join(page.locator("#train-download").inner_text().split())
    shot(page, "train-exported")
    exported = app.work / "exports" / "lora-export-q8_0" / "lora-export-q8_0.gguf"
    reader = GGUFReader(exported)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "phi2"
    assert any(t.tensor_type.name == "Q8_0" for t in reader.tensors)
    again = client.predict(out_type="q8_0", api_name="/train_export")[0]
    assert again.startswith("⚠️") and "already exported as lora-export-q8_0.gguf" in again
