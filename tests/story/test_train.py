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
from llmb.story.config import TrainConfig
from llmb.story.train import train
from tests import slow_steps
from tests.conftest import REPO
from tests.story.conftest import TINY, TINY_FLAGS, run_cli

QUIET = dict(log=lambda *a: None)
SUMMARY_KEYS = {"data", "steps", "total_steps", "final_train_loss", "final_val_loss", "elapsed_s", "stopped_by"}
RECORD_KEYS = {"step", "train_loss", "lr", "tokens_per_sec", "elapsed_s", "total_steps"}


def test_training_lowers_val_loss_and_keeps_the_run_contract(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(data=[str(corpus)], out=str(out), max_iters=100, eval_interval=50, lr=3e-3, **TINY)
    model, summary = train(cfg, **QUIET)
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [50, 100]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(65)
    assert evals[-1]["val_bpc"] == pytest.approx(evals[-1]["val_loss"] / math.log(2), abs=1e-3)  # chars: 1 token each
    assert all(RECORD_KEYS <= r.keys() for r in records) and records[-1]["total_steps"] == 100
    assert isinstance(evals[-1]["sample"], str) and evals[-1]["sample"]
    saved = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= saved.keys() and saved == summary
    assert summary["steps"] == 100 and summary["stopped_by"] == "done" and summary["data"] == [str(corpus)]
    assert summary["final_train_loss"] == records[-1]["train_loss"] or \
        round(summary["final_train_loss"], 4) == records[-1]["train_loss"]
    assert sorted(p.name for p in out.iterdir()) == [
        "char_vocab.json", "config.json", "metrics.jsonl", "model.safetensors", "summary.json", "train_state.pt"]

    # save -> load gives the very same logits
    loaded, tokenizer, meta = load_checkpoint(out)
    x = torch.tensor([tokenizer.encode("ROMEO:\nWhat light")])
    model.eval()
    assert torch.equal(model(x)[0], loaded(x)[0])
    assert meta["step"] == 100 and meta["tokenizer"] == "char"


def stop_at(step):
    """Wrap train_step so that the run gets a SIGINT (as from Ctrl-C or the app's Stop) at `step`."""
    import llmb.story.train as story_train

    real = story_train.train_step

    def step_then_signal(run):
        loss = real(run)
        if run.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    return step_then_signal


def test_stop_and_resume_with_dropout_equals_an_uninterrupted_run(corpus, tmp_path, monkeypatch):
    import llmb.story.train as story_train

    run = dict(data=[str(corpus)], max_iters=40, eval_interval=20, eval_iters=2, sample_chars=0,
               **{**TINY, "dropout": 0.1})
    straight, _ = train(TrainConfig(out=str(tmp_path / "straight"), **run), **QUIET)
    with monkeypatch.context() as m:
        m.setattr(story_train, "train_step", stop_at(13))
        _, summary = train(TrainConfig(out=str(tmp_path / "stopped"), **run), **QUIET)
    assert summary["stopped_by"] == "signal" and summary["steps"] == 13
    resumed, summary = train(TrainConfig(out=str(tmp_path / "stopped"), resume=True, **run), **QUIET)
    assert summary["steps"] == 40 and summary["stopped_by"] == "done"
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.slow  # a subprocess
def test_a_stop_in_a_long_step_saves_the_last_step_within_seconds_and_resumes_exactly(corpus, tmp_path):
    """A step as long as a real model's on a CPU: the stop used to wait for its end (the app killed the run after
    60 s, unsaved). Now the step is dropped and the last completed one saved at once; --resume repeats the dropped
    step as it would have run (the batch and dropout it drew are put back)."""
    run = dict(data=[str(corpus)], max_iters=10, eval_interval=1000, eval_iters=2, log_interval=1, sample_chars=0,
               **{**TINY, "dropout": 0.1})
    straight, _ = train(TrainConfig(out=str(tmp_path / "straight"), **run), **QUIET)
    out = tmp_path / "stopped"
    trainer = slow_steps.start(4, 600, "train-story", "--data", corpus, "--out", out, *TINY_FLAGS, "--dropout", 0.1,
                               "--max-iters", 10, "--eval-interval", 1000, "--eval-iters", 2, "--log-interval", 1,
                               "--sample-chars", 0)
    took, stdout, stderr = slow_steps.stop_mid_step(trainer, out / "metrics.jsonl", 4)
    assert trainer.returncode == 0 and took < 10, (took, stderr[-2000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "signal" and summary["steps"] == summary["saved_step"] == 4
    assert load_checkpoint(out)[2]["step"] == 4
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert f"saved {out} (step 4) after a stop request" in stdout
    resumed, summary = train(TrainConfig(out=str(out), resume=True, **run), **QUIET)
    assert summary["steps"] == 10 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 11))
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_time_run_stopped_while_measuring_resumes_with_a_step_budget(corpus, tmp_path, monkeypatch):
    import llmb.story.train as story_train

    run = dict(data=[str(corpus)], out=str(tmp_path / "run"), max_iters=40, eval_interval=20, eval_iters=2,
               sample_chars=0, **TINY)
    with monkeypatch.context() as m:
        m.setattr(story_train, "train_step", stop_at(5))  # --max-time measures the speed for 50 steps or 2 s
        _, summary = train(TrainConfig(max_time=600.0, **run), **QUIET)
    assert summary["stopped_by"] == "signal" and summary["steps"] == 5 and summary["total_steps"] is None
    _, summary = train(TrainConfig(resume=True, **run), **QUIET)  # no --max-time now: --max-iters ends it
    assert summary["steps"] == 40 and summary["total_steps"] == 40 and summary["stopped_by"] == "done"


def test_a_short_time_run_trains_two_blocks_and_resumes_them_under_a_longer_budget(corpus, tmp_path, monkeypatch):
    import llmb.story.train as story_train

    shape = {k: v for k, v in TINY.items() if k != "n_layer"}  # --n-layer auto
    run = dict(data=[str(corpus)], out=str(tmp_path / "run"), eval_interval=20, eval_iters=2, sample_chars=0, **shape)
    with monkeypatch.context() as m:
        m.setattr(story_train, "train_step", stop_at(5))
        train(TrainConfig(max_time=60.0, **run), **QUIET)
    assert load_checkpoint(tmp_path / "run")[0].config.n_layer == 2
    _, summary = train(TrainConfig(resume=True, max_iters=10, max_time=3600.0, **run), **QUIET)  # auto -> 4 afresh
    model, _, meta = load_checkpoint(tmp_path / "run")
    assert summary["steps"] == 10 and model.config.n_layer == 2 and meta["train"]["n_layer"] == 2


def test_resume_with_more_steps_continues_the_run(run_copy, corpus):
    messages = []
    _, summary = train(TrainConfig(data=[str(corpus)], out=str(run_copy), resume=True, max_iters=30,
                                   eval_interval=10, eval_iters=2, sample_chars=0, **TINY), log=messages.append)
    assert "resuming from step 20" in "\n".join(messages) and "the schedule now ends at step 30" in "\n".join(messages)
    assert summary["steps"] == 30 and [r["step"] for r in read_metrics(run_copy / "metrics.jsonl")][-1] == 30


def test_resume_refuses_text_changed_under_the_same_path(tmp_path, corpus):
    book = tmp_path / "book.txt"
    book.write_text(corpus.read_text()[:50_000])
    cfg = dict(data=[str(book)], out=str(tmp_path / "run"), max_iters=10, eval_interval=5, eval_iters=1,
               sample_chars=0, **TINY)
    train(TrainConfig(**cfg), **QUIET)
    book.write_text("\u2603 " + corpus.read_text()[:50_000])
    with pytest.raises(UserError, match=r"training text has 1 character\(s\) not in the saved vocabulary"):
        train(TrainConfig(**{**cfg, "max_iters": 20}, resume=True), **QUIET)


def test_max_time_plans_the_schedule_inside_its_warm_up_and_stops_on_time(corpus, tmp_path):
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "timed"), max_time=2.5, eval_interval=50,
                      eval_iters=2, log_interval=1, lr=1e-2, **TINY)
    start = time.perf_counter()
    _, summary = train(cfg, **QUIET)
    assert summary["stopped_by"] in ("done", "time")
    assert summary["total_steps"] > 20  # the one-cycle length was planned from measured throughput
    assert summary["elapsed_s"] <= 2.5 + 1.0 and time.perf_counter() - start < 12
    lrs = [r["lr"] for r in read_metrics(tmp_path / "timed" / "metrics.jsonl")]
    peak = lrs.index(max(lrs))
    assert lrs[0] < 1e-2 / 20  # measuring happened at the warm-up's start, not at the peak
    assert all(a <= b * (1 + 1e-5) for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises once ...
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # ... then anneals: one-cycle never restarts


def busy_for_60_steps(monkeypatch):
    """Slow the first 60 steps down (a busy machine), so a --max-time run's first plan is far too short."""
    import llmb.story.train as story_train

    real_step = story_train.train_step

    def busy_then_quiet(run):
        if run.step < 60:
            time.sleep(0.03)
        return real_step(run)

    monkeypatch.setattr(story_train, "train_step", busy_then_quiet)


def test_max_time_replans_when_the_machine_speeds_up(corpus, tmp_path, monkeypatch):
    """The first 60 steps are slowed down (a busy machine), so the first plan is far too short: the
    plans at each eval lengthen the schedule to fill the time, and the lr still rises once, then falls."""
    busy_for_60_steps(monkeypatch)
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "drift"), max_time=6.0, eval_interval=25,
                      eval_iters=1, log_interval=1, sample_chars=0, **TINY)
    _, summary = train(cfg, **QUIET)
    records = read_metrics(tmp_path / "drift" / "metrics.jsonl")
    plans = [r["total_steps"] for r in records if r["total_steps"]]
    assert plans[-1] > 1.5 * plans[0], f"the schedule was not lengthened: {plans[0]} -> {plans[-1]}"
    assert 0.75 * 6.0 <= summary["elapsed_s"] <= 6.0 + 1.0, "the time was used, not overrun"
    lrs = [r["lr"] for r in records]
    peak = lrs.index(max(lrs))
    assert lrs[-1] < 0.05 * lrs[peak], "the anneal ran to (nearly) its end within the time"
    assert all(a <= b * (1 + 1e-5) for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_max_time_replans_without_evals_when_the_machine_speeds_up(corpus, tmp_path, monkeypatch):
    """With evals rare, a plan made on a busy start ended a 30 s run in 15 s: it replans between evals too."""
    busy_for_60_steps(monkeypatch)
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "drift"), max_time=6.0, eval_interval=100000,
                      eval_iters=1, log_interval=1, sample_chars=0, **TINY)
    _, summary = train(cfg, **QUIET)
    plans = [r["total_steps"] for r in read_metrics(tmp_path / "drift" / "metrics.jsonl") if r["total_steps"]]
    assert plans[-1] > 1.5 * plans[0], f"the schedule was not lengthened: {plans[0]} -> {plans[-1]}"
    assert 0.75 * 6.0 <= summary["elapsed_s"] <= 6.0 + 1.0, "the time was used, not overrun"


