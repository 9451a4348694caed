"""Export to GGUF: a base model (+ a LoRA adapter, merged in) as one file for llama.cpp, Ollama, LM Studio.

    python -m llmb export-gguf --base checkpoints/smollm2-135m-instruct --adapter checkpoints/my-run \\
        --out my-run.gguf --type q8_0

The way back from `import-gguf`. A GGUF file holds all an engine of the llama.cpp family needs:

    metadata  the architecture and its hyper-parameters under llama.cpp's names (llama.block_count, ...),
              the tokenizer (vocabulary, token types, merges, special token ids) and the chat template
    tensors   every weight under llama.cpp's name (blk.0.attn_q.weight, ...) in f32, f16 or q8_0

The chat template is the adapter's prompt format, the one it was trained with, so the engine
writes a conversation exactly as training did. Two architectures: the Llama family (SmolLM2,
Llama 3 and others with a byte-level BPE tokenizer) and Phi-2 (llama.cpp's `phi2`).
"""

import json
import tempfile
from pathlib import Path

from llmb.errors import UserError
from llmb.fileio import atomic_path
from llmb.folders import check_out_file

# transformers' model_type -> llama.cpp's architecture
ARCHITECTURES = {"llama": "llama", "phi": "phi2"}
TYPES = ("f32", "f16", "q8_0")

# How text is split into words before BPE (tokenizers' pre_tokenizer) -> llama.cpp's name for it
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def export_gguf(base, out, adapter=None, out_type="f16", overwrite=False):
    """Write base (+ adapter, merged in fp32) to the GGUF file `out`; returns `out`."""
    from llmb.assistant.loading import load_chat_tokenizer, loading

    if out_type not in TYPES:
        raise UserError(f"unknown GGUF type {out_type!r}; use one of {', '.join(TYPES)}")
    check_out_file(out, "gguf", overwrite)
    from transformers import AutoConfig

    with loading(base):
        arch = architecture(AutoConfig.from_pretrained(base))
    tokenizer = load_chat_tokenizer(base, adapter)  # the adapter's prompt format as chat template
    model = merged_model(base, adapter)
    with atomic_path(out) as tmp:
        write_gguf(tmp, model, tokenizer, arch, out_type, name=model_name(base, adapter))
    return Path(out)


def architecture(config):
    """llama.cpp's name for the model's architecture; other architectures are refused."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"export-gguf writes Llama-family and Phi-2 models, not the {config.model_type} "
                        "architecture of this base")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"export-gguf cannot write the {rope['rope_type']} rope scaling of this base yet")
    return arch


def merged_model(base, adapter):
    """The model to write, in fp32 on the CPU: the base, with the adapter folded in when there is one."""
    import torch

    from llmb.assistant.loading import load_base_model
    from llmb.assistant.merge import merged

    if adapter:
        return merged(base, adapter, "float32")
    return load_base_model(base, "none", "cpu", torch.float32)


def model_name(base, adapter):
    from llmb.hub import hub_name

    return Path(adapter).name if adapter else hub_name(base).split("/")[-1]


# ---------------------------------------------------------------------------
# Writing the file


def write_gguf(path, model, tokenizer, arch, out_type, name):
    """The GGUF file: header, metadata, tensor table, then the tensors one by one (little memory)."""
    import gguf
    from tqdm import tqdm

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    hyperparameters(writer, model.config, arch)
    writer.add_file_type(file_type(out_type))
    tokenizer_metadata(writer, tokenizer, model.config.vocab_size, arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tensors = list(gguf_tensors(model, arch))
    for tensor_name, array in tensors:
        qtype = tensor_type(array, out_type)
        writer.add_tensor_info(tensor_name, array.shape, array.dtype, stored_nbytes(array.shape, qtype), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor_name, array in tqdm(tensors, desc="write GGUF", unit="tensor"):
        writer.write_tensor_data(convert(array, tensor_type(array, out_type)))
    writer.close()


def file_type(out_type):
    """general.file_type: how most of the weights are stored."""
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[out_type]


def hyperparameters(writer, config, arch):
    """The architecture's hyper-parameters under llama.cpp's keys (as its convert_hf_to_gguf.py writes them)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = config.rope_parameters or {}
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if arch == "llama":
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    else:  # phi2: LayerNorm, and the rotary embedding turns only part of each head
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))


