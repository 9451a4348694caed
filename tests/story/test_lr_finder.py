import json

import pytest
import torch

from llmb.errors import UserError
from llmb.story.config import TrainConfig
from llmb.story.lr_finder import find_lr, lr_sweep, suggest_lr
from tests.story.conftest import TINY, run_cli


def test_lr_sweep_suggests_a_rate_inside_the_sweep_on_a_toy_problem():
    # noisy least squares with minibatch SGD: it learns for small lr and diverges past about 2 / L
    torch.manual_seed(0)
    X = torch.randn(1024, 8)
    y = X @ torch.randn(8) + 0.1 * torch.randn(1024)
    w = torch.zeros(8, requires_grad=True)
    L = 2 * torch.linalg.eigvalsh(X.T @ X / 1024).max().item()

    def step(lr):
        i = torch.randint(0, 1024, (32,))
        loss = ((X[i] @ w - y[i]) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            w.sub_(lr * w.grad)
            w.grad = None
        return loss.item()

    lrs, losses = lr_sweep(step, start_lr=1e-4, end_lr=10.0, num_iters=150)
    suggestion = suggest_lr(lrs, losses)
    assert lrs[0] < suggestion < lrs[-1]
    assert 1e-3 < suggestion < 2 / L  # a rate that learns, below the divergence point
    assert len(lrs) < 150  # the sweep stopped once the loss blew up


def test_a_sweep_that_diverges_at_once_is_a_user_error(corpus, tmp_path, monkeypatch):
    from llmb.story import lr_finder

    real = lr_finder.lr_sweep

    def nan_after_5_batches(train_step, *args, **kwargs):
        calls = iter(range(10**6))
        return real(lambda lr: train_step(lr) if next(calls) < 5 else float("nan"), *args, **kwargs)

    monkeypatch.setattr(lr_finder, "lr_sweep", nan_after_5_batches)
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path), **TINY)
    with pytest.raises(UserError, match="diverged after 5 batches"):
        find_lr(cfg, num_iters=50, log=lambda *a: None)


@pytest.mark.slow
def test_lr_find_cli_writes_plot_and_json(corpus, tmp_path):
    r = run_cli("-m", "llmb", "lr-find", "--data", corpus, "--out", tmp_path, "--n-layer", 1, "--n-embd", 32,
                "--n-head", 2, "--block-size", 32, "--batch-size", 8, "--num-iters", 60, "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert result["lrs"][0] <= result["suggested_lr"] <= result["lrs"][-1]
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_suggestion_with_default_settings_is_a_rate_that_trains(repo_data):
    """The steepest-slope pick suggested 3e-5 on this Oz book (the loss falls fast early at any lr); the
    default trainer's 2e-3 trains well, and the curve bottoms out near 2e-2."""
    book = repo_data / "books" / "oz" / "01_the_wonderful_wizard_of_oz.txt"
    cfg = TrainConfig(data=[str(book)], out="unused", progress=False)
    suggestion = find_lr(cfg, out_dir=None, log=lambda *a: None)
    assert 5e-4 <= suggestion <= 1e-2, suggestion