@pytest.mark.parametrize("tokenizer, lossless", [("bpe", True), ("wordpiece", False)])
def test_subword_runs_report_bits_per_character_and_say_when_lossy(corpus, tmp_path, tokenizer, lossless):
    messages = []
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / tokenizer), tokenizer=tokenizer, vocab_size=400,
                      max_iters=20, eval_interval=20, eval_iters=4, sample_chars=0, **TINY)
    _, summary = train(cfg, log=messages.append)
    # several characters per token: bpc is well below nats/token / ln 2
    assert summary["final_val_bpc"] < 0.6 * summary["final_val_loss"] / math.log(2)
    assert summary["bpc_lossless"] is lossless
    assert ("tokenizer is lossy" in "\n".join(messages)) is not lossless
    loaded, tok, _ = load_checkpoint(tmp_path / tokenizer)
    assert tok.kind == "subword" and loaded.config.vocab_size == tok.vocab_size


@pytest.mark.slow
def test_lr_auto_runs_the_finder_and_trains_with_its_suggestion(corpus, tmp_path):
    out = tmp_path / "auto"
    messages = []
    _, summary = train(TrainConfig(data=[str(corpus)], out=str(out), lr="auto", max_iters=10, eval_interval=10,
                                   eval_iters=2, sample_chars=0, **TINY), log=messages.append)
    suggested = json.loads((out / "lr_find.json").read_text())["suggested_lr"]
    assert summary["lr"] == suggested
    assert any(m.startswith(f"--lr auto: using lr {suggested:.2e}") for m in messages)
    assert (out / "lr_find.png").exists()


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_to_the_same_weights(corpus, tmp_path):
    common = ["--data", corpus, "--n-layer", 2, "--n-head", 2, "--n-embd", 32, "--block-size", 32,
              "--batch-size", 16, "--max-iters", 200, "--eval-interval", 1000, "--eval-iters", 2,
              "--log-interval", 1, "--no-progress"]
    straight = tmp_path / "straight"
    assert run_cli("training/train_char.py", "--out", straight, *common).returncode == 0

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "training/train_char.py", "--out", str(stopped), *map(str, common)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


