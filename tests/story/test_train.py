import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from llmb.errors import UserError
from llmb.runlog import read_metrics
from llmb.story.checkpoint import load_checkpoint
from llmb.story.lr_finder import lr_sweep, suggest_lr
from llmb.story.train import TrainConfig, make_scheduler, train
from tests.conftest import REPO

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=16, dropout=0.0, progress=False)


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_200k.txt"
    path.write_text((shared_data / "tinyshakespeare.txt").read_text()[:200_000])
    return path


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_training_lowers_val_loss_and_writes_its_files(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(data=[str(corpus)], out=str(out), max_iters=100, eval_interval=50, lr=3e-3, **TINY)
    model, summary = train(cfg, log=lambda *a: None)
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [50, 100]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(65)
    assert evals[-1]["val_bpc"] == pytest.approx(evals[-1]["val_loss"] / math.log(2), abs=1e-3)  # chars: 1 token each
    for key in ("step", "train_loss", "lr", "tokens_per_sec", "elapsed_s"):
        assert all(key in r for r in records)
    assert isinstance(evals[-1]["sample"], str) and evals[-1]["sample"]
    assert summary["steps"] == 100 and summary["stopped_by"] == "done"
    assert json.loads((out / "summary.json").read_text())["final_val_loss"] == summary["final_val_loss"]
    assert sorted(p.name for p in out.iterdir()) == [
        "char_vocab.json", "config.json", "metrics.jsonl", "model.safetensors", "summary.json", "train_state.pt"]

    # save -> load gives the very same logits
    loaded, tokenizer, meta = load_checkpoint(out)
    x = torch.tensor([tokenizer.encode("ROMEO:\nWhat light")])
    model.eval()
    assert torch.equal(model(x)[0], loaded(x)[0])
    assert meta["step"] == 100 and meta["tokenizer"] == "char"


def test_sigterm_saves_and_resume_continues_to_the_same_weights(corpus, tmp_path):
    common = ["--data", corpus, "--n-layer", 2, "--n-head", 2, "--n-embd", 32, "--block-size", 32,
              "--batch-size", 16, "--max-iters", 200, "--eval-interval", 1000, "--eval-iters", 2,
              "--log-interval", 1, "--no-progress"]
    straight = tmp_path / "straight"
    assert run_cli("training/train_char.py", "--out", straight, *common).returncode == 0

    stopped = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "training/train_char.py", "--out", str(stopped), *map(str, common)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(read_metrics(stopped / "metrics.jsonl")) < 20:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stopped_by"] == "signal" and 20 <= summary["steps"] < 200
    stopped_at = summary["steps"]
    assert load_checkpoint(stopped)[2]["step"] == stopped_at  # the stopped run left a loadable checkpoint

    resumed = run_cli("training/train_char.py", "--out", stopped, "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {stopped_at}" in resumed.stdout
    steps = [r["step"] for r in read_metrics(stopped / "metrics.jsonl")]
    assert steps == list(range(1, 201))  # continues where it stopped, no step lost or repeated
    a, _, _ = load_checkpoint(straight)
    b, _, _ = load_checkpoint(stopped)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_max_time_stops_on_time(corpus, tmp_path):
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "timed"), max_time=4.0, eval_interval=50,
                      eval_iters=2, **TINY)
    start = time.perf_counter()
    _, summary = train(cfg, log=lambda *a: None)
    assert summary["stopped_by"] in ("done", "time")
    assert summary["total_steps"] > 20  # the one-cycle length was planned from measured throughput
    assert summary["elapsed_s"] <= 4.0 + 1.0
    assert time.perf_counter() - start < 15


def test_one_cycle_shape():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = make_scheduler(opt, "onecycle", 1e-2, 100, pct_start=0.25)
    lrs, betas = [], []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    peak = lrs.index(max(lrs))
    assert 20 <= peak <= 26 and max(lrs) == pytest.approx(1e-2)
    assert lrs[0] == pytest.approx(1e-2 / 25) and lrs[-1] < lrs[0] / 10
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises ...
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # ... then anneals
    assert betas[0] == pytest.approx(0.95) and betas[peak] == pytest.approx(0.85) and betas[-1] > 0.94


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


