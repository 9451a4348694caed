"""LoRA fine-tuning against TRL: our training loop vs TRL's SFTTrainer + peft on the same SmolLM2 run.

    pip install trl==1.16.0        # the peer; not a dependency of the project (needs nothing else we pin)
    python benchmarks/bench_sft_peer.py --rounds 3 --threads 1

The run, the same for both (bench_real_finetune's recipe):
    base   SmolLM2-135M-Instruct (`python -m llmb get-small-assistant`), fp32 on the CPU
    data   the first 200 rows of ../shared/data/guanaco/guanaco-llama2-1k_train.jsonl, read by llmb.assistant.data
    LoRA   r 16, alpha 32, dropout 0.05, every linear layer; AdamW lr 5e-4, constant after 1 warm-up step,
           gradient norm clipped at 0.3, batch 4, seq 128, 20 steps, no gradient checkpointing
    loss   on the answers only: ours by its labels, TRL by `assistant_only_loss` with `{% generation %}`
           markers added to SmolLM2's chat template (answer text and its <|im_end|>\\n, as ours)
Each tool keeps its own way with what does not fit in 128 tokens (ours: whole early exchanges go, then the
start of the question, the system text kept; TRL: the end is cut) and with batching (ours: length-grouped;
TRL: shuffled). Both run as separate processes, alternating (ours, TRL, ours, TRL ...); each prints its whole
command time, its training loop time, tokens/s (non-padding tokens over the loop time), its peak memory
(max RSS of that process), and the held-out loss of its adapter through `python -m llmb chat-eval` on the
first 32 rows of openassistant_best_replies_eval.jsonl (rows neither trains on).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, SHARED_DATA, median

STEPS, BATCH, SEQ, LR, RANK, ALPHA, DROPOUT, CLIP = 20, 4, 128, 5e-4, 16, 32, 0.05, 0.3
# SmolLM2's template writes every turn the same way; the assistant's words and end get {% generation %} markers
PLAIN_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
MARKED_TURN = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
               "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
               "{% else %}" + PLAIN_TURN + "{% endif %}")


def run_measured(cmd, env):
    """Like subprocess.run, plus the child's own peak RSS (os.wait4 reports that child alone)."""
    start = time.perf_counter()
    with open(os.devnull, "w") as null, tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdin=null, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{stdout[-2000:]}{stderr[-3000:]}")
    return stdout, seconds, usage.ru_maxrss / 2**20


