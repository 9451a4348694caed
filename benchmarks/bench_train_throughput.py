"""Training throughput at nanoGPT's CPU config (4 layers, 4 heads, 128 wide, block 64, batch 12,
dropout 0) on tinyshakespeare: our `training/train_char.py` against nanoGPT's `train.py`, run
in turn in the same run (nanoGPT, ours, nanoGPT, ours ...), each as a user starts it.

Both figures are tokens/s over windows of 10 steps, median over the run (the first window, with
its warm-up, left out): ours from the run's metrics.jsonl, nanoGPT's from the step times it
prints. Parity (>= 0.95x nanoGPT) is the goal; why more is out of reach on a CPU: bench_train_breakdown.py.

    python benchmarks/bench_train_throughput.py [--iters 300] [--rounds 2] [--threads N] [--nanogpt DIR]
"""

import re
import tempfile

from common import (
    NANOGPT_CPU_RECIPE,
    OUR_CPU_CONFIG,
    alternate,
    median,
    nanogpt_train,
    nanogpt_workdir,
    parse,
    peer_parser,
    train_char,
)

from llmb.runlog import read_metrics

WINDOW = 10  # steps per throughput window (our trainer's default --log-interval)
TOKENS_PER_STEP = 12 * 64


def ours(data, iters):
    with tempfile.TemporaryDirectory() as out:
        train_char(data, out, *OUR_CPU_CONFIG, "--max-iters", iters, "--eval-interval", iters, "--eval-iters", 1,
                   "--log-interval", WINDOW)
        speeds = [r["tokens_per_sec"] for r in read_metrics(f"{out}/metrics.jsonl")]
    return round(median(speeds[1:]))


def nanogpt(work, iters):
    with tempfile.TemporaryDirectory() as out:
        flags = [f for f in NANOGPT_CPU_RECIPE if not f.startswith("--max_iters")]
        _, log = nanogpt_train(work, *flags, f"--max_iters={iters}", f"--eval_interval={iters}", f"--out_dir={out}")
    step_ms = [float(ms) for ms in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", log, re.M)]
    # iter 0 includes the first eval; windows of 10 steps as in our log, the first one left out
    windows = [sum(step_ms[i:i + WINDOW]) for i in range(1, len(step_ms) - WINDOW + 1, WINDOW)]
    return round(median([WINDOW * TOKENS_PER_STEP / (ms / 1000) for ms in windows[1:]]))


def main():
    p = peer_parser(__doc__, rounds=2)
    p.add_argument("--iters", type=int, default=300, help="training steps per run")
    args = parse(p)
    with nanogpt_workdir(args.nanogpt, args.data) as work:
        results = alternate([("nanoGPT", lambda: nanogpt(work, args.iters)),
                             ("llmb", lambda: ours(args.data, args.iters))], args.rounds)
    ratios = [a / b for a, b in zip(results["llmb"], results["nanoGPT"])]
    print(f"train throughput (4/4/128, block 64, batch 12), {args.iters} steps x {args.rounds} rounds: "
          f"llmb {median(results['llmb']):,.0f} tokens/s, nanoGPT {median(results['nanoGPT']):,.0f} tokens/s; "
          f"ratio {median(ratios):.2f}x (per round: {', '.join(f'{r:.2f}' for r in ratios)}; target: parity, >= 0.95x)")


if __name__ == "__main__":
    main()
