"""Time to val loss <= 1.886 on tinyshakespeare: train with the default settings for 60 s, then
evaluate on the validation split, exactly as a user would:

    python training/train_char.py --data ../shared/data/tinyshakespeare.txt --out DIR --max-time 60
    python -m llmb eval --ckpt DIR --data ../shared/data/tinyshakespeare.txt

Reference: nanoGPT's CPU config reaches 1.886 after 2000 iterations in 134 s. Target: <= 60 s.

    python benchmarks/bench_time_to_loss.py [--seconds 60]
"""

import argparse
import json
import subprocess
import sys
import tempfile

from common import REPO, SHARED_DATA

p = argparse.ArgumentParser()
p.add_argument("--seconds", type=float, default=60)
p.add_argument("--data", default=str(SHARED_DATA / "tinyshakespeare.txt"))
args = p.parse_args()

with tempfile.TemporaryDirectory() as out:
    subprocess.run([sys.executable, "training/train_char.py", "--data", args.data, "--out", out,
                    "--max-time", str(args.seconds), "--no-progress"], cwd=REPO, check=True)
    result = subprocess.run([sys.executable, "-m", "llmb", "eval", "--ckpt", out, "--data", args.data],
                            cwd=REPO, check=True, capture_output=True, text=True)
    summary = json.loads(open(f"{out}/summary.json").read())
val = json.loads(result.stdout)
print(f"after {summary['elapsed_s']:.1f} s of training ({summary['steps']} steps, {summary['tokens_seen']:,} tokens): "
      f"val loss {val['val_loss']:.4f} nats/char, {val['val_bpc']:.4f} bpc "
      f"(target <= 1.886 in <= 60 s: {'met' if val['val_loss'] <= 1.886 else 'NOT met'})")
