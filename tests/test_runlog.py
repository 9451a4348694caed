"""The run log both trainers share: metrics.jsonl, summary.json and the graceful stop."""

import json
import os
import signal
import time

import pytest

from llmb.fileio import read_json
from llmb.runlog import MetricsLog, StopSignal, read_metrics, trim_metrics, write_summary


def test_metrics_are_readable_while_written_and_trimmed_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, truncate=True)
    for step in (10, 20, 30):
        log.log(step=step, train_loss=1.0 / step)
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30]  # flushed: visible before close
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 40, "train_lo')  # a kill -9 mid-line
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30]
    trim_metrics(path, 20)
    assert [r["step"] for r in read_metrics(path)] == [10, 20]


def test_summary_schema_and_vocabulary(tmp_path):
    summary = write_summary(tmp_path, data=[tmp_path / "book.txt"], steps=5, total_steps=10, train_loss=2.0,
                            val_loss=2.1, elapsed_s=1.234, stopped_by="signal", val_bpc=3.0)
    assert read_json(tmp_path / "summary.json") == summary
    assert summary["data"] == [str(tmp_path / "book.txt")] and summary["elapsed_s"] == 1.23
    json.dumps(summary)
    with pytest.raises(ValueError, match="stopped_by"):
        write_summary(tmp_path, data=[], steps=0, total_steps=0, train_loss=None, val_loss=None, elapsed_s=0,
                      stopped_by="SIGINT")


def test_stop_signal_is_caught_once_then_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.name
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before
    assert stop.name == "SIGTERM"  # still known after the block (the trainers read it then)
    with StopSignal() as again:
        assert not again.name  # a new run starts clean
    assert not again.name


def test_a_stop_before_the_loop_is_not_lost_even_when_sigint_was_ignored():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os, signal
        from llmb.runlog import StopSignal, listen_for_stop
        listen_for_stop()                      # first thing in the trainer
        os.kill(os.getpid(), signal.SIGINT)    # the app's Stop, while data is still loading
        with StopSignal() as stop:
            print(stop.name)
    """)
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731  (as under `nohup ... &`)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=ignore)
    assert out.stdout.strip() == "SIGINT", out.stderr


def test_a_stop_inside_abandonable_work_drops_it_and_puts_the_random_states_back():
    import torch

    from llmb.runlog import StepAbandoned

    batches = torch.Generator().manual_seed(0)
    with StopSignal() as stop:
        torch.manual_seed(1)
        before = torch.get_rng_state(), batches.get_state()
        with pytest.raises(StepAbandoned):
            with stop.abandonable(batches):
                torch.randint(10, (4,), generator=batches)  # the step draws its batch, then dropout ...
                torch.rand(100)
                os.kill(os.getpid(), signal.SIGINT)  # ... and the Stop comes mid-step
                pytest.fail("the work went on after the stop signal")
        assert stop.name == "SIGINT"
        assert torch.equal(torch.get_rng_state(), before[0]) and torch.equal(batches.get_state(), before[1])
        with pytest.raises(StepAbandoned):  # a stop that came before: the next step does not begin
            with stop.abandonable():
                pytest.fail("a step began after the stop signal")


def test_a_stop_outside_abandonable_work_waits_for_the_loop():
    with StopSignal() as stop:
        with stop.abandonable():
            pass  # a step's forward and backward
        os.kill(os.getpid(), signal.SIGTERM)  # during the optimizer step or a save: not interrupted
        assert stop.name == "SIGTERM"
    with StopSignal(abandon=False) as stop:  # several processes: each step runs to its end
        with stop.abandonable():
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.name == "SIGINT"


def test_a_stop_abandons_a_long_backward_pass_half_way():
    """A backward pass is C++ from end to end, and a signal handler only runs between Python bytecodes: without
    stop_points_in_backward the stop waited for the whole pass (minutes for a real model's step on a CPU)."""
    import threading

    import torch

    from llmb.runlog import StepAbandoned
    from llmb.stopping import stop_points_in_backward

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(768, 768) for _ in range(16)]))
    blocks = model[0]
    stop_points_in_backward(model)
    x = torch.randn(1536, 768)

    def loss():
        h = x
        for block in blocks:
            h = torch.tanh(block(h))
        return h.square().mean()

    began = time.perf_counter()
    loss().backward()  # how long a whole backward pass takes here
    whole = time.perf_counter() - began
    model.zero_grad(set_to_none=True)
    timer = threading.Timer(whole / 5, os.kill, (os.getpid(), signal.SIGINT))
    with StopSignal() as stop:
        with pytest.raises(StepAbandoned):
            with stop.abandonable():
                forward = loss()
                timer.start()
                forward.backward()
                timer.join()  # a backward pass that ended first: the stop comes here
        timer.join()
    done = [block.weight.grad is not None for block in blocks]
    assert not all(done), "the backward pass ran to its end before the stop was seen"
    assert any(done), f"the stop came before the backward pass began ({whole:.2f} s for a whole one)"
