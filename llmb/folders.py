"""What kind of model folder is this? The one answer for the CLIs, the trainers, the hub and the app.

    story     a story checkpoint: config.json with "llmb": "story", and model.safetensors
    adapter   a LoRA adapter: adapter_config.json (what peft's save_pretrained writes)
    model     a Hugging Face model folder: config.json and weights (a base for --base)

Reading a folder's kind imports nothing heavy, so the app can list its pickers before torch loads.
"""

import json
from pathlib import Path

from llmb.errors import UserError

STORY_CONFIG, STORY_WEIGHTS = "config.json", "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _config(path):
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_adapter(path):
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_story_checkpoint(path):
    config = _config(path)
    return isinstance(config, dict) and config.get("llmb") == "story" and (Path(path) / STORY_WEIGHTS).is_file()


def is_base_model(path):
    """A Hugging Face causal-LM folder (config.json with a model_type, and weights) usable as --base."""
    path, config = Path(path), _config(path)
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return isinstance(config, dict) and "model_type" in config and has_weights and not is_adapter(path)


def folder_kind(path):
    """'story', 'adapter' or 'model'; None for anything else."""
    if is_adapter(path):
        return "adapter"
    if is_story_checkpoint(path):
        return "story"
    if is_base_model(path):
        return "model"
    return None


def require(path, kind, hint=""):
    """`path` as a Path if it is a folder of `kind`; else a UserError saying what it is and what to do."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} does not exist or is not a folder{'; ' + hint if hint else ''}")
    found = folder_kind(path)
    if found != kind:
        what = {"story": "a story checkpoint (config.json with \"llmb\": \"story\" and model.safetensors)",
                "adapter": f"a LoRA adapter dir ({ADAPTER_CONFIG})",
                "model": "a model folder (config.json and weights)"}[kind]
        got = f"it is {'an' if found == 'adapter' else 'a'} {found} folder" if found else "it holds none of those"
        raise UserError(f"{path} is not {what}: {got}{'; ' + hint if hint else ''}")
    return path
