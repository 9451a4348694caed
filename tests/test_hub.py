import json
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest

from llmb.errors import UserError
from llmb.fileio import read_json
from llmb.hub import model_card, model_kind, push

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to talk to the hub fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("push reached the network")
    monkeypatch.setattr(huggingface_hub, "HfApi", refuse)


@pytest.fixture
def story_dir(tmp_path):
    path = tmp_path / "story"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    (path / "config.json").write_text(json.dumps({"llmb": "story", "n_layer": 2}))
    (path / "summary.json").write_text(json.dumps({"steps": 1200, "final_train_loss": 1.234567, "final_val_loss": 1.5,
                                                   "data": ["tinyshakespeare.txt"]}))
    return path


def test_kinds(tiny_phi_adapter, story_dir, tmp_path):
    assert model_kind(tiny_phi_adapter) == "adapter" and model_kind(story_dir) == "story"
    (story_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="neither a LoRA adapter dir"):
        model_kind(story_dir)


def test_adapter_model_card_uses_summary(tiny_phi_adapter, tiny_phi):
    summary = read_json(tiny_phi_adapter / "summary.json")
    card = model_card(tiny_phi_adapter, "someone/tiny-phi-guanaco")
    assert card.startswith("---\nlibrary_name: peft\nbase_model: ")
    assert str(tiny_phi) in card and "train.jsonl" in card
    assert f"| steps | {summary['steps']} |" in card
    assert f"| final train loss | {summary['final_train_loss']:.4f} |" in card
    assert f"| final val loss | {summary['final_val_loss']:.4f} |" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("someone/tiny-phi-guanaco")' in card


def test_story_model_card(story_dir):
    card = model_card(story_dir, "me/story")
    assert "| steps | 1200 |" in card and "| final train loss | 1.2346 |" in card and "tinyshakespeare.txt" in card


def test_push_without_token_stops_before_the_network(tiny_phi_adapter, no_token, no_network):
    with pytest.raises(UserError) as e:
        push(tiny_phi_adapter, "someone/x")
    assert str(e.value) == "no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again"


def test_push_offline_with_token_stops_before_the_network(story_dir, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline"):
        push(story_dir, "someone/x", token="hf_not_a_real_token")
    assert not (story_dir / "README.md").exists()


def test_push_rejects_other_dirs(tmp_path, no_network):
    with pytest.raises(UserError, match="not a folder"):
        push(tmp_path / "missing", "someone/x", token="hf_x")
    with pytest.raises(UserError, match="neither"):
        push(tmp_path, "someone/x", token="hf_x")


def test_cli_push_without_token_one_line(tiny_phi_adapter, tmp_path):
    adapter = shutil.copytree(tiny_phi_adapter, tmp_path / "adapter")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE")}
    env |= {"HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run([sys.executable, "-m", "llmb", "push", str(adapter), "--repo", "someone/x"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again"
    assert "Traceback" not in proc.stderr
