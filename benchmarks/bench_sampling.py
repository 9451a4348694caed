"""Sampling 1000 new characters at the 10.65M config (6 layers, 6 heads, 384 wide, block 256):
`python -m llmb sample` (default settings: int8 linear layers on a CPU, then `--precision fp32`)
against nanoGPT's `sample.py`,
run in turn in the same run, each as a user starts it, on checkpoints both trainers wrote.

Two figures per contender: the whole command (start-up and loading included: what a user
waits for) and the generation alone (from the moment the command has loaded its model, read
off its unbuffered output: our prompt echo, nanoGPT's "Loading meta" line). Goal:
default settings >= 20x nanoGPT's generate; int8 measurably faster than fp32.

nanoGPT's sample.py imports tiktoken (`pip install tiktoken`), though a character model never uses it.

    python benchmarks/bench_sampling.py [--tokens 1000] [--rounds 2] [--threads N] [--nanogpt DIR]
"""

import os
import subprocess
import sys
import tempfile
import time

from common import REPO, alternate, median, nanogpt_train, nanogpt_workdir, parse, peer_parser, train_char

MODEL_10M = ["--n-layer", "6", "--n-head", "6", "--n-embd", "384", "--block-size", "256"]


def timed_stream(cmd, cwd, marker):
    """Run cmd unbuffered; return (total seconds, seconds after `marker` (bytes) appeared in its output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, loaded = b"", None
    while chunk := os.read(proc.stdout.fileno(), 1 << 16):
        if loaded is None:
            seen += chunk
            if marker in seen:
                loaded = time.perf_counter()
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{err[-3000:]}")
    end = time.perf_counter()
    return end - start, end - (loaded or start)


def ours(ckpt, tokens, *flags):
    # the prompt is echoed (and flushed with the first piece) once the model is loaded
    total, generation = timed_stream([sys.executable, "-u", "-m", "llmb", "sample", "--ckpt", ckpt, "--prompt", "@@",
                                      "--max-new-tokens", str(tokens), "--seed", "0", *flags], REPO, b"@@")
    return round(tokens / total, 1), round(tokens / generation, 1)


def nanogpt(work, ckpt_dir, tokens):
    total, generation = timed_stream([sys.executable, "-u", "sample.py", f"--out_dir={ckpt_dir}", "--device=cpu",
                                      "--num_samples=1", f"--max_new_tokens={tokens}", "--compile=False"],
                                     work, b"Loading meta")
    return round(tokens / total, 1), round(tokens / generation, 1)


def make_checkpoints(work, data, ours_dir, nano_dir):
    """One training step each at the 10.65M config: speed does not depend on the weights."""
    train_char(data, ours_dir, *MODEL_10M, "--max-iters", "1", "--eval-iters", "1", "--sample-chars", "1",
               "--batch-size", "1")
    nanogpt_train(work, "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--max_iters=1",
                  "--eval_interval=1", "--eval_iters=1", "--batch_size=1", "--always_save_checkpoint=True",
                  f"--out_dir={nano_dir}")


def main():
    p = peer_parser(__doc__, rounds=2)
    p.add_argument("--tokens", type=int, default=1000)
    args = parse(p)
    with nanogpt_workdir(args.nanogpt, args.data) as work, tempfile.TemporaryDirectory() as tmp:
        make_checkpoints(work, args.data, f"{tmp}/ours", f"{tmp}/nano")
        results = alternate([("nanoGPT sample.py", lambda: nanogpt(work, f"{tmp}/nano", args.tokens)),
                             ("llmb sample", lambda: ours(f"{tmp}/ours", args.tokens)),
                             ("llmb sample --precision fp32",
                              lambda: ours(f"{tmp}/ours", args.tokens, "--precision", "fp32"))],
                            args.rounds)
    print(f"sampling {args.tokens} characters, 10.65M model (6/6/384, block 256), {args.rounds} rounds; "
          "tokens/s as (whole command, generation alone):")
    peer = results["nanoGPT sample.py"]
    for name, runs in results.items():
        whole = median([r[0] / p[0] for r, p in zip(runs, peer)])
        gen = median([r[1] / p[1] for r, p in zip(runs, peer)])
        print(f"  {name:29s} whole command {median([r[0] for r in runs]):7.1f} tok/s ({whole:5.1f}x nanoGPT), "
              f"generation {median([r[1] for r in runs]):7.1f} tok/s ({gen:5.1f}x nanoGPT)")
    int8 = median([a[1] / b[1] for a, b in zip(results["llmb sample"], results["llmb sample --precision fp32"])])
    print(f"  int8 (the CPU default) / fp32 generation: {int8:.2f}x (target: above 1)")


if __name__ == "__main__":
    main()