def run_ours(base, work, env):
    out = work / f"ours-{time.time_ns()}"
    _, seconds, peak = run_measured(
        [sys.executable, "training/train_qlora.py", "--base", base, "--data", work / "train.jsonl", "--eval-data",
         work / "eval4.jsonl", "--max-eval-examples", 4, "--out", out, "--quant", "none", "--device", "cpu",
         "--max-steps", STEPS, "--max-seq-len", SEQ, "--batch-size", BATCH, "--grad-accum", 1, "--lr", LR,
         "--lora-r", RANK, "--lora-alpha", ALPHA, "--lora-dropout", DROPOUT, "--max-grad-norm", CLIP,
         "--eval-steps", STEPS, "--save-steps", STEPS, "--log-steps", 5, "--skip-bad-rows",
         "--no-gradient-checkpointing"], env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # tokens of each logged window = its rate x its length; the loop from after the first eval to the last record
    tokens = sum(r["tokens_per_sec"] * (r["elapsed_s"] - p["elapsed_s"]) for p, r in zip(records, records[1:])
                 if r.get("tokens_per_sec"))
    loop_s = records[-1]["elapsed_s"] - records[0]["elapsed_s"]
    return dict(command_s=seconds, loop_s=loop_s, tokens_per_s=tokens / loop_s, peak_gib=peak, adapter=out)


def run_trl(base, work, env):
    out = work / f"trl-{time.time_ns()}"
    child = [sys.executable, __file__, "--trl-child", base, work / "train.jsonl", out]
    stdout, seconds, peak = run_measured(child, env)
    figures = json.loads(stdout.strip().splitlines()[-1])
    return dict(command_s=seconds, loop_s=figures["train_runtime"], peak_gib=peak, adapter=out,
                tokens_per_s=figures["num_tokens"] / figures["train_runtime"])


def trl_child(base, train_file, out):
    """In its own process: TRL's SFTTrainer + peft on the run above; prints one JSON line of figures."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from llmb.assistant.data import load_chat_data, normalize

    tokenizer = AutoTokenizer.from_pretrained(base)
    if PLAIN_TURN not in tokenizer.chat_template:
        sys.exit("SmolLM2's chat template changed: cannot add the {% generation %} markers")
    tokenizer.chat_template = tokenizer.chat_template.replace(PLAIN_TURN, MARKED_TURN)
    train, _ = load_chat_data([train_file], eval_split=0, skip_bad_rows=True)
    rows = [{"messages": [{"role": t.role, "content": t.content} for t in normalize(turns)]} for turns in train]
    config = SFTConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
                       gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant_with_warmup",
                       warmup_steps=1, max_grad_norm=CLIP, weight_decay=0.0, max_length=SEQ, assistant_only_loss=True,
                       logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, seed=0, bf16=False,
                       gradient_checkpointing=False, dataloader_num_workers=0)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    result = trainer.train()
    trainer.model.save_pretrained(out)  # the adapter only: chat-eval then uses the base's own chat template
    num_tokens = max((log["num_tokens"] for log in trainer.state.log_history if "num_tokens" in log), default=0)
    print(json.dumps({"train_runtime": result.metrics["train_runtime"], "num_tokens": num_tokens}))


def chat_eval(base, data, env, adapter=None):
    stdout, _, _ = run_measured([sys.executable, "-m", "llmb", "chat-eval", "--base", base, "--data", data,
                                 "--max-seq-len", SEQ, "--device", "cpu",
                                 *(["--adapter", adapter] if adapter else [])], env)
    return json.loads(stdout.strip().splitlines()[-1])["loss"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every run (default: torch's own)")
    p.add_argument("--trl-child", nargs=3, metavar=("BASE", "TRAIN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_child:
        return trl_child(*args.trl_child)
    try:
        import trl
    except ImportError:
        sys.exit("the peer is TRL: pip install trl==1.16.0 (it is not one of the project's dependencies)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    base = subprocess.run([sys.executable, "-m", "llmb", "get-small-assistant", "--checkpoints", REPO / "checkpoints"],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    work = Path(tempfile.mkdtemp(prefix="bench-sft-peer-"))
    g = SHARED_DATA / "guanaco"
    rows = (g / "guanaco-llama2-1k_train.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    held_out = (g / "openassistant_best_replies_eval.jsonl").read_text(encoding="utf-8").splitlines()
    (work / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (work / "eval.jsonl").write_text("\n".join(held_out[:32]) + "\n", encoding="utf-8")
    (work / "eval4.jsonl").write_text("\n".join(held_out[32:36]) + "\n", encoding="utf-8")  # ours' own eval
    print(f"trl {trl.__version__}; threads {args.threads or 'default'}; work dir {work}", flush=True)
    before = chat_eval(base, work / "eval.jsonl", env)
    print(f"held-out loss of the base: {before:.4f}", flush=True)

    runs = {"ours": [], "TRL": []}
    for r in range(args.rounds):
        for name, fn in (("ours", run_ours), ("TRL", run_trl)):
            run = fn(base, work, env)
            run["loss"] = chat_eval(base, work / "eval.jsonl", env, run.pop("adapter"))
            runs[name].append(run)
            print(f"  round {r + 1}: {name:>4}: command {run['command_s']:.1f} s, loop {run['loop_s']:.1f} s, "
                  f"{run['tokens_per_s']:.0f} tokens/s, peak {run['peak_gib']:.2f} GiB, held-out loss "
                  f"{run['loss']:.4f}", flush=True)
    ratios = [f"{a['loop_s'] / b['loop_s']:.2f}x" for a, b in zip(runs["ours"], runs["TRL"])]
    command = [f"{a['command_s'] / b['command_s']:.2f}x" for a, b in zip(runs["ours"], runs["TRL"])]
    print(f"\nour training loop took {', '.join(ratios)} TRL's time (whole command: {', '.join(command)})")
    for name, rs in runs.items():
        print(f"{name:>5}: loop {median([r['loop_s'] for r in rs]):.1f} s, "
              f"{median([r['tokens_per_s'] for r in rs]):.0f} tokens/s, peak memory "
              f"{min(r['peak_gib'] for r in rs):.2f}-{max(r['peak_gib'] for r in rs):.2f} GiB, held-out loss "
              f"{before:.4f} -> " + ", ".join(f"{r['loss']:.4f}" for r in rs))


if __name__ == "__main__":
    main()
