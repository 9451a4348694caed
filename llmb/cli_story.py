"""Story model command line: `python -m llmb sample|eval|lr-find` and the flags of
`training/train_char.py` (defined here once, shared with lr-find)."""

import json
import sys
from dataclasses import fields

from llmb.errors import UserError


def lr_value(text):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--lr must be a number or 'auto' (got {text!r})") from None


def add_train_arguments(p, defaults):
    d = defaults
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files and/or folders of .txt books (read in sorted order)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (checkpoint, metrics, plots)")
    p.add_argument("--tokenizer", default=d.tokenizer, metavar="char|wordpiece|NAME",
                   help="char (default), wordpiece (trained on the corpus) or a pretrained hub id / local path")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="vocabulary size for --tokenizer wordpiece")
    p.add_argument("--n-layer", type=int, default=d.n_layer)
    p.add_argument("--n-head", type=int, default=d.n_head)
    p.add_argument("--n-embd", type=int, default=d.n_embd)
    p.add_argument("--block-size", type=int, default=d.block_size, help="context length in tokens")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="last part of every book held out")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args):
    from llmb.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_sample(args):
    from llmb.checkpoint import load_checkpoint
    from llmb.device import resolve_device
    from llmb.sample import check_sampling, generate

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = "cpu" if args.cpu_int8 else resolve_device(args.device)
    model, tokenizer, _ = load_checkpoint(args.ckpt, device, cpu_int8=args.cpu_int8)
    unknown = tokenizer.unknown(args.prompt)
    if unknown:
        print(f"note: dropped characters the model never saw: {''.join(unknown)!r}", file=sys.stderr)
    sys.stdout.write(args.prompt)
    for piece in generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_eval(args):
    from llmb.train import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.ckpt, args.data, args.val_fraction, args.batch_size)))


def cmd_lr_find(args):
    from llmb.train import find_lr

    find_lr(config_from_args(args), num_iters=args.num_iters, start_lr=args.start_lr, end_lr=args.end_lr,
            out_dir=args.out)
    print(f"wrote {args.out}/lr_find.png and {args.out}/lr_find.json")


def register(sub):
    from llmb.train import TrainConfig

    p = sub.add_parser("sample", help="continue a prompt with a story model (streams)")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint folder (a training --out)")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cpu-int8", action="store_true", help="int8 linear layers: faster sampling on a CPU")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="val loss (nats/token) and bits per character on the validation split")
    p.add_argument("--ckpt", required=True, metavar="DIR")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH")
    p.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction)
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lr-find", help="LR range test: writes lr_find.png and lr_find.json to --out")
    add_train_arguments(p, TrainConfig())
    p.add_argument("--num-iters", type=int, default=200, help="batches in the sweep")
    p.add_argument("--start-lr", type=float, default=1e-5)
    p.add_argument("--end-lr", type=float, default=1.0)
    p.set_defaults(func=cmd_lr_find)
