"""Merging: fold a LoRA adapter into its base, so the result loads with plain `from_pretrained`."""

from pathlib import Path

from llmb.assistant.loading import load_adapter, load_base_model, load_tokenizer
from llmb.errors import UserError
from llmb.fileio import save_dir_atomically, write_json
from llmb.folders import check_out_folder, require
from llmb.hub import SOURCE_FILE, hub_name


def merge(base, adapter, out, dtype="bfloat16", overwrite=False):
    """Fold the LoRA update into the base weights (W = W0 + alpha/r * B A); `out` loads with from_pretrained.

    overwrite: `out` may hold a model folder, replaced whole once the merged one is written.
    Needs the full base in memory (Phi-2: ~5.6 GB in bf16, 11 GB in fp32). Never merged into a
    4-bit base: rounding the sum back to 4 bits would lose most of the adapter.
    """
    out = Path(out)
    check_out_folder(out, "model", overwrite)
    model = merged(base, adapter, dtype)
    tokenizer = load_tokenizer(adapter if (Path(adapter) / "tokenizer_config.json").exists() else base)
    source = {"base_model": hub_name(base), "adapter": Path(adapter).name}  # for the model card, no local paths

    save_dir_atomically(out, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp),
                                          write_json(tmp / SOURCE_FILE, source)))
    return Path(out)


def merged(base, adapter, dtype="bfloat16"):
    """The base on the CPU in `dtype` with the adapter's update folded into its weights (a plain model)."""
    import torch

    require(adapter, "adapter", "pass the --out folder of llmb train-assistant")  # before the base loads
    if dtype not in ("bfloat16", "float32"):
        raise UserError(f"merge dtype must be bfloat16 or float32 (Phi-2 overflows in float16), got {dtype}")
    model = load_base_model(base, "none", "cpu", getattr(torch, dtype))
    return load_adapter(model, adapter).merge_and_unload()
