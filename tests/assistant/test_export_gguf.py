"""export-gguf: base (+ adapter) -> one GGUF file that llama.cpp-family engines and import-gguf read back."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from llmb.assistant.data import GUANACO_TEMPLATE
from llmb.assistant.export_gguf import export_gguf
from llmb.errors import UserError
from tests.conftest import REPO


def gguf_file(path):
    """(metadata {key: value}, [(tensor name, shape in ggml order, type name)]) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = [(t.name, tuple(int(n) for n in t.shape), t.tensor_type.name) for t in reader.tensors]
    return fields, tensors


def gguf_arrays(path):
    """{tensor name: float32 array in numpy (row-major) shape}, dequantized."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
            for t in reader.tensors}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_ids(vocab, n=24, seed=0):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# A tiny random Llama with the real Phi-2 tokenizer (byte-level BPE), and a LoRA adapter on it
# with random non-zero B (a fresh adapter is a no-op: B starts at zero).

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, repo_data):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(repo_data / "phi-2-tokenizer")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama_adapter(tmp_path_factory, tiny_llama):
    from peft import LoraConfig, get_peft_model

    from llmb.assistant.loading import load_base_model, load_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama-adapter")
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(load_base_model(str(tiny_llama), "none", "cpu"), lora).save_pretrained(path)
    tokenizer = load_tokenizer(str(tiny_llama))
    tokenizer.chat_template = GUANACO_TEMPLATE  # the adapter's prompt format, as training saves it
    tokenizer.save_pretrained(path)
    return path


def adapted_model(base, adapter):
    from peft import PeftModel

    from llmb.assistant.loading import load_base_model

    return PeftModel.from_pretrained(load_base_model(str(base), "none", "cpu", torch.float32), adapter).eval()


def test_tiny_llama_with_adapter_reads_back_in_transformers_with_the_same_logits(tiny_llama, tiny_llama_adapter,
                                                                                  tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_gguf(str(tiny_llama), tmp_path / "tiny.gguf", adapter=str(tiny_llama_adapter), out_type="f32")
    fields, tensors = gguf_file(out)
    assert fields["general.architecture"] == "llama" and fields["general.name"] == tiny_llama_adapter.name
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16 and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == GUANACO_TEMPLATE  # the adapter's format, not the base's
    assert len(fields["tokenizer.ggml.tokens"]) == fields["llama.vocab_size"] == 50295
    blocks = [f"blk.{i}.{part}.weight" for i in range(2) for part in
              ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")]
    assert sorted(name for name, _, _ in tensors) == sorted(["token_embd.weight", "output_norm.weight",
                                                             "output.weight", *blocks])
    shapes = {name: shape for name, shape, _ in tensors}
    assert shapes["blk.0.attn_k.weight"] == (64, 32) and shapes["token_embd.weight"] == (64, 50295)  # ggml order

    imported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    model = adapted_model(tiny_llama, tiny_llama_adapter)
    ids = random_ids(50000)
    with model.disable_adapter():
        base = logits(model, ids)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the model ...
    # ... and the file is that model: transformers undoes the q/k row order llama.cpp needs
    assert (logits(imported, ids) - adapted).abs().max() < 1e-5


def test_tiny_llama_f16_and_q8_0_store_matrices_smaller_and_norms_in_f32(tiny_llama, tmp_path):
    for out_type, matrix_type in (("f16", "F16"), ("q8_0", "Q8_0")):
        out = export_gguf(str(tiny_llama), tmp_path / f"{out_type}.gguf", out_type=out_type)
        types = {name: kind for name, _, kind in gguf_file(out)[1]}
        assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == matrix_type
        assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"


def test_tiny_phi_with_adapter_has_phi2_names_and_the_merged_weights(tiny_phi, tiny_phi_adapter, tmp_path):
    """transformers cannot read `phi2` GGUF files back, so the weights are compared one by one."""
    import gguf

    from llmb.assistant.merge import merged

    out = export_gguf(str(tiny_phi), tmp_path / "phi.gguf", adapter=str(tiny_phi_adapter), out_type="f32")
    fields, tensors = gguf_file(out)
    assert fields["general.architecture"] == "phi2" and fields["phi2.embedding_length"] == 64
    assert fields["phi2.rope.dimension_count"] == 6  # Phi-2's partial_rotary_factor 0.4 of head size 16, rounded down
    assert fields["phi2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.chat_template"] == GUANACO_TEMPLATE
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 51200  # one per embedding row
    assert tokens[50256] == "<|endoftext|>" and types[50256] == gguf.TokenType.CONTROL
    assert tokens[51199] == "[PAD51199]" and types[51199] == gguf.TokenType.UNUSED  # embedding rows past the vocab
    assert fields["tokenizer.ggml.eos_token_id"] == 50256 and len(fields["tokenizer.ggml.merges"]) == 50000

    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI2]}
    names = {name for name, _, _ in tensors}
    assert {name.rsplit(".", 1)[0].replace("blk.1.", "blk.{bid}.").replace("blk.0.", "blk.{bid}.")
            for name in names} <= allowed
    assert {"output.weight", "output.bias", "output_norm.bias", "blk.1.attn_q.bias", "blk.1.ffn_up.bias"} <= names

    model = merged(str(tiny_phi), str(tiny_phi_adapter), "float32")
    weights = model.state_dict()
    arrays = gguf_arrays(out)
    for gguf_name, hf_name in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                               ("blk.1.ffn_down.weight", "model.layers.1.mlp.fc2.weight"),
                               ("output.bias", "lm_head.bias"), ("token_embd.weight", "model.embed_tokens.weight")):
        np.testing.assert_array_equal(arrays[gguf_name], weights[hf_name].numpy())
    assert len(arrays) == len(weights)  # every weight, none twice


def test_unsupported_architecture_is_one_error_line(tmp_path, repo_data):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50257)).save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(repo_data / "phi-2-tokenizer").save_pretrained(tmp_path / "gpt2")
    proc = subprocess.run([sys.executable, "-m", "llmb", "export-gguf", "--base", str(tmp_path / "gpt2"),
                           "--out", str(tmp_path / "x.gguf")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: export-gguf writes Llama-family and Phi-2 models, not the gpt2 architecture of this base"]
    assert not (tmp_path / "x.gguf").exists()


def test_an_existing_file_is_kept_unless_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"GGUF, an earlier export")
    with pytest.raises(UserError, match="model.gguf already exists; give another --out, or --overwrite to replace it"):
        export_gguf(str(tiny_llama), out)
    assert out.read_bytes() == b"GGUF, an earlier export"
    with pytest.raises(UserError, match="is a folder"):
        export_gguf(str(tiny_llama), tmp_path)
    export_gguf(str(tiny_llama), out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left beside it


# ---------------------------------------------------------------------------
# The real small assistant (SmolLM2-135M-Instruct) with a really trained adapter

# Metadata the shipped file has and an export legitimately lacks: llama.cpp's converter takes them from
# the hub's model card, which an imported folder does not have.
MODEL_CARD_KEYS = {"general.organization", "general.finetune", "general.basename", "general.size_label",
                   "general.license", "general.languages"}
# Keys both files have whose values legitimately differ: the name, the storage type (the shipped file
# is Q4_1), and the pre-tokenizer: import-gguf's tokenizer splits digits as GPT-2 does, so the export
# names the split the adapter was trained with ("gpt-2", not "smollm"). All other values are equal,
# the chat template too: the adapter was trained in SmolLM2's own format.
DIFFERENT_VALUES = {"general.name", "general.file_type", "tokenizer.ggml.pre"}
# Logits of the exported file read back, against base + adapter in llmb (|logit| up to ~40 here).
# Measured on the chat prompt below: f32 9.5e-5 (the fp32 merge's rounding, as `merge`), f16 0.038,
# q8_0 1.39 (a random adapter: 1.0e-4, 0.039, 1.22).
TOLERANCE = {"f32": 5e-4, "f16": 0.2, "q8_0": 3.0}


@pytest.fixture(scope="module")
def exported(small_assistant, small_adapter, tmp_path_factory):
    """{type: (file, imported folder)} for the small assistant + its trained adapter."""
    from llmb.assistant.gguf import import_gguf

    adapter, _ = small_adapter
    work = tmp_path_factory.mktemp("exported")
    files = {}
    for out_type in TOLERANCE:
        file = export_gguf(str(small_assistant), work / f"{out_type}.gguf", adapter=str(adapter), out_type=out_type)
        files[out_type] = file, import_gguf(file, work / f"imported-{out_type}")
    return files


@pytest.mark.slow
def test_exported_file_has_the_keys_and_tensors_of_the_shipped_gguf(exported):
    from llmb.assistant.gguf import small_gguf_path

    ours, our_tensors = gguf_file(exported["f16"][0])
    shipped, shipped_tensors = gguf_file(small_gguf_path(install=False))
    assert set(ours) == set(shipped) - MODEL_CARD_KEYS
    assert {key for key in ours if ours[key] != shipped[key]} == DIFFERENT_VALUES
    assert sorted((name, shape) for name, shape, _ in our_tensors) == \
        sorted((name, shape) for name, shape, _ in shipped_tensors)
    assert ours["tokenizer.ggml.pre"] == "gpt-2" and shipped["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.slow
def test_exported_and_reimported_answers_as_base_plus_adapter(small_assistant, small_adapter, exported):
    from transformers import AutoModelForCausalLM

    from llmb.assistant.engine import ChatEngine

    adapter, _ = small_adapter
    question = "What is the capital of France?"
    # fp32 on both sides: the file is what is compared, not int8 rounding (the chat's default on a CPU)
    engine = ChatEngine(str(small_assistant), adapter=str(adapter), device="cpu", precision="fp32")
    expected = engine.reply([], question, temperature=0, max_new_tokens=40)
    assert ChatEngine(str(exported["f32"][1]), device="cpu", precision="fp32").reply(
        [], question, temperature=0, max_new_tokens=40) == expected

    ids = torch.tensor([engine.prompt_ids([], question)[0]])
    adapted = logits(engine.model, ids)
    for out_type, bound in TOLERANCE.items():
        imported = AutoModelForCausalLM.from_pretrained(exported[out_type][1], dtype=torch.float32).eval()
        diff = (logits(imported, ids) - adapted).abs().max().item()
        print(f"{out_type}: max |logit difference| {diff:.3g} (bound {bound})")
        assert diff < bound, out_type


def test_a_story_checkpoint_as_base_is_named_as_such(tmp_path):
    story = REPO / "checkpoints" / "oz-story"
    with pytest.raises(UserError, match="is a story checkpoint .*not an assistant base; sample it with"):
        export_gguf(str(story), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
