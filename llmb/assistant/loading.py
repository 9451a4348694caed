"""Loading a base model, its tokenizer and a LoRA adapter: shared by training, chat and merging.

`--base` is a hub id (microsoft/phi-2) or a local folder; `--quant 4bit|8bit` loads the base
through bitsandbytes (NF4 with double quantization for 4-bit, as in QLoRA).
"""

import json
import logging
from contextlib import contextmanager
from pathlib import Path

from llmb.errors import UserError
from llmb.folders import ADAPTER_CONFIG, is_story_checkpoint, require
from llmb.hub import hub_offline

# bitsandbytes, imported by peft, warns on every CPU with AVX512-BF16 that an optional kernel package is
# missing ("Failed to load CPU gemm_4bit_forward ..."): nothing fails, it only reads like an error
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def compute_dtype(device):
    """bf16 on GPUs that have it, else fp32. Never fp16: Phi-2's attention overflows in fp16."""
    import torch

    if str(device).startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        print("note: this GPU has no bf16; computing in fp32 (Phi-2 overflows in fp16)")
    return torch.float32


@contextmanager
def loading(base):
    """Turn the many ways `from_pretrained` can fail into one UserError line."""
    try:
        yield
    except (OSError, ValueError) as e:
        if is_story_checkpoint(base):
            raise UserError(f"'{base}' is a story checkpoint (llmb's own character model), not an assistant base; "
                            f"sample it with: python -m llmb sample --ckpt {base}") from None
        if Path(base).exists():
            raise UserError(f"cannot load '{base}': {str(e).splitlines()[0]}") from None
        if hub_offline():
            raise UserError(
                f"cannot load '{base}': offline (HF_HUB_OFFLINE=1) and no copy in the Hugging Face cache; "
                f"pass a local folder with --base /path/to/model (config.json, tokenizer, weights), "
                f"or download it once with network: hf download {base}") from None
        raise UserError(f"cannot load '{base}' from the Hugging Face hub: {str(e).splitlines()[0]}; "
                        "check the id and your network, or pass a local folder with --base") from None


def load_tokenizer(path):
    from transformers import AutoTokenizer

    with loading(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out anyway
    return tokenizer


def load_chat_tokenizer(base, adapter=None):
    """The tokenizer a chat uses: the adapter's (its chat template is the format it was trained on)
    when it has one, else the base's; a tokenizer without a chat template gets the guanaco format."""
    from llmb.assistant.data import choose_template

    own = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter if own else base)
    tokenizer.chat_template = choose_template(tokenizer, "auto")
    return tokenizer


def quantization_config(quant, dtype):
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "none":
        return None
    raise UserError(f"unknown quantization '{quant}'; use 4bit, 8bit or none")


def load_base_model(base, quant="none", device="cpu", dtype=None):
    """The base model on `device`, quantized with bitsandbytes when quant is 4bit/8bit."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or compute_dtype(device)
    with loading(base):
        return AutoModelForCausalLM.from_pretrained(
            base, dtype=dtype, quantization_config=quantization_config(quant, dtype), device_map={"": device})


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft's save_pretrained writes
DAMAGED = "restore it, or train the adapter again"


def load_adapter(model, adapter):
    """`model` with the LoRA adapter in the folder `adapter` on top: the one loader of chat, chat-eval,
    merge, export-gguf and the app. An adapter that does not fit this base, or whose files are damaged,
    is a UserError saying so and what to do."""
    from peft import PeftModel

    adapter = require(adapter, "adapter", "pass the --out folder of llmb train-assistant")
    if not any((adapter / name).is_file() for name in ADAPTER_WEIGHTS):
        raise UserError(f"the adapter {adapter} has no {ADAPTER_WEIGHTS[0]}; {DAMAGED}")
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except Exception as e:
        why = adapter_problem(adapter, model.name_or_path, e)
        if why is None:  # out of memory, a bug: not the adapter's fault
            raise
        raise UserError(why) from None


def adapter_problem(adapter, base, e):
    """Why the adapter in the folder `adapter` does not load onto `base`, in one line with what to do: it
    was trained on another base (its weights have other shapes, or name layers this base lacks), or one of
    its files is damaged. None for any other failure."""
    from safetensors import SafetensorError

    if "size mismatch" in str(e) or "not found in the base model" in str(e):
        return (f"the adapter {adapter} was trained on another base ({trained_on(adapter)}), not on {base}: its "
                "weights do not fit this model; use it with the base it was trained on")
    if isinstance(e, SafetensorError):
        damaged = next(name for name in ADAPTER_WEIGHTS if (adapter / name).is_file())
    elif isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
        damaged = ADAPTER_CONFIG
    else:
        return None
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
    return f"the adapter {adapter} cannot be read: {damaged} is damaged ({first}); {DAMAGED}"


def trained_on(adapter):
    """The base an adapter was trained on, as its adapter_config.json names it."""
    try:
        return json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its adapter_config.json does not say which"
