"""The run log both trainers share: metrics.jsonl, summary.json and the graceful stop."""

import json
import os
import signal

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
