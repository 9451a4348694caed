"""Assistant commands: train-assistant, chat, chat-eval, merge, push, import-gguf, export-gguf,
get-small-assistant. Heavy imports live inside the functions so --help is fast."""

import argparse
import sys
from dataclasses import asdict

from llmb.assistant.config import DEFAULT_BASE, SAMPLING_KEYS, ChatSampling, ExportConfig, model_sampling
from llmb.quantize import PRECISIONS
from llmb.settings import add_arguments, from_args, specs

TRAIN_HELP = """Fine-tune a causal LM (Phi-2 by default) with LoRA (QLoRA: a 4-bit base on a GPU) on chat data.

    llmb train-assistant --out checkpoints/phi2-guanaco --max-steps 500
    llmb train-assistant --base checkpoints/smollm2-135m-instruct --quant none --device cpu --out ...
    accelerate launch -m llmb train-assistant --out ...      # several GPUs

Ctrl-C saves the last completed step within seconds, however long a step is, and stops; --resume continues
from it exactly. Settings left to auto are sized to the device: on a CPU a run on the small assistant
(llmb get-small-assistant) takes about 5 minutes.
"""


def register(sub):
    """One parser per command, in --help's order: long because it lists them all, each a few plain lines."""
    from llmb.assistant.config import TrainConfig

    p = sub.add_parser("train-assistant", help="fine-tune the assistant with LoRA on chat data",
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("chat", help="chat with a base model (Phi-2 by default), optionally with a LoRA adapter")
    p.add_argument("--base", default=DEFAULT_BASE, help="hub id or local folder of the base model")
    p.add_argument("--adapter", help="LoRA adapter dir (the --out of llmb train-assistant)")
    p.add_argument("--quant", default="none", choices=["4bit", "8bit", "none"], help="load the base quantized (bitsandbytes)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="weights while answering; auto: fp32 on a CPU, bf16 or fp32 on a GPU; int8: int8 linear "
                        "layers on a CPU (2-4x faster decoding, but int8 activations change a small model's "
                        "answers: see docs/results.md)")
    p.add_argument("--cpu-int8", dest="precision", action="store_const", const="int8",
                   help="same as --precision int8 (CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="CPU threads for torch (on a busy machine 1 can be faster)")
    p.add_argument("--prompt", help="answer this one message and exit (default: interactive)")
    p.add_argument("--system", help="system text put before the conversation")
    add_arguments(p, ChatSampling, as_text=True, defaults=dict.fromkeys(SAMPLING_KEYS))
    p.set_defaults(func=cmd_chat)
    p.epilog = ("--temperature, --top-p and --top-k not given: the base model's own (its generation_config.json), "
                "else greedy for a model under 1B parameters, else 0.7, 0.9 and 50.")

    p = sub.add_parser("chat-eval", help="loss of a base (+ adapter) on the answers of chat data: one JSON line")
    p.add_argument("--base", default=DEFAULT_BASE, help="hub id or local folder of the base model")
    p.add_argument("--adapter", help="LoRA adapter dir (its prompt format is used)")
    p.add_argument("--data", nargs="+", required=True, help=".jsonl/.json/.parquet chat files (every row is scored)")
    p.add_argument("--max-seq-len", type=int, default=512, help="longest example in tokens, cut as in training")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--skip-bad-rows", action="store_true", help="skip unusable rows instead of stopping")
    p.set_defaults(func=cmd_chat_eval)

    p = sub.add_parser("import-gguf", help="turn a GGUF file (Ollama, LM Studio) into a model folder for --base")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--out", required=True, help="the new model folder")
    p.add_argument("--overwrite", action="store_true", help="replace the model folder in --out (once the new "
                   "one is written)")
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("export-gguf", help="write a base (+ LoRA adapter, merged in) as one GGUF file for llama.cpp, "
                       "Ollama, LM Studio")
    add_arguments(p, ExportConfig)
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("get-small-assistant", help="install and import SmolLM2-135M-Instruct, a small real "
                       "assistant that works offline; prints its folder")
    p.add_argument("--checkpoints", default="checkpoints", help="where the imported folder goes")
    p.add_argument("--overwrite", action="store_true", help="import it again over the folder made before")
    p.set_defaults(func=cmd_get_small_assistant)

    p = sub.add_parser("merge", help="fold a LoRA adapter into the base weights")
    p.add_argument("--base", default=DEFAULT_BASE)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--overwrite", action="store_true", help="replace the model folder in --out (once the merged "
                   "one is written)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("push", help="upload an adapter or story checkpoint dir to the Hugging Face hub")
    p.add_argument("dir")
    p.add_argument("--repo", required=True, help="hub repo id, e.g. you/phi2-guanaco")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_push)


def cmd_train(args):
    from llmb.assistant.config import TrainConfig
    from llmb.assistant.train import train

    summary = train(from_args(TrainConfig, args))
    if summary:  # only the main process has one
        how = "done" if summary["stopped_by"] == "done" else f"stopped by {summary['stopped_by']}"
        losses = "".join(f", {name} {summary[key]:.4f}" for name, key in
                         (("train loss", "final_train_loss"), ("val loss", "final_val_loss")) if summary[key] is not None)
        print(f"{how}: {summary['steps']} steps{losses}; adapter in {args.out}")
        if summary["stopped_by"] != "done" and summary.get("saved_step"):
            print(f"the checkpoint of step {summary['saved_step']} is kept; resume with: "
                  f"llmb train-assistant ... --out {args.out} --resume")


def cmd_chat(args):
    import torch

    from llmb.assistant.engine import ChatEngine
    from llmb.errors import UserError
    from llmb.settings import check_number

    if args.threads is not None:
        torch.set_num_threads(check_number("--threads", args.threads, 1, 4096, int))
    # before the model loads (minutes for Phi-2); the engine checks again for every caller
    sampling = dict(system=args.system, **asdict(from_args(ChatSampling, suited_sampling(args))))
    engine = ChatEngine(args.base, adapter=args.adapter, quant=args.quant, device=args.device, precision=args.precision)
    print(f"{args.base}{' + ' + args.adapter if args.adapter else ''} on {engine.describe()}", file=sys.stderr)
    if args.prompt is not None:
        print_answer(engine, [], args.prompt, sampling)
        return 0
    print("Chat: empty line or /quit to leave, /reset to forget the conversation, Ctrl-C stops an answer.")
    history = []
    while True:
        try:
            message = input("\nyou> ").strip()
        except EOFError:
            return 0
        if message in ("", "/quit"):
            return 0
        if message == "/reset":
            history = []
            continue
        print("assistant> ", end="", flush=True)
        try:
            history.append((message, print_answer(engine, history, message, sampling)[0]))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)


def suited_sampling(args):
    """`args` with the sampling flags not given taken from the base model (llmb.assistant.config.model_sampling)."""
    suited = model_sampling(args.base) | {k: v for k, v in vars(args).items() if k in SAMPLING_KEYS and v is not None}
    defaults = {s.name: s.default for s in specs(ChatSampling) if s.name in SAMPLING_KEYS}
    return argparse.Namespace(**(vars(args) | defaults | suited))


def print_answer(engine, history, message, sampling, out=None):
    """Stream the answer to `out` (stdout) as it comes, then its figures on stderr; returns (its text, its
    stats). Ctrl-C stops the answer ([stopped]) and keeps what was written."""
    out = out or sys.stdout
    answer, text = engine.stream(history, message, **sampling), ""
    try:
        for piece in answer:
            text += piece
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    finally:
        answer.close()  # stops generation if the loop was left early
        out.write("\n")
        out.flush()
    if answer.stats.get("new_tokens") is not None:
        print(answer_figures(answer.stats), file=sys.stderr)
    return text, answer.stats


def answer_figures(stats):
    """One answer's figures: '42 tokens, 9.8 tokens/s, first token 0.31 s'."""
    first = stats["time_to_first_token"]
    return (f"{stats['new_tokens']} tokens, {stats['tokens_per_sec']:.1f} tokens/s, "
            f"first token {'-' if first is None else f'{first:.2f}'} s")


def cmd_chat_eval(args):
    import json

    from llmb.assistant.train import chat_eval
    from llmb.settings import check_number

    max_seq_len = check_number("--max-seq-len", args.max_seq_len, 8, 16384, int)
    batch_size = check_number("--batch-size", args.batch_size, 1, 4096, int)
    print(json.dumps(chat_eval(args.base, args.data, args.adapter, max_seq_len, batch_size, args.device,
                               args.skip_bad_rows)))


def cmd_import_gguf(args):
    from llmb.assistant.gguf import import_gguf

    out = import_gguf(args.file, args.out, overwrite=args.overwrite)
    print(f"imported {args.file} into {out}; use it with --base {args.out}")


def cmd_export_gguf(args):
    from llmb.assistant.export_gguf import export_gguf

    cfg = from_args(ExportConfig, args)
    out = export_gguf(cfg.base, cfg.out, adapter=cfg.adapter, out_type=cfg.type, overwrite=cfg.overwrite)
    print(f"wrote {out}; run it with: llama-cli -m {out} --jinja, or in Ollama with FROM {out} in a Modelfile")


def cmd_get_small_assistant(args):
    """The folder on stdout (for scripts); what happened and what to do next on stderr."""
    import time
    from pathlib import Path

    from llmb.assistant.gguf import SMALL_HUB_ID, SMALL_NAME, get_small_assistant
    from llmb.folders import is_base_model

    had = is_base_model(Path(args.checkpoints) / SMALL_NAME) and not args.overwrite
    t0 = time.time()
    out = get_small_assistant(args.checkpoints, overwrite=args.overwrite)
    how = "already installed in" if had else f"imported in {time.time() - t0:.0f} s into"
    print(f"{SMALL_HUB_ID} {how} {out}\n"
          f"next: pick `{SMALL_NAME}` in the Assistant tab's Base (python app.py), or chat here:\n"
          f"  python -m llmb chat --base {out}", file=sys.stderr)
    print(out)


def cmd_merge(args):
    from llmb.assistant.merge import merge

    out = merge(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {out}")


def cmd_push(args):
    from llmb.hub import push

    url = push(args.dir, args.repo, private=args.private)
    print(f"pushed {args.dir} to {url}")