@pytest.mark.slow
@pytest.mark.parametrize("budget", [{"max_iters": 20}, {"max_time": 5.0}])
def test_two_process_ddp_ends_with_identical_weights(corpus, tmp_path, budget):
    script = tmp_path / "ddp_run.py"
    script.write_text(f"""
import json
import os
import torch
from llmb.story.config import TrainConfig
from llmb.story.train import train
model, summary = train(TrainConfig(data=[{str(corpus)!r}], out={str(tmp_path / 'ddp')!r}, **{budget!r},
                                   eval_interval=20, eval_iters=2, device="cpu", **{TINY!r}), log=lambda *a: None)
rank = {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}"
torch.save(model.state_dict(), rank + ".pt")
with open(rank + ".json", "w") as f:  # a file per rank: the two ranks' prints would interleave on one stdout
    json.dump({{"tokens_seen": summary["tokens_seen"], "steps": summary["steps"]}}, f)
""")
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, script)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    summaries = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    steps = summaries[0]["steps"]
    assert summaries == [{"tokens_seen": steps * 16 * 32 * 2, "steps": steps}] * 2  # both ranks' batches count
    assert steps == 20 if "max_iters" in budget else steps > 20  # a --max-time run planned its length
    assert (tmp_path / "ddp" / "model.safetensors").exists()


