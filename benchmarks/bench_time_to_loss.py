"""Time to loss on tinyshakespeare: nanoGPT's CPU recipe (2000 iterations) against our trainer with
its default settings and a --max-time that makes our whole command take 0.33x the wall time nanoGPT
took in this same run:

    python train.py config/train_shakespeare_char.py --device=cpu ... --max_iters=2000   (nanoGPT)
    python training/train_char.py --data tinyshakespeare.txt --out DIR --max-iters 1      (our start-up,
                                                                   one step, the last eval and save: S)
    python training/train_char.py --data tinyshakespeare.txt --out DIR --max-time 0.33*T - S  (ours)
    python -m llmb eval --ckpt DIR --data tinyshakespeare.txt

With --max-time under 5 minutes our default depth (--n-layer auto) is 2 blocks, not nanoGPT's 4.

Both final models are scored the same way on the same validation text (the last 10%), with
non-overlapping windows of 64 characters; nanoGPT's own estimate (20 random batches) is printed
beside it. Goal: ours reaches nanoGPT's final val loss.

    python benchmarks/bench_time_to_loss.py [--share 0.33] [--rounds 1] [--threads N] [--nanogpt DIR]
"""

import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

from common import (
    NANOGPT_CPU_RECIPE,
    REPO,
    median,
    nanogpt_train,
    nanogpt_workdir,
    parse,
    peer_parser,
    run,
    train_char,
)


def nanogpt_val_loss(work, out, block_size=64, batch_size=32):
    """Mean val loss of nanoGPT's saved model over non-overlapping windows (as `llmb eval` scores ours)."""
    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(work) / "model.py")
    nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nano)
    ckpt = torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=False)
    model = nano.GPT(nano.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    val = torch.from_numpy(np.fromfile(Path(work) / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16)
                           .astype(np.int64))
    starts = torch.linspace(0, len(val) - 1 - block_size, (len(val) - 1) // block_size).long()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            s = starts[i:i + batch_size]
            x = torch.stack([val[j:j + block_size] for j in s])
            y = torch.stack([val[j + 1:j + 1 + block_size] for j in s])
            total += model(x, y)[1].item() * len(s)  # with targets, nanoGPT scores every position
    return total / len(starts)


def nanogpt(work):
    with tempfile.TemporaryDirectory() as out:
        seconds, log = nanogpt_train(work, *NANOGPT_CPU_RECIPE, f"--out_dir={out}")
        own = float(re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", log, re.M)[-1])
        return seconds, own, nanogpt_val_loss(work, out)


def our_overhead(data):
    """Seconds our command takes around its training: start-up, reading the data, one step, the last save."""
    with tempfile.TemporaryDirectory() as out:
        return train_char(data, out, "--max-iters", "1", "--eval-iters", "20")


def ours(data, seconds):
    with tempfile.TemporaryDirectory() as out:
        wall = train_char(data, out, "--max-time", f"{seconds:.1f}")
        _, result = run([sys.executable, "-m", "llmb", "eval", "--ckpt", out, "--data", data], cwd=REPO)
        summary = json.loads((Path(out) / "summary.json").read_text())
    return wall, summary, json.loads(result)["val_loss"]


def main():
    p = peer_parser(__doc__, rounds=1)
    p.add_argument("--share", type=float, default=0.33, help="our whole command's time as a share of nanoGPT's")
    args = parse(p)
    met = []
    with nanogpt_workdir(args.nanogpt, args.data) as work:
        for r in range(args.rounds):
            nano_s, nano_own, nano_val = nanogpt(work)
            print(f"  round {r + 1}: nanoGPT 2000 iterations: {nano_s:.1f} s, val {nano_val:.4f} "
                  f"(its own 20-batch estimate {nano_own:.4f})", flush=True)
            overhead = our_overhead(args.data)
            budget = args.share * nano_s - overhead
            wall, summary, val = ours(args.data, budget)
            print(f"  round {r + 1}: llmb --max-time {budget:.1f} (start-up and last save: {overhead:.1f} s): "
                  f"{wall:.1f} s in all, "
                  f"{summary['steps']} steps, {summary['tokens_seen']:,} tokens, val {val:.4f}", flush=True)
            met.append((val, nano_val, wall / nano_s))
    print(f"time to loss (tinyshakespeare, defaults, our command in {args.share}x nanoGPT's wall time): "
          f"llmb val {median([m[0] for m in met]):.4f} vs nanoGPT {median([m[1] for m in met]):.4f} nats/char, "
          f"llmb's whole command took {median([m[2] for m in met]):.2f}x nanoGPT's; "
          f"target (llmb <= nanoGPT's loss in <= {args.share}x its time, 2% spare) "
          f"{'met' if all(m[0] <= m[1] and m[2] <= 1.02 * args.share for m in met) else 'NOT met'}")


if __name__ == "__main__":
    main()
