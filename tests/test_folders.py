"""One answer to "what kind of folder is this": story checkpoint, LoRA adapter or base model."""

import json

import pytest

from llmb.errors import UserError
from llmb.folders import folder_kind, require


def make(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_kinds(tmp_path):
    story = make(tmp_path / "s", {"config.json": json.dumps({"llmb": "story"}), "model.safetensors": ""})
    adapter = make(tmp_path / "a", {"adapter_config.json": "{}", "adapter_model.safetensors": ""})
    model = make(tmp_path / "m", {"config.json": json.dumps({"model_type": "llama"}), "model.safetensors": ""})
    half = make(tmp_path / "h", {"config.json": json.dumps({"llmb": "story"})})  # weights not written yet
    broken = make(tmp_path / "b", {"config.json": "{not json", "model.safetensors": ""})
    assert [folder_kind(p) for p in (story, adapter, model, half, broken)] == ["story", "adapter", "model", None, None]
    assert require(story, "story") == story


def test_require_says_what_the_folder_is(tmp_path):
    adapter = make(tmp_path / "a", {"adapter_config.json": "{}"})
    with pytest.raises(UserError, match="not a story checkpoint.*it is an adapter folder; train one first"):
        require(adapter, "story", "train one first")
    with pytest.raises(UserError, match="does not exist"):
        require(tmp_path / "missing", "adapter")
