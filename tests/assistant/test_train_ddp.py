"""LoRA training across processes (DDP through accelerate, gloo on the CPU): the run `accelerate launch`
or `torchrun` gives on several GPUs, checked with two CPU processes."""

import os
import subprocess
import sys

import pytest
import torch

from llmb.assistant.config import TrainConfig
from llmb.assistant.train import train
from llmb.runlog import read_metrics
from tests.conftest import REPO, tiny_phi_config

pytestmark = pytest.mark.slow  # subprocesses that import torch and transformers

# The same global batch of 4 examples per step: 1 process x 2 examples x 2 accumulated micro-batches,
# or 2 processes x 2 examples x 1. No dropout (neither LoRA's nor Phi-2's residual dropout), so both
# runs do exactly the same computation.
COMMON = dict(max_seq_len=64, batch_size=2, lr=1e-2, lora_dropout=0.0, eval_split=0.2, eval_steps=3, save_steps=3,
              log_steps=1, quant="none", device="cpu", gradient_checkpointing=False)
# Two processes add the gradients of their halves in another order than one process: float rounding only.
# Measured after 6 AdamW steps at lr 1e-2: max |difference| of the adapter weights 0 (bit-identical here).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny_phi(tmp_path_factory, repo_data):
    """conftest's tiny Phi without its residual dropout (Phi-2's 0.1): each process draws its own masks."""
    from transformers import AutoTokenizer, PhiForCausalLM

    path = tmp_path_factory.mktemp("tiny-phi-no-dropout")
    torch.manual_seed(0)
    PhiForCausalLM(tiny_phi_config(repo_data, resid_pdrop=0.0)).save_pretrained(path)
    AutoTokenizer.from_pretrained(repo_data / "phi-2-tokenizer").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, repo_data):
    rows = (repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("ddp-data") / "train.jsonl"
    path.write_text("\n".join(rows[:20]) + "\n", encoding="utf-8")  # 16 train, 4 eval
    return path


def two_processes(tiny_phi, data, out, **kw):
    args = {"base": tiny_phi, "data": data, "out": out, "grad_accum": 1} | COMMON | kw
    flags = [str(x) for key, value in args.items() for x in flag(key, value)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(REPO, "training", "train_qlora.py"), *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def flag(key, value):
    name = "--" + key.replace("_", "-")
    if value is True:
        return [name]
    if value is False:
        return ["--no-" + key.replace("_", "-")]
    return [name, value]


def adapter_weights(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def test_two_processes_end_with_the_adapter_of_one_and_resume(tiny_phi, data, tmp_path):
    one = tmp_path / "one"
    train(TrainConfig(base=str(tiny_phi), data=[str(data)], out=str(one), max_steps=6, grad_accum=2, **COMMON))
    two = tmp_path / "two"
    proc = two_processes(tiny_phi, data, two, max_steps=6)
    assert proc.stdout.count("done: 6 steps") == 1  # one summary: only the main process reports

    a, b = adapter_weights(one), adapter_weights(two)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"1 vs 2 processes: max |adapter weight difference| {diff:.2g}")
    assert diff < TOLERANCE
    assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 1e-3  # it did train

    # written once, by the main process: one metrics line per step, the newest checkpoint only
    records = read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(7))
    evaluated = [r["val_loss"] for r in records if "val_loss" in r]
    expected = [r["val_loss"] for r in read_metrics(one / "metrics.jsonl") if "val_loss" in r]
    assert evaluated == pytest.approx(expected, rel=1e-5)  # both processes' halves of the eval set count
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(("checkpoint-", ".tmp", ".old"))) == \
        ["checkpoint-6"]

    resumed = tmp_path / "resumed"
    two_processes(tiny_phi, data, resumed, max_steps=3)
    proc = two_processes(tiny_phi, data, resumed, max_steps=6, resume=True)
    assert proc.stdout.count("resuming from") == 2  # each process loads the checkpoint
    c = adapter_weights(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b)  # exactly the uninterrupted two-process run
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == list(range(7))
