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
from llmb.fileio import SAVE_ERRORS, read_json, save_failed, save_size, sync_folder, write_error
from llmb.folders import STORY_CONFIG as CONFIG
from llmb.folders import STORY_WEIGHTS as WEIGHTS
from llmb.folders import require
from llmb.story.model import GPT, GPTConfig
from llmb.story.tokenizer import FILES as TOKENIZER_FILES
from llmb.story.tokenizer import load_tokenizer

STATE = "train_state.pt"
STAGING = ".saving"


def save_checkpoint(out_dir, model, tokenizer, meta, state=None, replace=False):
    """Save weights, tokenizer, config (+ training state): complete in staging, then moved in.

    replace: the folder holds another run's checkpoint (--overwrite). Its config.json goes first,
    so a kill during the moves leaves no checkpoint rather than a mix of two runs' files.
    """
    out_dir = Path(out_dir)
    staging = out_dir / STAGING
    needed = save_size(model.state_dict(), state, files=[out_dir / name for name in (WEIGHTS, STATE)])
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        tokenizer.save(staging)
        save_model(model, str(staging / WEIGHTS))
        if state is not None:
            torch.save(state, staging / STATE)
        (staging / CONFIG).write_text(json.dumps({"llmb": "story", "model": model.config.to_dict(), **meta},
                                                 indent=2) + "\n", encoding="utf-8")
        sync_folder(staging)
        if replace:
            for name in (CONFIG, STATE, *TOKENIZER_FILES):
                (out_dir / name).unlink(missing_ok=True)
        for f in sorted(staging.iterdir(), key=lambda f: f.name == CONFIG):  # config.json last
            os.replace(f, out_dir / f.name)
        sync_folder(out_dir, files=False)
        staging.rmdir()
    except SAVE_ERRORS as e:
        shutil.rmtree(staging, ignore_errors=True)  # frees the space a full disk needs for summary.json
        raise save_failed("the checkpoint", out_dir, e, needed) from None


STATE_KEYS = ("step", "total_steps", "max_iters", "schedule_start", "elapsed_s", "optimizer")


def load_train_state(out_dir):
    """The training state saved beside the weights, checked to belong to the same save."""
    out_dir = Path(out_dir)
    damaged = f"; start a new run with --overwrite (the weights in {out_dir} still sample)"
    try:
        state = torch.load(out_dir / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or empty file: EOFError, RuntimeError, UnpicklingError, ...
        raise UserError(f"{out_dir / STATE} is damaged and cannot be read ({write_error(e)}){damaged}") from None
    if not isinstance(state, dict) or not all(k in state for k in STATE_KEYS):
        raise UserError(f"{out_dir / STATE} is not a training state of this trainer{damaged}")
    saved_step = read_json(out_dir / CONFIG).get("step")
    if state.get("step") != saved_step:
        raise UserError(f"{out_dir}: the training state (step {state.get('step')}) does not match the weights "
                        f"(step {saved_step}): the last save was interrupted; start a new run with --overwrite")
    return state


def read_model_config(path):
    """The GPTConfig of config.json, every number inside the range the trainer allows."""
    from llmb.settings import check_number, parse, spec_of
    from llmb.story.config import MODEL_SETTINGS, TrainConfig

    file = Path(path) / CONFIG
    try:
        meta = read_json(file)
        model = dict(meta["model"])
        GPTConfig(**model)  # unknown or missing names
        for name in MODEL_SETTINGS:
            model[name] = parse(spec_of(TrainConfig, name), model[name], label=f"model {name}")
        model["vocab_size"] = check_number("model vocab_size", model["vocab_size"], 1, 10**7, int)
        model["rope_theta"] = check_number("model rope_theta", model.get("rope_theta", 10000.0), 1.0)
        if model["n_embd"] % model["n_head"] or (model["n_embd"] // model["n_head"]) % 2:
            raise UserError(f"model n_embd {model['n_embd']} does not split into {model['n_head']} even heads")
    except (ValueError, KeyError, TypeError, UserError) as e:  # json's errors are ValueErrors
        why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        raise UserError(f"{file} is not a valid story config ({why}); restore the file or train again") from None
    return meta, GPTConfig(**model)


def load_checkpoint(path, device="cpu"):
    """(model in eval mode, tokenizer, meta) from a checkpoint folder; meta: config.json's dict, plus num_params."""
    path = Path(path)
    require(path, "story", "pass the --out folder of a story training run (has it saved yet?)")
    meta, config = read_model_config(path)
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
    return model.to(device).eval(), tokenizer, meta


def load_for_sampling(path, device="auto", precision="auto"):
    """(model, tokenizer, meta): the loader of every sampler (CLI, app, benchmarks); meta["precision"]
    says which weights it got, fp32 or int8.

    precision auto: int8 linear layers on a CPU, fp32 on a GPU (see llmb.story.fast_decode). Generating
    reads every weight once per token, so on a CPU int8 weights (a quarter of fp32's bytes) sample faster
    (docs/results.md); the Oz model's val loss moves by 0.001 nats/char. Training and `eval` use fp32.
    """
    from llmb.device import resolve_device
    from llmb.quantize import is_int8, wants_int8
    from llmb.story.fast_decode import fast_to_sample

    device = "cpu" if precision == "int8" else resolve_device(device)
    int8 = wants_int8(precision, device)
    model, tokenizer, meta = load_checkpoint(path, device)
    model = fast_to_sample(model, int8)
    meta["precision"] = "int8" if is_int8(model) else "fp32"
    return model, tokenizer, meta
