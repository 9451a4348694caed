"""Helpers for the app tests: a tiny story checkpoint, and `python app.py` on a free port.

The app runs in a subprocess, exactly as a user starts it, once per test module.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOK = "books/oz/01_the_wonderful_wizard_of_oz.txt"
TINY_STORY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=16)
# the Train tab's story settings, by name (the API parameters are story_<setting> and qlora_<setting>)
TINY_TRAIN = dict(story_n_layer=2, story_n_head=2, story_n_embd=32, story_block_size=32, story_batch_size=16,
                  story_lr="3e-3", story_max_iters="100000", story_eval_interval=10)
WIZARD = "data/books/wizard.txt"  # the Data picker's name for the book app_folders copies


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_story_checkpoint(out, repo_data):
    """A 30-step story model: enough to load and sample, trained in a few seconds."""
    import torch

    from llmb.story.train import TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(data=[str(repo_data / BOOK)], out=str(out), max_iters=30, eval_interval=30,
                          eval_iters=2, progress=False, **TINY_STORY), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return out


def app_folders(root, repo_data, adapter=None):
    """checkpoints/ (a story model, and the adapter if given), data/ (one book, one chat file), work/."""
    ckpts, data = root / "checkpoints", root / "data"
    (data / "books").mkdir(parents=True)
    shutil.copy(repo_data / BOOK, data / "books" / "wizard.txt")
    shutil.copy(repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl", data / "chats.jsonl")
    make_story_checkpoint(ckpts / "tiny-story", repo_data)
    if adapter is not None:
        shutil.copytree(adapter, ckpts / "tiny-adapter")
    return ckpts, data, root / "work"


class App:
    def __init__(self, process, url, log):
        self.process, self.url, self.log, self.startup_s = process, url, log, None

    def log_text(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def launch_app(root, args, env=None, timeout=60):
    """Start `python app.py ARGS --port P` and wait until it answers HTTP; returns an App."""
    port = free_port()
    log = root / "app.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLMB_", "SPACE_", "GRADIO_SERVER"))}
    env = clean | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                   "PYTHONUNBUFFERED": "1"} | (env or {})
    t0 = time.time()
    with open(log, "wb") as f:
        process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), *map(str, args)],
                                   cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    app = App(process, f"http://127.0.0.1:{port}/", log)
    while time.time() - t0 < timeout:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{app.log_text()[-3000:]}")
        try:
            with urllib.request.urlopen(app.url, timeout=2) as r:
                if r.status == 200:
                    app.startup_s = time.time() - t0
                    return app
        except OSError:
            time.sleep(0.2)
    stop_app(app)
    pytest.fail(f"app.py did not answer within {timeout} s:\n{app.log_text()[-3000:]}")


def stop_app(app):
    app.process.terminate()
    try:
        app.process.wait(10)
    except subprocess.TimeoutExpired:
        app.process.kill()
        app.process.wait()


def stop_training(work):
    """Leave no trainer running after a test module, whatever happened in it."""
    from llmb.app.jobs import JobManager

    manager = JobManager(work / "job.json")
    if manager.stop() is not None:
        try:
            manager.wait(60)
        except TimeoutError:
            os.kill(manager.current()["pid"], 9)
