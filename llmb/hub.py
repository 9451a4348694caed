"""The Hugging Face hub: data sets as training data, and sharing a trained model (a LoRA adapter, a merged
model or a story checkpoint).

    load_hub_dataset("timdettmers/openassistant-guanaco")   # {split: [(row number, row), ...]}
    push("checkpoints/phi2-guanaco", "you/phi2-guanaco-qlora")

A model card (README.md: base, data, steps, final losses from summary.json) is written into
the folder first, so the hub page says what the files are. What is uploaded is a cleaned copy:
no resumable checkpoints, no training_args.json, and no local paths (a local base folder is
named by the hub id it came from, when known, else by its folder name).
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from llmb.errors import UserError
from llmb.folders import folder_kind

SOURCE_FILE = "source.json"  # written by `import-gguf`: {"base_model": hub id, "gguf": file name}
NOT_UPLOADED = ["checkpoint-*", ".tmp-*", ".old-*", "*.tmp", "training_args.json", "training_state.pt"]


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


HUB_PREFIX = "hf:"  # `hf:owner/name` always names a Hub data set, never a local path
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def hub_dataset_id(source):
    """The Hub data set that `source` names, or None for a local path.

    `hf:owner/name` always names the Hub; a plain `owner/name` does where no such file or folder exists
    and it does not end like a data file (.txt, .jsonl, ...)."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        name = text[len(HUB_PREFIX):]
        if not HUB_ID.match(name):
            raise UserError(f"{text[:80]!r} is not a Hugging Face data set name (hf:owner/name)")
        return name
    if HUB_ID.match(text) and not Path(text).exists() and not text.lower().endswith(LOCAL_SUFFIXES):
        return text
    return None


def load_hub_dataset(name):
    """A data set on the Hugging Face hub: {split: [(row number, row), ...]}; one clear line if it cannot load."""
    import datasets

    if Path(name).exists():  # load_dataset would read the local folder: `hf:` never names one
        raise UserError(f"{name} is a local path here, not a Hugging Face data set; pass it without hf:")
    if not hub_reachable():  # at once, without the library's own lines about the failed request
        raise UserError(f"{name} is not a local file or folder, and the Hugging Face hub cannot be reached to load "
                        "it as a data set (offline); check the path, or your network")
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # offline, unknown id, no network: one clear line
        raise UserError(f"{name} is not a local file or folder, and loading it as a Hugging Face data set failed "
                        f"({type(e).__name__}); check the path, or the name and your network") from None
    return {split: list(enumerate(ds[split], 1)) for split in ds}


def model_kind(path):
    """'adapter', 'model' (e.g. a merged model) or 'story': the kinds of folder that can be pushed."""
    kind = folder_kind(path)
    if kind is None:
        raise UserError(f"{path} is neither a LoRA adapter dir (adapter_config.json), a model folder (config.json "
                        "and weights) nor a story checkpoint (model.safetensors + config.json with \"llmb\": \"story\")")
    return kind


def read_summary(path):
    f = Path(path) / "summary.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def hub_name(base):
    """What a card may call a base model: a hub id as it is; a local folder by the hub id it was
    imported from (source.json), else by its folder name. Never a local path."""
    if not base:
        return None
    path = Path(base)
    if path.exists():
        source = path / SOURCE_FILE
        if source.is_file():
            return json.loads(source.read_text(encoding="utf-8")).get("base_model") or path.name
        return path.name
    return str(base) if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(base)) else Path(str(base)).name


def base_of(path, kind):
    """The base model a folder was made from, as the hub should see it."""
    summary = read_summary(path)
    if kind == "adapter":
        config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
        return hub_name(summary.get("base") or config.get("base_model_name_or_path"))
    if kind == "model":  # a merged or imported model: its source.json names where it came from
        return hub_name(summary.get("base") or (str(path) if (Path(path) / SOURCE_FILE).is_file() else None))
    return None


def card_header(kind, base, repo):
    """The YAML front matter and the first paragraph of the card."""
    meta = f"base_model: {base}\n" if base and "/" in base else ""
    if kind == "adapter":
        return (f"---\nlibrary_name: peft\n{meta}tags: [llmb, qlora, lora]\n---\n",
                f"A LoRA adapter for `{base}`, trained with QLoRA by llmb. Its prompt format is the chat template "
                "in its tokenizer files.\n\n```python\nfrom peft import AutoPeftModelForCausalLM\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo}\")\n```\n")
    if kind == "model":
        return (f"---\nlibrary_name: transformers\n{meta}tags: [llmb]\n---\n",
                f"A causal language model{f' made from `{base}`' if base else ''} (a LoRA adapter merged into its "
                "base by llmb).\n\n```python\nfrom transformers import AutoModelForCausalLM\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{repo}\")\n```\n")
    return ("---\ntags: [llmb, gpt, character-level]\n---\n",
            "A small character-level GPT trained from scratch by llmb (`python -m llmb sample`).\n")


def model_card(path, repo):
    """README.md text for the hub page, from the folder's own files (rows only for what summary.json has)."""
    path, kind = Path(path), model_kind(path)
    summary, base = read_summary(path), base_of(path, kind)
    header, what = card_header(kind, base, repo)
    data = summary.get("data")
    rows = [("base", base), ("data", ", ".join(Path(str(d)).name for d in data) if data else None),
            ("steps", summary.get("steps")), ("final train loss", summary.get("final_train_loss")),
            ("final val loss", summary.get("final_val_loss")), ("final val perplexity", summary.get("final_val_ppl")),
            ("final val bits per character", summary.get("final_val_bpc")),
            ("training time (s)", summary.get("elapsed_s")), ("stopped by", summary.get("stopped_by"))]
    shown = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {shown(v)} |\n" for k, v in rows if v is not None)
    return f"{header}\n# {repo.split('/')[-1]}\n\n{what}\n## Training\n\n{table}"


def staged_copy(path, repo, tmp):
    """The files to upload, copied into `tmp` with local paths replaced; UserError if one is left."""
    kind = model_kind(path)
    shutil.copytree(path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_UPLOADED))
    base = base_of(path, kind)
    if kind == "adapter":
        config = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    summary = read_summary(tmp)
    if summary:
        summary |= {"data": [Path(str(d)).name for d in summary.get("data", [])]} | ({"base": base} if "base" in summary else {})
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (tmp / "README.md").write_text(model_card(path, repo), encoding="utf-8")
    bases = [read_summary(path).get("base")] + ([json.loads((Path(path) / "adapter_config.json").read_text())
                                                 .get("base_model_name_or_path")] if kind == "adapter" else [])
    local = {str(Path(p).resolve()) for p in bases if p and Path(p).exists()}
    local |= {str(Path(path).resolve()), str(Path.cwd()), str(Path.home())} - {"/"}
    for f in tmp.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".txt", ".jinja", ".jsonl"):
            text = f.read_text(encoding="utf-8", errors="replace")
            if any(p in text for p in local):
                raise UserError(f"{f.relative_to(tmp)} holds a local path; remove it from {path} and push again")
    return tmp


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
    with tempfile.TemporaryDirectory(prefix="llmb-push-") as tmp:
        staged_copy(path, repo, Path(tmp))
        try:
            api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=tmp, repo_type="model", commit_message="Upload from llmb")
        except Exception as e:  # network down, bad token, no rights: one line, not a traceback
            raise UserError(f"push to {repo} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return f"https://huggingface.co/{repo}"
