"""Fine-tune Phi-2 with QLoRA on chat data (openassistant-guanaco by default).

    python training/train_qlora.py --out checkpoints/phi2-guanaco --max-steps 500
    accelerate launch training/train_qlora.py --out ...      # several GPUs

Ctrl-C saves the adapter and stops; --resume continues from the last checkpoint.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from llmb.errors import UserError  # noqa: E402

DEFAULTS = dict(base="microsoft/phi-2", data="timdettmers/openassistant-guanaco")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="QLoRA fine-tuning of a causal LM on chat data.")
    p.add_argument("--base", default=DEFAULTS["base"], help="hub id or local folder")
    p.add_argument("--data", nargs="+", default=[DEFAULTS["data"]], help="hub dataset ids and/or .jsonl/.json/.parquet files")
    p.add_argument("--out", required=True, help="output dir: the adapter, metrics.jsonl, summary.json, checkpoints")
    p.add_argument("--quant", default="4bit", choices=["4bit", "8bit", "none"])
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,dense,fc1,fc2", help="comma-separated module names")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--log-steps", type=int, default=10)
    p.add_argument("--eval-split", type=float, default=0.05, help="fraction of the data held out when there is no eval set")
    p.add_argument("--eval-data", help="separate eval file (or hub id)")
    p.add_argument("--max-eval-examples", type=int, default=200)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip unusable rows instead of stopping")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from llmb.qlora import TrainConfig, train

    config = vars(args) | {"lora_targets": [t.strip() for t in args.lora_targets.split(",") if t.strip()]}
    try:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_steps", "save_steps", "log_steps", "max_seq_len"):
            if config[name] < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        summary = train(TrainConfig(**config))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary:  # only the main process has one
        how = f"stopped by {summary['stopped_by']}" if summary["stopped_by"] else "done"
        losses = "".join(f", {name} {summary[key]:.4f}" for name, key in
                         (("train loss", "final_train_loss"), ("val loss", "final_val_loss")) if summary[key] is not None)
        print(f"{how}: {summary['steps']} steps{losses}; adapter in {args.out}")
        if summary["stopped_by"]:
            print(f"resume with: python training/train_qlora.py ... --out {args.out} --resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
