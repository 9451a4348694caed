"""How soon Stop saves a LoRA run in a long step: SmolLM2-135M-Instruct on a CPU with Phi-2's GPU recipe.

    python benchmarks/bench_stop.py                  # stops 8, 30 and 50 s after step 1: ~10 min on 2 cores
    python benchmarks/bench_stop.py --after 5 20     # other moments

Phi-2's recipe (4 x 4 sequences of 512 tokens, gradient checkpointing) takes a minute or more a step on two CPU
cores; the app's Stop used to wait for the step to end, and killed the run unsaved (SIGKILL) after 60 s. Each
round starts `python -m llmb train-assistant` with that recipe on the shipped guanaco chats, waits until step 1 is
logged, sends SIGINT `after` seconds later (within a later step) and measures from the signal: when progress.json
says "stop requested", when the checkpoint is saved, when the process has exited. Needs the small assistant
(`python -m llmb get-small-assistant`).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO

from llmb.runlog import read_metrics, read_progress

RECIPE = ["--max-seq-len", "512", "--batch-size", "4", "--grad-accum", "4", "--gradient-checkpointing"]


def stop_once(out, after):
    """One run stopped `after` s past its step 1; (answered, saved, exited) in seconds from the signal, the summary."""
    cmd = [sys.executable, "-m", "llmb", "train-assistant", "--base", REPO / "checkpoints" / "smollm2-135m-instruct",
           "--data", REPO / "data" / "guanaco" / "guanaco-llama2-1k_train.jsonl", "--skip-bad-rows", "--quant", "none",
           "--device", "cpu", "--out", out, "--log-steps", "1", "--max-eval-examples", "4", "--max-steps", "100",
           *RECIPE]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    while not any(r["step"] >= 1 for r in read_metrics(out / "metrics.jsonl")):
        if proc.poll() is not None:
            sys.exit(f"the trainer ended before step 1 (exit code {proc.returncode})")
        time.sleep(0.2)
    time.sleep(after)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    answered = saved = None
    while proc.poll() is None:
        if answered is None and "stop requested" in (read_progress(out, since=sent).get("phase") or ""):
            answered = time.time() - sent
        if saved is None and any(f.stat().st_mtime > sent for f in out.glob("checkpoint-*/training_state.pt")):
            saved = time.time() - sent
        time.sleep(0.05)
    return (answered, saved, time.time() - sent), json.loads((out / "summary.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--after", type=float, nargs="+", default=[8, 30, 50],
                        help="seconds after step 1 is logged to send SIGINT, one run each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i, after in enumerate(args.after):
            (answered, saved, exited), summary = stop_once(Path(tmp) / f"run{i}", after)
            shown = [f"{s:.1f} s" if s is not None else "never" for s in (answered, saved)]
            print(f"SIGINT {after:g} s after step 1: answered in {shown[0]}, saved step {summary['saved_step']} in "
                  f"{shown[1]}, exited in {exited:.1f} s (stopped_by {summary['stopped_by']}, "
                  f"{summary['steps']} steps)", flush=True)


if __name__ == "__main__":
    main()
