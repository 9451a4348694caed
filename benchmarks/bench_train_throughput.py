"""Training throughput at nanoGPT's CPU config (4 layers, 4 heads, 128 wide, block 64, batch 12,
dropout 0) on tinyshakespeare, read from the run's metrics.jsonl.

Reference on the 2-core dev machine: nanoGPT's train.py at this config, about 12.6k tokens/s.
Target: >= 14.5k tokens/s.

    python benchmarks/bench_train_throughput.py [--iters 400]
"""

import argparse
import statistics
import tempfile

from common import SHARED_DATA

from llmb.runlog import read_metrics
from llmb.story.train import TrainConfig, train

NANOGPT_TOKENS_PER_SEC = 12_600

p = argparse.ArgumentParser()
p.add_argument("--iters", type=int, default=400)
p.add_argument("--data", default=str(SHARED_DATA / "tinyshakespeare.txt"))
args = p.parse_args()

with tempfile.TemporaryDirectory() as out:
    cfg = TrainConfig(data=[args.data], out=out, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                      dropout=0.0, max_iters=args.iters, eval_interval=args.iters, eval_iters=1, log_interval=20,
                      progress=False)
    train(cfg, log=lambda *a: None)
    records = read_metrics(f"{out}/metrics.jsonl")
speeds = [r["tokens_per_sec"] for r in records[2:] if "val_loss" not in r]  # skip warm-up and the eval step
median = statistics.median(speeds)
print(f"train throughput (4/4/128, block 64, batch 12): {median:,.0f} tokens/s "
      f"(nanoGPT reference {NANOGPT_TOKENS_PER_SEC:,}; ratio {median / NANOGPT_TOKENS_PER_SEC:.2f}x; target >= 14,500)")