def gguf_tensors(model, arch):
    """(llama.cpp name, fp32 numpy array) for every weight of `model`, in llama.cpp's layout."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the engine reuses token_embd, as transformers does
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"export-gguf has no llama.cpp name for the weight {hf_name} of this {arch} model")
        array = tensor.detach().float().numpy()
        if arch == "llama" and ".attn_q." in name:
            array = interleave_rope_rows(array, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            array = interleave_rope_rows(array, config.num_key_value_heads)
        yield name, array


def interleave_rope_rows(w, n_heads):
    """Reorder each head's query/key rows for llama.cpp's rotary embedding.

    transformers' Llama rotates the first half of a head's dimensions against the second half
    (rotate_half); llama.cpp's `llama` rotates neighbouring pairs. The same rotation on rows
    [x0 .. x(d/2-1), y0 .. y(d/2-1)] is then on [x0, y0, x1, y1, ...]: interleave the halves.
    (transformers' GGUF loader undoes exactly this.)
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(array, out_type):
    """How a tensor is stored: norms and biases (1-D) always in f32, as llama.cpp does; q8_0 needs rows
    made of whole blocks of 32, else f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    if out_type == "f32" or array.ndim == 1:
        return T.F32
    if out_type == "q8_0" and array.shape[-1] % GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.F16


def stored_nbytes(shape, qtype):
    import numpy as np
    from gguf import GGML_QUANT_SIZES

    block, block_bytes = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * block_bytes


def convert(array, qtype):
    import numpy as np
    from gguf import GGMLQuantizationType as T, quants

    if qtype == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return quants.quantize(array, qtype)


# ---------------------------------------------------------------------------
# The tokenizer as metadata


def tokenizer_metadata(writer, tokenizer, vocab_size, arch):
    """Vocabulary, token types, merges, special token ids and chat template (byte-level BPE tokenizers)."""
    import gguf

    saved = json.loads(tokenizer.backend_tokenizer.to_str())  # its tokenizer.json
    kind = saved["model"]["type"] + (" with byte fallback" if saved["model"].get("byte_fallback") else "")
    if kind != "BPE":
        raise UserError(f"export-gguf writes byte-level BPE tokenizers (SmolLM2, Llama 3, Phi-2), not this base's "
                        f"{kind} tokenizer")
    tokens, types = vocabulary(tokenizer, vocab_size)
    pre_name, prefix_space = pre_tokenizer(saved["pre_tokenizer"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_add_space_prefix(prefix_space)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # gguf reads merges and special tokens from the saved files
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    ids = tokenizer("a")["input_ids"]  # does the tokenizer put BOS (and EOS) around a text by itself?
    special.add_special_token = {"bos": ids[0] == tokenizer.bos_token_id}
    if ids[-1] == tokenizer.eos_token_id:  # rare; llama.cpp's default is no EOS
        special.add_special_token["eos"] = True
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def vocabulary(tokenizer, vocab_size):
    """(tokens, token types) for ids 0..vocab_size-1: the model's embedding may have more rows than the
    tokenizer has tokens (Phi-2: 51200 rows, 50295 tokens); those ids get unused placeholders."""
    from gguf import TokenType

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def pre_tokenizer(saved):
    """(llama.cpp's name for the way this tokenizer splits text before BPE, whether it adds a space in front);
    `saved`: the pre_tokenizer of its tokenizer.json."""
    steps = (saved or {}).get("pretokenizers") or [saved or {}]
    kinds = [step.get("type") for step in steps]
    prefix_space = bool(steps[-1].get("add_prefix_space"))
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", prefix_space
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm", prefix_space
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe", prefix_space
    raise UserError(f"export-gguf does not know llama.cpp's name for this tokenizer's pre-tokenizer ({kinds}); "
                    "it knows those of GPT-2/Phi-2, SmolLM2 and Llama 3")
