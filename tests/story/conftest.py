"""Fixtures for the story tests: a 200k-character corpus, tiny model settings, a trained checkpoint,
and real faults (a read-only or full file system, mounted as tmpfs when the tests run as root)."""

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest

from tests.conftest import REPO

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=16, dropout=0.0, progress=False)
TINY_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "16",
              "--no-progress"]


@pytest.fixture(scope="session")
def corpus(repo_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_200k.txt"
    path.write_text((repo_data / "tinyshakespeare.txt").read_text()[:200_000])
    return path


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory):
    """A finished 20-step run (checkpoints at 10 and 20); copy it before changing it."""
    from llmb.story.config import TrainConfig
    from llmb.story.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig(data=[str(corpus)], out=str(out), max_iters=20, eval_interval=10, eval_iters=2,
                      sample_chars=0, **TINY), log=lambda *a: None)
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli(argv, capsys):
    """A command line run in this process: (exit code, stdout, stderr). "train" is `llmb train-story`."""
    from llmb.__main__ import main

    argv = [str(a) for a in argv]
    try:
        code = main(["train-story", *argv[1:]] if argv[0] == "train" else argv)
    except SystemExit as e:  # argparse refuses a flag's value
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextmanager
def tmpfs(path, size="16m", fill_from=None, read_only=False):
    """A real small file system at `path` (full at `size`; read-only after copying `fill_from` in)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a real read-only or full file system")
    try:
        if fill_from is not None:
            shutil.copytree(fill_from, path, dirs_exist_ok=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
