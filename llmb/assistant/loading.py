"""Loading a base model, its tokenizer and a LoRA adapter: shared by training, chat and merging.

`--base` is a hub id (microsoft/phi-2) or a local folder; `--quant 4bit|8bit` loads the base
through bitsandbytes (NF4 with double quantization for 4-bit, as in QLoRA).
"""

from contextlib import contextmanager
from pathlib import Path

from llmb.errors import UserError
from llmb.folders import is_story_checkpoint, require
from llmb.hub import hub_offline


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


def load_adapter(model, adapter):
    from peft import PeftModel

    require(adapter, "adapter", "pass the --out folder of llmb train-assistant")
    return PeftModel.from_pretrained(model, adapter)
