"""The one story-model checkpoint format: a folder that inference reads without anything else.

    config.json         {"llmb": "story", "model": GPTConfig fields, "tokenizer": ..., "step": ...}
    model.safetensors   the weights
    char_vocab.json | tokenizer.json
    train_state.pt      optimizer/scheduler/step for --resume (training only)
    metrics.jsonl, summary.json

Every file is written atomically (temporary file + rename), so a run killed at any moment
leaves the previous checkpoint loadable.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from llmb.errors import UserError
from llmb.fileio import atomic_path, read_json, write_json
from llmb.folders import STORY_CONFIG as CONFIG
from llmb.folders import STORY_WEIGHTS as WEIGHTS
from llmb.folders import require
from llmb.story.model import GPT, GPTConfig
from llmb.story.tokenizer import load_tokenizer

STATE = "train_state.pt"


def save_checkpoint(out_dir, model, meta):
    """Write weights then config (tokenizer files are written once, at the start of training)."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_model(model, str(tmp))
    write_json(out_dir / CONFIG, {"llmb": "story", "model": model.config.to_dict(), **meta})


def save_train_state(out_dir, state):
    with atomic_path(Path(out_dir) / STATE) as tmp:
        torch.save(state, tmp)


def load_train_state(out_dir):
    return torch.load(Path(out_dir) / STATE, map_location="cpu", weights_only=False)


def load_checkpoint(path, device="cpu", cpu_int8=False):
    """(model in eval mode, tokenizer, config dict) from a checkpoint folder.

    cpu_int8: int8 linear layers, for sampling faster on a CPU (see llmb.quantize).
    """
    path = Path(path)
    require(path, "story", "pass the --out folder of a story training run (has it saved yet?)")
    try:
        meta = read_json(path / CONFIG)
        config = GPTConfig(**meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path / CONFIG} is not a valid story config ({e})") from None
    tokenizer = load_tokenizer(path)
    model = GPT(config)
    try:
        load_model(model, str(path / WEIGHTS), device="cpu")
    except Exception as e:  # safetensors raises several kinds for a bad or mismatched file
        raise UserError(f"could not read weights {path / WEIGHTS}: {e}") from None
    if cpu_int8:
        if device != "cpu":
            raise UserError("--cpu-int8 is for sampling on the CPU; leave it off on a GPU")
        from llmb.quantize import quantize_linears_int8

        model = quantize_linears_int8(model)
    return model.to(device).eval(), tokenizer, meta
