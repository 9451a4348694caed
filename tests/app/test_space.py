"""The app as a Hugging Face Space runs it: the repository without .git, `pip install -r requirements.txt` (no
`pip install .`) in a fresh virtualenv, SPACE_ID set, `python app.py` started from the repository and from `/`."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

from tests.app.app_server import free_port
from tests.test_readme import fresh_clone

pytestmark = pytest.mark.slow  # a virtualenv install, two app start-ups and a short training run: a few minutes

BOOK = "data/books/oz/01_the_wonderful_wizard_of_oz.txt"  # the Data picker's name for a shipped book
TINY = dict(story_n_layer=2, story_n_head=2, story_n_embd=32, story_block_size=32, story_batch_size=16,
            story_lr="3e-3", story_max_iters="40", story_eval_interval=20)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """(the Space's files, its Python): what a Space builds from the repository."""
    root = tmp_path_factory.mktemp("space")
    files = fresh_clone(root / "repo")
    assert not (files / ".git").exists()
    subprocess.run([sys.executable, "-m", "venv", root / "venv"], check=True)
    python = root / "venv" / "bin" / "python"
    done = subprocess.run([python, "-m", "pip", "install", "-q", "-r", "requirements.txt"], cwd=files,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    found = subprocess.run([python, "-c", "import importlib.util; print(importlib.util.find_spec('llmb'))"],
                           cwd="/", capture_output=True, text=True)
    assert found.stdout.strip() == "None", "a Space does not pip-install llmb: the app must run from its files"
    return files, python


def start(space, cwd, **env):
    files, python = space
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLMB_", "SPACE_", "GRADIO_", "PYTHON"))}
    log = open(files.parent / f"app-{port}.log", "wb")
    process = subprocess.Popen([python, files / "app.py"], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                               env=clean | {"SPACE_ID": "someone/llmb", "GRADIO_SERVER_PORT": str(port),
                                            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"} | env)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        assert process.poll() is None, Path(log.name).read_text()[-3000:]
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return process, url, Path(log.name)
        except OSError:
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"the Space did not answer: {Path(log.name).read_text()[-3000:]}")


def data_choices(url):
    with urllib.request.urlopen(f"{url}config", timeout=10) as r:
        config = json.loads(r.read())
    picker = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "train-data")
    return [choice[0] for choice in picker["props"]["choices"]]


def drive_story_and_chat(client):
    text, note, _ = client.predict(checkpoint="oz-story", prompt="Dorothy", max_new=60, temperature=0.8, top_k=0,
                                   top_p=1.0, seed="1", api_name="/story")
    assert text.startswith("Dorothy") and len(text) > 40 and note.startswith("done"), (text, note)
    answer = client.predict(message="Hello", history=[], base_history=[], system="", compare=False, temperature=0,
                            top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=8, seed="1",
                            api_name="/chat")
    shown = json.dumps(answer)
    # offline, Phi-2 cannot download: the page says so and what to do, never a traceback
    assert "Traceback" not in shown and ("Hugging Face hub" in shown or "small" in shown), shown[:2000]


def test_a_public_space_tells_stories_lists_the_shipped_books_and_says_why_training_is_off(space):
    files, _ = space
    process, url, log = start(space, cwd=files)
    try:
        client = Client(url, verbose=False)
        drive_story_and_chat(client)
        offered = data_choices(url)
        assert BOOK in offered and "data/books/oz/ (7 books)" in offered, offered
        assert "data/guanaco/openassistant_best_replies_eval.jsonl" in offered
        message = client.predict(kind="story", name="space-run", data=[BOOK], **TINY, api_name="/train_start")[0]
        assert "training is off on this public Space" in message and "LLMB_ALLOW_TRAINING=1" in message
    finally:
        process.kill()
    assert "Traceback" not in log.read_text()


def test_a_space_with_training_on_started_from_root_trains_on_a_shipped_book(space):
    files, _ = space
    process, url, log = start(space, cwd="/", LLMB_ALLOW_TRAINING="1")
    try:
        client = Client(url, verbose=False)
        drive_story_and_chat(client)
        assert BOOK in data_choices(url)
        message, command, _ = client.predict(kind="story", name="space-run", data=[BOOK], **TINY,
                                             api_name="/train_start")
        assert message == "started `space-run`", message
        assert command["value"].startswith(f"python -m llmb train-story --data {BOOK} "), command
        deadline = time.time() + 300
        while time.time() < deadline:
            status = client.predict(api_name="/train_progress")[0]
            if "running" not in status and "starting" not in status and "preparing" not in status:
                break
            time.sleep(1)
        assert "finished" in status, status
        assert json.loads((files / "checkpoints" / "space-run" / "summary.json").read_text())["steps"] == 40
        text, note, _ = client.predict(checkpoint="space-run", prompt="The", max_new=20, temperature=0.8, top_k=0,
                                       top_p=1.0, seed="1", api_name="/story")
        assert text.startswith("The") and note.startswith("done"), (text, note)
    finally:
        process.kill()
    assert "Traceback" not in log.read_text()


def test_an_installed_llmb_trains_samples_and_chats_from_another_folder(space, small_assistant, tmp_path):
    """`pip install .` (not editable): the `llmb` command works with no repository in sight, given full paths."""
    files, python = space
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "."], cwd=files, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    llmb = python.parent / "llmb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"HF_HUB_OFFLINE": "1"}

    def run(*args):
        done = subprocess.run([llmb, *map(str, args)], cwd=tmp_path, capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        return done.stdout

    run("train-story", "--data", files / BOOK, "--out", tmp_path / "mine", "--max-iters", 30, "--n-layer", 2,
        "--n-head", 2, "--n-embd", 32, "--block-size", 32, "--no-progress")
    assert run("sample", "--ckpt", tmp_path / "mine", "--prompt", "The", "--max-new-tokens", 30).startswith("The")
    answer = run("chat", "--base", small_assistant, "--prompt", "What is the capital of France?", "--temperature", 0)
    assert "Paris" in answer
