import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest

from llmb.errors import UserError
from llmb.fileio import read_json
from llmb.hub import model_card, model_kind, push, staged_copy

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


OZ_STORY = Path(REPO) / "checkpoints" / "oz-story"  # the shipped story model, really trained


@pytest.fixture
def story_dir(tmp_path):
    return Path(shutil.copytree(OZ_STORY, tmp_path / "oz-story"))


def staged_files(folder, repo, tmp_path):
    staged = staged_copy(folder, repo, tmp_path / "staged")
    return {f.relative_to(staged).as_posix(): f for f in staged.rglob("*") if f.is_file()}


def assert_no_local_paths(files, *paths):
    for name, f in files.items():
        if f.suffix in (".json", ".md", ".jinja", ".jsonl", ".txt"):
            text = f.read_text(encoding="utf-8")
            assert not any(str(p) in text for p in paths), name
            assert "/tmp/" not in text and REPO not in text, name


def test_kinds(tiny_phi_adapter, tiny_phi, story_dir, tmp_path):
    assert model_kind(tiny_phi_adapter) == "adapter" and model_kind(story_dir) == "story"
    assert model_kind(tiny_phi) == "model"
    with pytest.raises(UserError, match="neither a LoRA adapter dir"):
        model_kind(tmp_path)


def test_adapter_model_card_uses_summary(tiny_phi_adapter, tiny_phi):
    summary = read_json(tiny_phi_adapter / "summary.json")
    card = model_card(tiny_phi_adapter, "someone/tiny-phi-guanaco")
    assert card.startswith("---\nlibrary_name: peft\ntags:")  # a local base: no base_model line
    assert str(tiny_phi) not in card and f"| base | {tiny_phi.name} |" in card and "| data | train.jsonl |" in card
    assert f"| steps | {summary['steps']} |" in card and "| stopped by | done |" in card
    assert f"| final train loss | {summary['final_train_loss']:.4f} |" in card
    assert f"| final val loss | {summary['final_val_loss']:.4f} |" in card
    assert f"| training time (s) | {summary['elapsed_s']:.4f} |" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("someone/tiny-phi-guanaco")' in card and "n/a" not in card


def test_story_model_card_from_the_shipped_model(story_dir):
    summary = read_json(OZ_STORY / "summary.json")
    card = model_card(story_dir, "me/oz-story")
    assert f"| steps | {summary['steps']} |" in card and f"| final val loss | {summary['final_val_loss']:.4f} |" in card
    assert f"| training time (s) | {summary['elapsed_s']:.4f} |" in card and "n/a" not in card


def test_upload_holds_no_local_paths_nor_checkpoints(tiny_phi_adapter, tiny_phi, tmp_path):
    files = staged_files(tiny_phi_adapter, "someone/x", tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "summary.json"} <= files.keys()
    assert not any(n.startswith("checkpoint-") or n == "training_args.json" for n in files)
    assert json.loads(files["adapter_config.json"].read_text())["base_model_name_or_path"] == tiny_phi.name
    assert_no_local_paths(files, tiny_phi, tiny_phi_adapter)


def test_merged_model_folder_can_be_published(tiny_phi, tiny_phi_adapter, tmp_path):
    from llmb.assistant.merge import merge

    merged = merge(str(tiny_phi), str(tiny_phi_adapter), tmp_path / "merged", dtype="float32")
    assert model_kind(merged) == "model"
    card = model_card(merged, "someone/merged")
    assert card.startswith("---\nlibrary_name: transformers\n") and f"made from `{tiny_phi.name}`" in card
    assert_no_local_paths(staged_files(merged, "someone/merged", tmp_path), tiny_phi, tiny_phi_adapter)


@pytest.mark.slow
def test_card_of_an_adapter_trained_on_the_small_assistant(small_adapter, small_assistant, tmp_path):
    adapter, _ = small_adapter
    card = model_card(adapter, "someone/smol-guanaco")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in card  # the hub id it was imported from
    assert "| data | train.jsonl |" in card and "| stopped by | done |" in card
    files = staged_files(adapter, "someone/smol-guanaco", tmp_path)
    assert "chat_template.jinja" in files
    assert_no_local_paths(files, small_assistant, adapter)


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
