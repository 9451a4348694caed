"""Share a trained model on the Hugging Face hub: a LoRA adapter dir or a story checkpoint dir.

    push("checkpoints/phi2-guanaco", "you/phi2-guanaco-qlora")

A model card (README.md: base, data, steps, final losses from summary.json) is written into
the dir first, so the hub page says what the files are.
"""

import json
import os
from pathlib import Path

from llmb.errors import UserError
from llmb.folders import folder_kind


def hub_reachable(timeout=2.0):
    """Can the Hugging Face hub be reached? False at once when offline mode is set; else one TCP connect."""
    import socket

    if hub_offline():
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_offline():
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE set)."""
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or \
        os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "TRUE", "ON", "YES")


def model_kind(path):
    """'adapter' or 'story': the kinds of folder that can be pushed."""
    kind = folder_kind(path)
    if kind not in ("adapter", "story"):
        raise UserError(f"{path} is neither a LoRA adapter dir (adapter_config.json) nor a story checkpoint "
                        "(model.safetensors + config.json with \"llmb\": \"story\")")
    return kind


def read_summary(path):
    f = Path(path) / "summary.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def model_card(path, repo):
    """README.md text for the hub page, from the dir's own files."""
    path, kind = Path(path), model_kind(path)
    summary = read_summary(path)
    fmt = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"  # noqa: E731
    if kind == "adapter":
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        base = summary.get("base", base)
        header = f"---\nlibrary_name: peft\nbase_model: {base}\ntags: [llmb, qlora, lora]\n---\n"
        what = (f"A LoRA adapter for `{base}`, trained with QLoRA by llmb.\n\n"
                "```python\nfrom peft import AutoPeftModelForCausalLM\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo}\")\n```\n\n"
                "Prompt format: `### Human: {question}### Assistant:`\n")
    else:
        base = "llmb story model (character-level GPT, trained from scratch)"
        header = "---\ntags: [llmb, gpt, character-level]\n---\n"
        what = "A small character-level GPT trained from scratch by llmb (`python -m llmb sample`).\n"
    data = summary.get("data", "n/a")
    rows = [("base", base), ("data", ", ".join(map(str, data)) if isinstance(data, list) else data),
            ("steps", summary.get("steps", "n/a")), ("final train loss", fmt(summary.get("final_train_loss"))),
            ("final val loss", fmt(summary.get("final_val_loss"))), ("final val perplexity", fmt(summary.get("final_val_ppl"))),
            ("training time (s)", fmt(summary.get("train_time_s")))]
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    return f"{header}\n# {repo.split('/')[-1]}\n\n{what}\n## Training\n\n{table}"


def push(path, repo, token=None, private=False):
    """Upload `path` to the hub model repo `repo` (created if needed); returns the repo URL."""
    import huggingface_hub

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder")
    model_kind(path)
    token = token or huggingface_hub.get_token()
    if not token:
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    if hub_offline():
        raise UserError("cannot push while offline (HF_HUB_OFFLINE is set); unset it and check your network")
    (path / "README.md").write_text(model_card(path, repo), encoding="utf-8")
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=path, repo_type="model",
                          ignore_patterns=["checkpoint-*", ".tmp-*", ".old-*", "*.tmp"],
                          commit_message="Upload from llmb")
    except Exception as e:  # network down, bad token, no rights: one line, not a traceback
        raise UserError(f"push to {repo} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return f"https://huggingface.co/{repo}"
