"""Train the character-level story model on a folder of books.

    python training/train_char.py --data path/to/books --out checkpoints/my-story --max-time 600
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llmb.cli_story import add_train_arguments, config_from_args, lr_value  # noqa: E402
from llmb.errors import UserError  # noqa: E402
from llmb.train import TrainConfig, train  # noqa: E402


def main(argv=None):
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p, d)
    p.add_argument("--lr", type=str, default=str(d.lr), help="peak learning rate, or 'auto' to run the LR finder first")
    p.add_argument("--schedule", default=d.schedule, choices=["onecycle", "cosine", "constant"])
    p.add_argument("--max-iters", type=int, default=None, help="stop after N steps")
    p.add_argument("--max-time", type=float, default=None, help="stop after S seconds of training")
    p.add_argument("--eval-interval", type=int, default=d.eval_interval, help="evaluate and save every N steps")
    p.add_argument("--eval-iters", type=int, default=d.eval_iters, help="batches per evaluation")
    p.add_argument("--log-interval", type=int, default=d.log_interval)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    args = p.parse_args(argv)
    try:
        args.lr = lr_value(args.lr)
        train(config_from_args(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
