"""The Assistant tab in Chromium with a real model: SmolLM2-135M-Instruct and a LoRA adapter trained on it.

Issue #8 item 7: the Base picker offers the local model; Enter sends, Shift+Enter makes a new
line; the tab answers with the real model, and Compare shows the base model's different answer.
"""

import os
import shutil
import subprocess
import sys

import pytest

from tests.app.app_server import REPO, launch_app, stop_app
from tests.app.test_browser import CHROMIUM_ARGS, browser, open_tab, shot, wait_for_text  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def small_adapter(tmp_path_factory, small_assistant, repo_data):
    """A LoRA adapter on the small real model: 12 steps on 8 guanaco rows, trained as a user would (the CLI)."""
    work = tmp_path_factory.mktemp("small-adapter")
    rows = (repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl").read_text(encoding="utf-8").splitlines()
    (work / "train.jsonl").write_text("\n".join(rows[:8]) + "\n", encoding="utf-8")
    flags = dict(base=small_assistant, data=work / "train.jsonl", out=work / "adapter", quant="none", max_steps=12,
                 max_seq_len=64, batch_size=2, grad_accum=1, lr=5e-3, eval_steps=12, save_steps=12, eval_split=0.25,
                 device="cpu")
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    argv += ["--lora-targets", "q_proj", "k_proj", "v_proj", "o_proj"]
    env = os.environ | {"OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "training/train_qlora.py", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "adapter"


@pytest.fixture(scope="module")
def app(tmp_path_factory, small_assistant, small_adapter):
    root = tmp_path_factory.mktemp("real-app")
    ckpts = root / "checkpoints"
    shutil.copytree(small_adapter, ckpts / "small-adapter")
    app = launch_app(root, ["--checkpoints", ckpts, "--base", small_assistant, "--adapter", ckpts / "small-adapter",
                            "--work-dir", root / "work", "--device", "cpu"], env={"OMP_NUM_THREADS": "2"})
    yield app
    stop_app(app)


def test_the_assistant_answers_with_the_real_model_and_compare_differs(app, browser, small_assistant):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    page.set_default_timeout(30_000)
    page.goto(app.url)
    page.wait_for_selector("#story-generate")
    open_tab(page, "Assistant")
    assert page.locator("#chat-base input").input_value() == small_assistant.name, "the local model is the Base"
    page.get_by_text("Sampling settings").click()
    for slider, value in (("#chat-temperature", "0"), ("#chat-max-new", "24")):
        page.locator(f"{slider} input[type=number]").fill(value)
        page.locator(f"{slider} input[type=number]").press("Enter")
    page.locator("#chat-compare input").check()
    box = page.locator("#chat-message textarea")
    box.click()
    box.type("Hello!")
    box.press("Shift+Enter")
    box.type("What is the capital of France?")
    assert box.input_value() == "Hello!\nWhat is the capital of France?", "Shift+Enter makes a new line"
    box.press("Enter")  # Enter sends
    wait_for_text(page, "#chat-status", "tokens/s", timeout=300_000)
    assert box.input_value() == ""
    tuned, base = (page.locator(f"{sel}").inner_text() for sel in ("#chatbot", "#chatbot-base"))
    shot(page, "assistant-real-compare")
    question = "What is the capital of France?"
    assert question in tuned and question in base
    tuned_answer, base_answer = (text.split(question, 1)[1].strip() for text in (tuned, base))
    assert tuned_answer and base_answer, (tuned, base)
    assert tuned_answer != base_answer, "the adapter changes the answer"
    wait_for_text(page, "#chat-model-status", "loaded on cpu")
    page.close()
