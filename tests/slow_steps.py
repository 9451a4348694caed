"""Trainers with long steps, as a real model's step on a CPU is (minutes for Phi-2), for the Stop tests.

`python tests/slow_steps.py FAST SECONDS COMMAND ...` runs `python -m llmb COMMAND ...` with every training step
after the first FAST taking SECONDS longer: the loss's cross-entropy waits, in 0.1 s sleeps, whenever it runs with
gradients on (a training micro-batch, not an evaluation), late in the forward pass, after the step has drawn its
batch and its dropout masks.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start(fast, seconds, *argv):
    """The trainer `llmb *argv`, its micro-batches after the first `fast` slowed down by `seconds` (a Popen)."""
    return subprocess.Popen([sys.executable, str(Path(__file__)), str(fast), str(seconds), *map(str, argv)], cwd=REPO,
                            env=os.environ | {"PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_mid_step(proc, metrics, step, timeout=180):
    """Once `metrics` (a metrics.jsonl) has the record of `step`, wait 1 s into the next (slow) step, send SIGINT,
    and wait for the trainer to exit: (seconds from the signal to the exit, stdout, stderr)."""
    from llmb.runlog import read_metrics

    deadline = time.time() + timeout
    try:
        while not any(r["step"] >= step for r in read_metrics(metrics)) and proc.poll() is None:
            assert time.time() < deadline, f"no record of step {step} in {timeout} s"
            time.sleep(0.1)
        time.sleep(1.0)
        sent = time.time()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        return time.time() - sent, out, err
    finally:
        if proc.poll() is None:  # a trainer that waits for its slow step to end
            proc.kill()
            proc.communicate()


def slow_cross_entropy(fast, seconds):
    import torch
    import torch.nn.functional as F

    real, calls = F.cross_entropy, [0]

    def cross_entropy(*args, **kwargs):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] > fast:
                for _ in range(round(seconds * 10)):
                    time.sleep(0.1)
        return real(*args, **kwargs)

    F.cross_entropy = cross_entropy


if __name__ == "__main__":
    from llmb.__main__ import main

    slow_cross_entropy(int(sys.argv[1]), float(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
