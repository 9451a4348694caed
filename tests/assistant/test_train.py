import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from llmb.assistant.config import TrainConfig
from llmb.assistant.loading import load_base_model
from llmb.assistant.train import add_lora, save_adapter, train
from llmb.errors import UserError
from llmb.fileio import read_json
from llmb.runlog import read_metrics
from tests import slow_steps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, repo_data):
    rows = (repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("\n".join(rows[:8]) + "\n", encoding="utf-8")
    return path


def tokens(n=24, seed=0):
    return torch.randint(0, 50000, (2, n), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_run(out, steps):
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0] + list(range(5, steps + 1, 5))  # step 0: the base model's loss
    assert all({"step", "train_loss", "lr", "tokens_per_sec", "elapsed_s", "total_steps"} <= r.keys() for r in records)
    evaluated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [0] + list(range(10, steps + 1, 10))
    assert evaluated[-1]["val_loss"] < evaluated[0]["val_loss"]
    records = records[1:]
    assert all(abs(r["val_ppl"] - torch.tensor(r["val_loss"]).exp().item()) < 1e-3 * r["val_ppl"] for r in evaluated)
    first, last = records[0]["train_loss"], records[-1]["train_loss"]
    assert last < first - 0.2, f"train loss did not fall: {first:.3f} -> {last:.3f}"
    summary = read_json(out / "summary.json")
    assert summary["steps"] == steps and summary["total_steps"] == steps and summary["final_train_loss"] == last
    assert summary["final_val_loss"] == evaluated[-1]["val_loss"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_args.json"):
        assert (out / name).is_file(), name
    assert (out / f"checkpoint-{steps}" / "training_state.pt").is_file()
    assert not list(out.glob(".tmp-*"))
    now = read_json(out / "progress.json")  # the app's status line: the last step's own figures
    assert now["step"] == steps and now["total"] == steps and now["phase"] is None
    assert math.isfinite(now["loss"]) and now["tokens_per_sec"] > 0 and now["eta_s"] == 0
    return summary


def test_progress_names_each_phase_then_every_step(tiny_phi, small_data, tmp_path, monkeypatch):
    """Before its first step a run on a CPU can take minutes: progress.json says which phase it is in, and
    what the run will cost (from the step-0 evaluation's speed), then carries step i/N, the step's loss, tokens/s
    and the ETA from the first step on (not every log_steps)."""
    import llmb.assistant.train as trainer

    seen = []
    real = trainer.write_progress
    monkeypatch.setattr(trainer, "write_progress", lambda out, phase=None, **f: (seen.append((phase, f)),
                                                                                 real(out, phase, **f)))
    train(TrainConfig(base=str(tiny_phi), data=[str(small_data)], out=str(tmp_path / "run"), quant="none",
                      max_steps=4, max_seq_len=64, batch_size=2, grad_accum=1, lr=1e-2, eval_steps=10,
                      save_steps=10, log_steps=10, eval_split=0.25, device="cpu"))
    phases = [phase for phase, _ in seen if phase]
    assert [p.split()[0] for p in phases] == ["loading", "reading", "loading", "evaluating", "step"], phases
    assert "base model" in phases[2] and "(step 0)" in phases[3]
    estimate = [f for phase, f in seen if phase == phases[4]][0]
    assert phases[4].startswith("step 1 of 4: about ") and " min to go (estimated from the step-0 evaluation" in phases[4]
    assert estimate["total"] == 4 and estimate["eta_s"] > 0
    steps = [f for phase, f in seen if not phase]
    assert [f["step"] for f in steps] == [1, 2, 3, 4] and all(f["total"] == 4 for f in steps)
    assert all(math.isfinite(f["loss"]) and f["tokens_per_sec"] > 0 for f in steps)
    assert steps[0]["eta_s"] > 0 and steps[-1]["eta_s"] == 0


def test_lora_fp32_loss_falls(tiny_phi_adapter):
    summary = check_run(tiny_phi_adapter, 30)
    assert summary["quant"] == "none" and summary["stopped_by"] == "done" and summary["format"] == "guanaco"
    assert json.loads((tiny_phi_adapter / "training_args.json").read_text())["lr"] == 1e-2


def test_nf4_loss_falls(tiny_phi, small_data, tmp_path):
    import bitsandbytes as bnb

    model = load_base_model(str(tiny_phi), "4bit", "cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantization
    out = tmp_path / "nf4"
    train(TrainConfig(base=str(tiny_phi), data=[str(small_data)], out=str(out), quant="4bit", max_steps=30,
                      max_seq_len=64, batch_size=2, grad_accum=1, lr=1e-2, eval_steps=10, save_steps=10,
                      log_steps=5, eval_split=0.25, device="cpu"))
    assert check_run(out, 30)["quant"] == "4bit"


def test_adapter_save_reload_gives_identical_logits(tiny_phi, tmp_path):
    from peft import PeftModel

    from llmb.assistant.loading import load_tokenizer

    model = add_lora(load_base_model(str(tiny_phi), "none", "cpu"), TrainConfig(gradient_checkpointing=False))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # B starts at zero; make the adapter do something
    model.eval()
    save_adapter(tmp_path, model, load_tokenizer(str(tiny_phi)))
    reloaded = PeftModel.from_pretrained(load_base_model(str(tiny_phi), "none", "cpu"), tmp_path).eval()
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    with reloaded.disable_adapter():
        assert not torch.allclose(logits(reloaded, ids), logits(model, ids), atol=1e-3)


def run_train(args, env=None, **kw):
    cmd = [sys.executable, os.path.join(REPO, "training", "train_qlora.py")] + [str(a) for a in args]
    return subprocess.Popen(cmd, cwd=REPO, env=env or os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow  # a subprocess that imports torch and transformers
def test_cli_sigint_saves_adapter_then_resume_continues(tiny_phi, small_data, tmp_path):
    out = tmp_path / "run"
    args = ["--base", tiny_phi, "--data", small_data, "--out", out, "--quant", "none", "--max-seq-len", 64,
            "--batch-size", 2, "--grad-accum", 1, "--log-steps", 1, "--eval-steps", 1000, "--save-steps", 1000,
            "--eval-split", 0.25, "--device", "cpu", "--lr", 1e-2]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = run_train(args + ["--max-steps", 100_000], env)
    deadline = time.time() + 120  # stop after a real step (the step-0 record comes before any training)
    while not any(r["step"] >= 1 for r in read_metrics(out / "metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    summary = read_json(out / "summary.json")
    stopped_at = summary["steps"]
    assert summary["stopped_by"] == "signal" and 1 <= stopped_at < 100_000
    assert "stopped by signal" in stdout and "--resume" in stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / f"checkpoint-{stopped_at}").is_dir()
    assert "Traceback" not in stderr

    proc = run_train(args + ["--max-steps", stopped_at + 3, "--resume"], env)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"resuming from {out / f'checkpoint-{stopped_at}'} (step {stopped_at})" in stdout
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(0, stopped_at + 4))  # no step repeated, none missing
    assert read_json(out / "summary.json")["steps"] == stopped_at + 3


@pytest.mark.slow  # a subprocess that imports torch and transformers
def test_a_stop_in_a_long_step_saves_the_last_step_within_seconds_and_resumes_exactly(tiny_phi, small_data, tmp_path):
    """A LoRA step on a CPU can take minutes: the stop used to wait for it (the app killed the run after 60 s,
    unsaved). Now the step is dropped half-way through its accumulation, the last completed step saved at once, and
    --resume repeats the dropped step as it would have run (the dropout it drew is put back)."""
    from safetensors.torch import load_file

    settings = dict(max_seq_len=64, batch_size=2, grad_accum=2, lora_dropout=0.5, save_steps=1000, max_steps=6)
    tiny_run(tiny_phi, small_data, tmp_path / "straight", **settings)
    out = tmp_path / "stopped"
    flags = [f for k, v in settings.items() for f in (f"--{k.replace('_', '-')}", v)]
    trainer = slow_steps.start(7, 600, "train-assistant", "--base", tiny_phi, "--data", small_data, "--out", out,
                               "--quant", "none", "--lr", 1e-2, "--eval-steps", 1000, "--log-steps", 1,
                               "--eval-split", 0.25, "--device", "cpu", "--no-gradient-checkpointing", *flags)
    # micro-batch 7 is the first of step 4: the stop comes in micro-batch 8, with half the step's gradients summed
    took, stdout, stderr = slow_steps.stop_mid_step(trainer, out / "metrics.jsonl", 3)
    assert trainer.returncode == 0 and took < 10, (took, stderr[-2000:])
    summary = read_json(out / "summary.json")
    assert summary["stopped_by"] == "signal" and summary["steps"] == summary["saved_step"] == 3
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert (out / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2, 3]
    assert read_json(out / "progress.json")["phase"] == "stop requested: saving step 3"
    summary = tiny_run(tiny_phi, small_data, out, resume=True, **settings)
    assert summary["steps"] == 6 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(7))
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a subprocess that imports torch and transformers
def test_cli_offline_hub_id_gives_one_clear_line(tmp_path, repo_data):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache
    data = repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl"
    proc = run_train(["--base", "microsoft/phi-2", "--data", data, "--out", tmp_path / "o", "--max-steps", 1], env)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, stderr
    assert "cannot load 'microsoft/phi-2': offline" in lines[0] and "--base /path/to" in lines[0]
    assert "Traceback" not in stderr

    chat = subprocess.run([sys.executable, "-m", "llmb", "chat", "--base", "microsoft/phi-2", "--prompt", "hi"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 2 and "cannot load 'microsoft/phi-2': offline" in chat.stderr
    assert "Traceback" not in chat.stderr


@pytest.mark.slow  # a subprocess that imports torch and transformers
def test_cli_bad_rows_exit_2(tiny_phi, repo_data, tmp_path):
    data = repo_data / "guanaco" / "guanaco-llama2-1k_train.jsonl"
    proc = run_train(["--base", tiny_phi, "--data", data, "--out", tmp_path / "o", "--max-steps", 1])
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: 1 bad row: {data}:900: empty assistant turn"), stderr
    assert "Traceback" not in stderr


def test_lora_on_every_linear_layer_saved_in_adapter_config(tiny_phi_adapter):
    config = json.loads((tiny_phi_adapter / "adapter_config.json").read_text())
    names = set(config["target_modules"])  # every linear layer of both blocks, by full name
    assert len(names) == 12 and {n.split(".")[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}


AUTO = ("max_steps", "max_seq_len", "batch_size", "grad_accum", "max_eval_examples", "gradient_checkpointing")


def test_settings_left_to_auto_are_sized_for_a_cpu_and_a_resume_keeps_the_runs_own(tiny_phi, small_data, tmp_path,
                                                                                   capsys):
    """On a CPU the defaults were Phi-2's GPU recipe (500 steps of 4 x 4 x 512 tokens: 2 minutes a step)."""
    run = dict(base=str(tiny_phi), data=[str(small_data)], out=str(tmp_path / "run"), quant="none", device="cpu",
               lr=1e-2, eval_split=0.25, log_steps=1)
    train(TrainConfig(**run, max_steps=2, grad_accum=2))  # explicit values win
    assert "auto settings (sized for a CPU): --max-seq-len 256 --batch-size 4 --max-eval-examples 16 " \
           "--no-gradient-checkpointing" in capsys.readouterr().out
    args = read_json(tmp_path / "run" / "training_args.json")
    assert [args[name] for name in AUTO] == [2, 256, 4, 2, 16, False]
    train(TrainConfig(**run, max_steps=3, resume=True))  # grad_accum auto: the run's 2, not a CPU's 1
    assert "auto settings (as the run being resumed had them): --max-seq-len 256 --batch-size 4 --grad-accum 2 " \
           "--max-eval-examples 16 --no-gradient-checkpointing" in capsys.readouterr().out
    assert read_json(tmp_path / "run" / "summary.json")["steps"] == 3


@pytest.mark.slow  # the real small assistant, about 5 minutes on a quiet 2-core CPU
def test_the_cpu_defaults_train_the_small_assistant_in_minutes_and_lower_its_held_out_loss(small_assistant,
                                                                                           repo_data, tmp_path,
                                                                                           monkeypatch):
    """The app's first LoRA run, as a newcomer starts it: the small assistant, the shipped chats, every setting left
    to its default. It took 10 minutes for 4 of 500 steps; now it ends, step-0 evaluation included, in minutes,
    and says after its step-0 evaluation about how long it will take."""
    import llmb.assistant.train as trainer

    estimates = []  # (when, the estimated seconds to go)
    real = trainer.write_progress
    monkeypatch.setattr(trainer, "write_progress", lambda out, phase=None, **f: (
        estimates.append((time.time(), f["eta_s"])) if phase and "to go" in phase else None, real(out, phase, **f)))
    out = tmp_path / "run"
    began = time.time()
    summary = train(TrainConfig(base=str(small_assistant), data=[str(repo_data / "guanaco" /
                                                                     "guanaco-llama2-1k_train.jsonl")],
                                out=str(out), quant="none", device="cpu", skip_bad_rows=True))
    took = time.time() - began
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    (when, eta), = estimates
    print(f"CPU defaults on the small assistant: {took:.0f} s, held-out loss {evals[0]['val_loss']:.3f} -> "
          f"{evals[-1]['val_loss']:.3f}; estimated after step 0: {eta:.0f} s to go, took {began + took - when:.0f} s")
    assert summary["stopped_by"] == "done" and summary["steps"] == 30 and [r["step"] for r in evals] == [0, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.05
    assert took < 8 * 60 and 0.4 < eta / (began + took - when) < 2.5


def test_resume_without_checkpoint_is_a_user_error(tiny_phi, small_data, tmp_path):
    with pytest.raises(UserError, match="no checkpoint in .* to resume from"):
        train(TrainConfig(base=str(tiny_phi), data=[str(small_data)], out=str(tmp_path / "new"), quant="none",
                          max_steps=2, device="cpu", resume=True))


def tiny_run(tiny_phi, data, out, **kw):
    cfg = dict(base=str(tiny_phi), data=[str(data)], out=str(out), quant="none", max_seq_len=64, batch_size=2,
               grad_accum=1, lr=1e-2, eval_steps=1000, save_steps=3, log_steps=1, eval_split=0.25, device="cpu",
               gradient_checkpointing=False)
    return train(TrainConfig(**(cfg | kw)))


def test_resume_with_dropout_matches_an_uninterrupted_run(tiny_phi, small_data, tmp_path):
    from safetensors.torch import load_file

    tiny_run(tiny_phi, small_data, tmp_path / "straight", max_steps=6, lora_dropout=0.5)
    tiny_run(tiny_phi, small_data, tmp_path / "resumed", max_steps=3, lora_dropout=0.5)
    summary = tiny_run(tiny_phi, small_data, tmp_path / "resumed", max_steps=6, lora_dropout=0.5, resume=True)
    assert summary["steps"] == 6 and summary["stopped_by"] == "done"
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_length_grouped_batches_cut_padding(repo_data):
    from llmb.assistant.data import encode_dataset, load_chat_data
    from llmb.assistant.loading import load_tokenizer
    from llmb.assistant.train import length_grouped_batches

    convs, _ = load_chat_data(repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl", eval_split=0)
    lengths = [len(ex["input_ids"]) for ex in encode_dataset(load_tokenizer(str(repo_data / "phi-2-tokenizer")),
                                                              convs, 512)]

    def padding(grouped):
        batches = length_grouped_batches(lengths, 4, seed=0, group_by_length=grouped)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every example once
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths) / padded

    print(f"padding at batch 4: random {padding(False):.1%}, grouped by length {padding(True):.1%}")
    assert padding(False) > 0.2 and padding(True) < 0.05


def test_loss_is_averaged_per_token_over_the_accumulated_step(tiny_phi, repo_data):
    """One step of 2 micro-batches of 1 gives the same gradient as one batch of 2 (different lengths)."""
    from accelerate import Accelerator

    from llmb.assistant.data import collate, encode_dataset, load_chat_data
    from llmb.assistant.loading import load_tokenizer
    from llmb.assistant.train import Run, optimizer_step

    tokenizer = load_tokenizer(str(tiny_phi))
    convs, _ = load_chat_data(repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl", eval_split=0)
    examples = encode_dataset(tokenizer, convs[:2], 48)
    assert len(examples[0]["input_ids"]) != len(examples[1]["input_ids"]) or examples[0] != examples[1]

    def grads(batches, grad_accum):
        torch.manual_seed(0)
        cfg = TrainConfig(lora_dropout=0.0, gradient_checkpointing=False, grad_accum=grad_accum, max_grad_norm=1e9)
        model = add_lora(load_base_model(str(tiny_phi), "none", "cpu"), cfg)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        seen = {}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        opt.register_step_pre_hook(lambda o, *a: seen.update({i: p.grad.clone() for i, p in
                                                              enumerate(o.param_groups[0]["params"])}))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        optimizer_step(Run(cfg, Accelerator(cpu=True), model, opt, sched, tokenizer, 0, [], []), iter(batches))
        return seen

    pad = tokenizer.pad_token_id
    one = grads([collate(examples, pad)], 1)
    two = grads([collate(examples[:1], pad), collate(examples[1:], pad)], 2)
    assert all(torch.allclose(one[i], two[i], atol=1e-6, rtol=1e-4) for i in one)


def test_qlora_casts_embeddings_and_head_to_bf16_keeps_norms_fp32(tiny_phi):
    from llmb.assistant.train import cast_like_qlora

    model = add_lora(load_base_model(str(tiny_phi), "4bit", "cpu"), TrainConfig(gradient_checkpointing=False))
    assert model.base_model.model.lm_head.weight.dtype == torch.float32  # what prepare_model_for_kbit_training leaves
    cast_like_qlora(model, torch.bfloat16)
    inner = model.base_model.model
    assert inner.lm_head.weight.dtype == torch.bfloat16 and inner.model.embed_tokens.weight.dtype == torch.bfloat16
    assert inner.model.final_layernorm.weight.dtype == torch.float32
    assert inner.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.bfloat16


@pytest.mark.slow  # a subprocess that imports torch and transformers
def test_cli_chat_eval_one_json_line(tiny_phi, tiny_phi_adapter, small_data):
    from llmb.assistant.data import encode_dataset, load_chat_data
    from llmb.assistant.loading import load_chat_tokenizer

    def chat_eval(*extra):
        proc = subprocess.run([sys.executable, "-m", "llmb", "chat-eval", "--base", str(tiny_phi), "--data",
                               str(small_data), "--max-seq-len", "64", "--device", "cpu", *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip())

    base, tuned = chat_eval(), chat_eval("--adapter", str(tiny_phi_adapter))
    convs, _ = load_chat_data(small_data, eval_split=0)
    examples = encode_dataset(load_chat_tokenizer(str(tiny_phi)), convs, 64)
    answer_tokens = sum(sum(label != -100 for label in ex["labels"][1:]) for ex in examples)
    assert base.keys() == {"loss", "ppl", "tokens", "rows"} and base["rows"] == 8 == tuned["rows"]
    assert base["tokens"] == tuned["tokens"] == answer_tokens  # the training mask: answer tokens only
    assert tuned["loss"] < base["loss"] - 0.5  # the adapter was trained on these rows
    assert abs(base["ppl"] - math.exp(base["loss"])) < 1e-3 * base["ppl"]