def test_lr_find_cli_writes_plot_and_json(corpus, tmp_path):
    r = run_cli("-m", "llmb", "lr-find", "--data", corpus, "--out", tmp_path, "--n-layer", 1, "--n-embd", 32,
                "--n-head", 2, "--block-size", 32, "--batch-size", 8, "--num-iters", 60, "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert result["lrs"][0] <= result["suggested_lr"] <= result["lrs"][-1]
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_and_eval_cli(corpus, tmp_path):
    out = tmp_path / "ckpt"
    train(TrainConfig(data=[str(corpus)], out=str(out), max_iters=30, eval_interval=30, **TINY), log=lambda *a: None)
    r = run_cli("-m", "llmb", "sample", "--ckpt", out, "--prompt", "KING \u2603:", "--max-new-tokens", 50,
                "--seed", 3)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("KING \u2603:") and len(r.stdout) >= len("KING \u2603:") + 50
    assert "dropped characters the model never saw: '\u2603'" in r.stderr
    again = run_cli("-m", "llmb", "sample", "--ckpt", out, "--prompt", "KING:", "--max-new-tokens", 50, "--seed", 3)
    assert again.stdout == run_cli("-m", "llmb", "sample", "--ckpt", out, "--prompt", "KING:",
                                   "--max-new-tokens", 50, "--seed", 3).stdout
    r = run_cli("-m", "llmb", "eval", "--ckpt", out, "--data", corpus)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip())
    assert 0 < line["val_loss"] < math.log(65) and line["val_bpc"] == pytest.approx(line["val_loss"] / math.log(2), abs=1e-3)


def test_wordpiece_run_reports_bits_per_character(corpus, tmp_path):
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "wp"), tokenizer="wordpiece", vocab_size=400,
                      max_iters=20, eval_interval=20, **TINY)
    _, summary = train(cfg, log=lambda *a: None)
    # several characters per token: bpc is well below nats/token / ln 2
    assert summary["final_val_bpc"] < 0.6 * summary["final_val_loss"] / math.log(2)
    loaded, tokenizer, _ = load_checkpoint(tmp_path / "wp")
    assert tokenizer.kind == "subword" and loaded.config.vocab_size == tokenizer.vocab_size


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no .txt files"),
    (lambda d: (d / "notes").mkdir() or (d / "notes" / "a.md").write_text("x") and d / "notes", "has no .txt files"),
    (lambda d: (d / "b.txt").write_bytes(bytes(range(256))) and d / "b.txt", "binary"),
    (lambda d: (d / "short.txt").write_text("Too short a book.\n" * 4) and d / "short.txt", "fewer than one block"),
])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, make, message):
    data = make(tmp_path)
    out = tmp_path / "out"
    r = run_cli("training/train_char.py", "--data", data, "--out", out, "--max-iters", 5)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_bad_flags_are_user_errors(corpus, tmp_path):
    for bad in (dict(n_embd=30, n_head=4), dict(max_iters=0), dict(lr=-1.0), dict(block_size=0)):
        with pytest.raises(UserError):
            train(TrainConfig(data=[str(corpus)], out=str(tmp_path / "x"), **{**TINY, "max_iters": 5, **bad}))
    with pytest.raises(UserError, match="--max-iters N or --max-time"):
        train(TrainConfig(data=[str(corpus)], out=str(tmp_path / "x"), **TINY))
    with pytest.raises(UserError, match="no checkpoint"):
        train(TrainConfig(data=[str(corpus)], out=str(tmp_path / "none"), resume=True, max_iters=5, **TINY))


@pytest.mark.parametrize("budget", [{"max_iters": 20}, {"max_time": 5.0}])
def test_two_process_ddp_ends_with_identical_weights(corpus, tmp_path, budget):
    script = tmp_path / "ddp_run.py"
    script.write_text(f"""
import os
import torch
from llmb.story.train import TrainConfig, train
model, summary = train(TrainConfig(data=[{str(corpus)!r}], out={str(tmp_path / 'ddp')!r}, **{budget!r},
                                   eval_interval=20, eval_iters=2, device="cpu", **{TINY!r}), log=lambda *a: None)
torch.save(model.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
print("tokens_seen", summary["tokens_seen"], "steps", summary["steps"])
""")
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, script)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = int(r.stdout.split("steps ")[1].split()[0])
    assert f"tokens_seen {steps * 16 * 32 * 2}" in r.stdout  # both ranks' batches count
    assert steps == 20 if "max_iters" in budget else steps > 20  # a --max-time run planned its length
    assert (tmp_path / "ddp" / "model.safetensors").exists()


def test_lr_auto_runs_the_finder_and_trains_with_its_suggestion(corpus, tmp_path):
    out = tmp_path / "auto"
    messages = []
    _, summary = train(TrainConfig(data=[str(corpus)], out=str(out), lr="auto", max_iters=10, eval_interval=10,
                                   eval_iters=2, **TINY), log=messages.append)
    suggested = json.loads((out / "lr_find.json").read_text())["suggested_lr"]
    assert summary["lr"] == suggested
    assert any(m.startswith(f"--lr auto: using lr {suggested:.2e}") for m in messages)
    assert (out / "lr_find.png").exists()
