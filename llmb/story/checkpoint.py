"""The one story-model checkpoint format: a folder that inference reads without anything else.

    config.json         {"llmb": "story", "model": GPTConfig fields, "tokenizer": ..., "step": ...}
    model.safetensors   the weights
    char_vocab.json | tokenizer.json
    train_state.pt      optimizer, scheduler, step and random states for --resume (training only)
    metrics.jsonl, summary.json

A checkpoint is written whole into a staging folder beside it, then its files are moved in,
config.json last. A run killed at any moment leaves the previous checkpoint loadable; files
are created with the user's umask (not private to root) like any other file they write.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from llmb.errors import UserError
from llmb.fileio import read_json
from llmb.folders import STORY_CONFIG as CONFIG
from llmb.folders import STORY_WEIGHTS as WEIGHTS
from llmb.folders import require
from llmb.story.model import GPT, GPTConfig
from llmb.story.tokenizer import FILES as TOKENIZER_FILES
from llmb.story.tokenizer import load_tokenizer

STATE = "train_state.pt"
STAGING = ".saving"


def check_out_folder(out):
    """--out must be a folder we can write (or one we can create); checked before any work starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the checkpoint")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {parent} (read-only or not yours); give --out a folder you can write")
    return out


def save_checkpoint(out_dir, model, tokenizer, meta, state=None, replace=False):
    """Save weights, tokenizer, config (+ training state): complete in staging, then moved in.

    replace: the folder holds another run's checkpoint (--overwrite). Its config.json goes first,
    so a kill during the moves leaves no checkpoint rather than a mix of two runs' files.
    """
    out_dir = Path(out_dir)
    staging = out_dir / STAGING
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        tokenizer.save(staging)
        save_model(model, str(staging / WEIGHTS))
        if state is not None:
            torch.save(state, staging / STATE)
        (staging / CONFIG).write_text(json.dumps({"llmb": "story", "model": model.config.to_dict(), **meta},
                                                 indent=2) + "\n", encoding="utf-8")
        _sync(staging)
        if replace:
            for name in (CONFIG, STATE, *TOKENIZER_FILES):
                (out_dir / name).unlink(missing_ok=True)
        for f in sorted(staging.iterdir(), key=lambda f: f.name == CONFIG):  # config.json last
            os.replace(f, out_dir / f.name)
        _sync(out_dir, files=False)
        staging.rmdir()
    except OSError as e:
        raise UserError(f"could not save the checkpoint in {out_dir}: {e.strerror or e}") from None


def _sync(folder, files=True):
    """fsync the files of a folder (first giving them the umask's mode: safetensors writes 0600),
    then the folder itself (so the renames are on disk too)."""
    for f in folder.iterdir() if files else ():
        f.chmod(0o666 & ~_umask())
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask():
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def load_train_state(out_dir):
    """The training state saved beside the weights, checked to belong to the same save."""
    out_dir = Path(out_dir)
    state = torch.load(out_dir / STATE, map_location="cpu", weights_only=False)
    saved_step = read_json(out_dir / CONFIG).get("step")
    if state.get("step") != saved_step:
        raise UserError(f"{out_dir}: the training state (step {state.get('step')}) does not match the weights "
                        f"(step {saved_step}): the last save was interrupted; start a new run with --overwrite")
    return state


def load_checkpoint(path, device="cpu", cpu_int8=False):
    """(model in eval mode, tokenizer, meta) from a checkpoint folder.

    meta: config.json's dict, plus num_params. cpu_int8: int8 linear layers, for sampling faster on
    a CPU (see llmb.quantize).
    """
    path = Path(path)
    require(path, "story", "pass the --out folder of a story training run (has it saved yet?)")
    try:
        meta = read_json(path / CONFIG)
        config = GPTConfig(**meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path / CONFIG} is not a valid story config ({e})") from None
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size != config.vocab_size:  # e.g. files of two runs mixed by hand
        raise UserError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model {config.vocab_size}; "
                        "the folder mixes files of two runs")
    model = GPT(config)
    try:
        load_model(model, str(path / WEIGHTS), device="cpu")
    except Exception as e:  # safetensors raises several kinds for a bad or mismatched file
        raise UserError(f"could not read weights {path / WEIGHTS}: {e}") from None
    meta["num_params"] = model.num_params()  # counted before int8 layers hide their weights from parameters()
    if cpu_int8:
        if device != "cpu":
            raise UserError("--cpu-int8 is for sampling on the CPU; leave it off on a GPU")
        from llmb.quantize import quantize_linears_int8

        model = quantize_linears_int8(model)
    return model.to(device).eval(), tokenizer, meta


def load_for_sampling(path, device="auto", precision="auto"):
    """(model, tokenizer, meta): the loader of every sampler (CLI, app, benchmarks); meta["precision"]
    says which weights it got, fp32 or int8.

    precision auto: int8 linear layers on a CPU, fp32 on a GPU. Generating reads every weight once
    per token, so on a CPU int8 weights (a quarter of fp32's bytes) sample 1.5-2x faster; the Oz
    model's val loss moves by 0.001 nats/char. Training and `eval` always use fp32.
    """
    from llmb.device import resolve_device
    from llmb.quantize import is_int8, wants_int8

    device = "cpu" if precision == "int8" else resolve_device(device)
    model, tokenizer, meta = load_checkpoint(path, device, cpu_int8=wants_int8(precision, device))
    meta["precision"] = "int8" if is_int8(model) else "fp32"
    model.decoder()  # compile the decoder that samples each new token (GPT.decoder) now, with the loading
    return model, tokenizer, meta
