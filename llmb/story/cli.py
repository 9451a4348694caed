"""Story model commands: `llmb train-story|sample|eval|lr-find` (`training/train_char.py` is `llmb train-story`).

The trainer's flags are generated from llmb.story.config.TrainConfig (lr-find takes the model's share),
`sample`'s from StorySampling.
"""

import argparse
import json
import sys
from dataclasses import asdict

from llmb.settings import add_arguments, from_args

EVAL_SETTINGS = ("data", "val_fraction", "batch_size", "device")


TRAIN_HELP = """Train the character-level story model on a folder of books.

    llmb train-story --data data/books/oz --out checkpoints/my-story --max-time 600

Ctrl-C saves the last completed step and exits, within seconds; --resume continues (same flags; only how long and how often may change);
--overwrite replaces a run already in --out. Several processes: accelerate launch -m llmb train-story ...
"""


def cmd_train(args):
    from llmb.story.config import TrainConfig
    from llmb.story.train import train

    train(from_args(TrainConfig, args))


def cmd_sample(args):
    from llmb.story.checkpoint import load_for_sampling
    from llmb.story.config import StorySampling
    from llmb.story.sample import generate

    sampling = from_args(StorySampling, args)  # before the model loads
    model, tokenizer, _ = load_for_sampling(args.ckpt, args.device, args.precision)
    unknown = tokenizer.unknown(args.prompt)
    if unknown:
        print(f"note: dropped characters the model never saw: {''.join(unknown)!r}", file=sys.stderr)
    sys.stdout.write(args.prompt)
    for piece in generate(model, tokenizer, args.prompt, **asdict(sampling)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_eval(args):
    from llmb.device import resolve_device
    from llmb.story.batches import data_warnings
    from llmb.story.train import evaluate_checkpoint

    result = evaluate_checkpoint(args.ckpt, args.data, args.val_fraction, args.batch_size, resolve_device(args.device))
    for warning in data_warnings(result["bpc_lossless"], result["unencodable_chars"], result["val_chars"]):
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(result))


def cmd_lr_find(args):
    from llmb.folders import check_out_folder
    from llmb.story.config import TrainConfig
    from llmb.story.lr_finder import find_lr

    cfg = from_args(TrainConfig, args)
    check_out_folder(cfg.out, "lr-find", cfg.overwrite)
    find_lr(cfg, num_iters=args.num_iters, start_lr=args.start_lr, end_lr=args.end_lr,
            out_dir=args.out)
    print(f"wrote {args.out}/lr_find.png and {args.out}/lr_find.json")


def register(sub):
    from llmb.quantize import PRECISIONS
    from llmb.story.config import LR_FIND_SETTINGS, StorySampling, TrainConfig

    p = sub.add_parser("train-story", help="train the character-level story model on a folder of books",
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="continue a prompt with a story model (streams)")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint folder (a training --out)")
    p.add_argument("--prompt", default="\n", help="text to continue")
    add_arguments(p, StorySampling, as_text=True)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="weights while sampling; auto: int8 linear layers on a CPU (faster than fp32, "
                        "val loss +0.001 nats/char on the Oz model; figures in docs/results.md), fp32 on a GPU")
    p.add_argument("--cpu-int8", dest="precision", action="store_const", const="int8",
                   help="same as --precision int8 (sampling on the CPU)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="val loss (nats/token) and bits per character on the validation split")
    p.add_argument("--ckpt", required=True, metavar="DIR")
    add_arguments(p, TrainConfig, only=EVAL_SETTINGS)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lr-find", help="LR range test: writes lr_find.png and lr_find.json to --out")
    add_arguments(p, TrainConfig, only=LR_FIND_SETTINGS)
    p.add_argument("--num-iters", type=int, default=200, help="batches in the sweep")
    p.add_argument("--start-lr", type=float, default=1e-5)
    p.add_argument("--end-lr", type=float, default=1.0)
    p.set_defaults(func=cmd_lr_find)