@pytest.mark.parametrize("mine, theirs, both", [(None, None, None), ("time", None, "time"), (None, "signal", "signal"),
                                                ("time", "signal", "signal"), ("signal", "time", "signal")])
def test_every_process_stops_for_the_same_reason_a_signal_first(monkeypatch, mine, theirs, both):
    import llmb.story.train as story_train

    def max_with_the_other_process(accelerator, value):
        return max(value, story_train.STOP_REASONS.index(theirs))

    monkeypatch.setattr(story_train, "max_over_processes", max_with_the_other_process)
    assert story_train.agreed_stop(None, mine) == both


def test_a_second_run_into_the_same_out_is_refused_while_the_first_writes(corpus, tmp_path):
    """Two trainers writing one folder mixed their checkpoints and metrics; with --overwrite both runs were lost."""
    common = ["--data", corpus, "--n-layer", 2, "--n-head", 2, "--n-embd", 32, "--block-size", 32,
              "--batch-size", 16, "--max-iters", 100000, "--eval-interval", 5, "--eval-iters", 1, "--log-interval", 1,
              "--no-progress"]
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "training/train_char.py", "--out", str(out), *map(str, common)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "model.safetensors").exists():
        time.sleep(0.05)
    for extra in ([], ["--overwrite"], ["--resume"]):
        second = run_cli("training/train_char.py", "--out", out, *common, *extra)
        assert second.returncode == 2 and second.stderr.strip().splitlines() == [
            f"error: another run is writing to {out} right now; wait until it ends (or stop it), or give another --out"]
    first.kill()  # kill -9: the kernel lets go of the folder
    first.communicate(timeout=60)
    resumed = run_cli("training/train_char.py", "--out", out, "--resume", *common[:-8], "--max-iters", 3,
                      "--eval-interval", 5, "--eval-iters", 1, "--no-progress")
    assert "error: another run" not in resumed.stderr
