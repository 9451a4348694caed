"""The story CLI and trainer probed as a hostile or unlucky user would.

BAD_INPUTS: command lines that must end in one `error:` line, exit code 2, no traceback, and
leave any checkpoint they point at byte for byte as it was. FAULTS: real failures during a run
(an exception, a full disk, a read-only file system, kill -9, SIGTERM/SIGINT) after which the
last good checkpoint still loads. test_counts prints how many of each the module tries.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from llmb.errors import UserError
from llmb.fileio import megabytes
from llmb.folders import STORY_CONFIG as CONFIG
from llmb.folders import STORY_WEIGHTS as WEIGHTS
from llmb.runlog import read_metrics
from llmb.story.checkpoint import STATE, load_checkpoint
from llmb.story.config import TrainConfig
from llmb.story.train import train
from tests.conftest import REPO
from tests.story.conftest import TINY, TINY_FLAGS, cli, run_cli, tmpfs

# The flags of the `trained` fixture's run: what a --resume must repeat.
RESUME = ["--resume", *TINY_FLAGS]
BIG = ["--n-layer", "64", "--n-embd", "4096", "--n-head", "64", "--batch-size", "4096", "--max-iters", "1"]

BAD_INPUTS = [  # (what, command line from the probe's paths, what the error line says)
    ("--out is a file", lambda d: ["train", "--data", d.corpus, "--out", d.corpus, "--max-iters", "5"], "is a file"),
    ("new run over a checkpoint", lambda d: ["train", "--data", d.corpus, "--out", d.run, "--max-iters", "5",
                                             *TINY_FLAGS], "already holds a story checkpoint"),
    ("--resume and --overwrite", lambda d: ["train", "--data", d.corpus, "--out", d.run, "--max-iters", "30",
                                            *RESUME, "--overwrite"], "give one of them"),
    ("--resume with nothing saved", lambda d: ["train", "--data", d.corpus, "--out", d.tmp / "none",
                                               "--max-iters", "5", *RESUME], "no checkpoint"),
    ("--resume a finished run", lambda d: ["train", "--data", d.corpus, "--out", d.run, "--max-iters", "20",
                                           *RESUME], "already finished"),
    ("--resume with fewer steps", lambda d: ["train", "--data", d.corpus, "--out", d.run, "--max-iters", "5",
                                             *RESUME], "--max-iters above"),
    ("--resume --schedule cosine", lambda d: ["train", "--data", d.corpus, "--out", d.run, "--max-iters", "30",
                                              *RESUME, "--schedule", "cosine"], "cannot change --schedule"),
    ("--resume with another block size", lambda d: ["train", "--data", d.corpus, "--out", d.run, "--max-iters", "30",
                                                    *RESUME, "--block-size", "16"], "cannot change --block-size"),
    ("--resume on other data", lambda d: ["train", "--data", d.other, "--out", d.run, "--max-iters", "30", *RESUME],
     "cannot change --data"),
    ("--resume with dropout", lambda d: ["train", "--data", d.corpus, "--out", d.run, "--max-iters", "30", *RESUME,
                                         "--dropout", "0.1"], "cannot change --dropout"),
    ("--out holds another model", lambda d: ["train", "--data", d.corpus, "--out", d.adapter, "--max-iters", "5"],
     "already holds a LoRA adapter run"),
    ("--log-interval 0", lambda d: ["train", "--data", d.corpus, "--out", d.tmp / "o", "--max-iters", "5",
                                    "--log-interval", "0"], "--log-interval"),
    ("--vocab-size 0", lambda d: ["train", "--data", d.corpus, "--out", d.tmp / "o", "--max-iters", "5",
                                  "--tokenizer", "bpe", "--vocab-size", "0"], "--vocab-size"),
    ("--max-iters 0", lambda d: ["train", "--data", d.corpus, "--out", d.tmp / "o", "--max-iters", "0"],
     "--max-iters"),
    ("--max-time nan", lambda d: ["train", "--data", d.corpus, "--out", d.tmp / "o", "--max-time", "nan"],
     "--max-time"),
    ("heads do not split the width", lambda d: ["train", "--data", d.corpus, "--out", d.tmp / "o", "--max-iters",
                                                "5", "--n-embd", "30", "--n-head", "4"], "heads of even width"),
    ("a 12.9B-parameter model", lambda d: ["train", "--data", d.corpus, "--out", d.tmp / "o", *BIG], "GB to train"),
    ("no length", lambda d: ["train", "--data", d.corpus, "--out", d.tmp / "o"], "--max-iters N) or max time"),
    ("lr-find --num-iters 5", lambda d: ["lr-find", "--data", d.corpus, "--out", d.tmp / "lr", "--num-iters", "5"],
     "--num-iters"),
    ("lr-find --end-lr below --start-lr", lambda d: ["lr-find", "--data", d.corpus, "--out", d.tmp / "lr",
                                                     "--start-lr", "0.1", "--end-lr", "0.01"], "--end-lr"),
    ("lr-find --out is a file", lambda d: ["lr-find", "--data", d.corpus, "--out", d.corpus], "is a file"),
    ("lr-find of a 12.9B model", lambda d: ["lr-find", "--data", d.corpus, "--out", d.tmp / "lr", *BIG[:-2]],
     "GB to train"),
    ("eval --val-fraction 0.9", lambda d: ["eval", "--ckpt", d.run, "--data", d.corpus, "--val-fraction", "0.9"],
     "--val-fraction"),
    ("eval of a folder that is no checkpoint", lambda d: ["eval", "--ckpt", d.tmp, "--data", d.corpus],
     "not a story checkpoint"),
    ("sample of a missing checkpoint", lambda d: ["sample", "--ckpt", d.tmp / "none"], "does not exist"),
    # a user's own files are never written over, --overwrite or not
    ("train --out a folder of the user's files", lambda d: ["train", "--data", d.corpus, "--out", d.mine,
                                                            "--max-iters", "5"], "holds files that are not a model"),
    ("train --overwrite a folder of the user's files", lambda d: ["train", "--data", d.corpus, "--out", d.mine,
                                                                  "--max-iters", "5", "--overwrite"],
     "--overwrite only replaces a story checkpoint"),
    ("lr-find --out a story checkpoint", lambda d: ["lr-find", "--data", d.corpus, "--out", d.run, "--num-iters", "20"],
     "already holds a story checkpoint"),
    # damaged checkpoint files: one line naming the file
    ("--resume with train_state.pt cut short", lambda d: ["train", "--data", d.corpus, "--max-iters", "30", *RESUME,
                                                         "--out", damaged(d, "train_state.pt", cut=1000)],
     "train_state.pt is damaged and cannot be read"),
    ("--resume with an empty train_state.pt", lambda d: ["train", "--data", d.corpus, "--max-iters", "30", *RESUME,
                                                        "--out", damaged(d, "train_state.pt", b"")],
     "train_state.pt is damaged and cannot be read"),
    ("--resume with a wrong char_vocab.json", lambda d: ["train", "--data", d.corpus, "--max-iters", "30", *RESUME,
                                                        "--out", damaged(d, "char_vocab.json", b'{"chars": "abc"}')],
     "char_vocab.json is not a valid character vocabulary"),
    ("sample with a wrong char_vocab.json", lambda d: ["sample", "--ckpt", damaged(d, "char_vocab.json", b"[1, 2]")],
     "char_vocab.json is not a valid character vocabulary"),
    ("sample with n_embd -32 in config.json", lambda d: ["sample", "--ckpt", damaged(d, "config.json", n_embd=-32)],
     "config.json is not a valid story config (model n_embd must be between 2 and 4096 (got -32))"),
    # numbers beyond a float's range or a generator's
    ("sample --temperature 1e-300", lambda d: ["sample", "--ckpt", d.run, "--temperature", "1e-300"],
     "temperature must be 0 (greedy) or at least 0.01"),
    ("sample --max-new-tokens 10**400", lambda d: ["sample", "--ckpt", d.run, "--max-new-tokens", str(10**400)],
     "max new tokens must be between 1 and 1e+06 (got a number of 401 digits)"),
    ("sample --seed 2**70", lambda d: ["sample", "--ckpt", d.run, "--seed", "1180591620717411303424"],
     "seed must be between 0 and 18446744073709551615"),
    ("--n-layer 10**400", lambda d: ["train", "--data", d.corpus, "--out", d.tmp / "o", "--max-iters", "5",
                                     "--n-layer", str(10**400)], "--n-layer: must be a whole number from 1 to 64 or 'auto'"),
    ("--data a .jsonl of chats", lambda d: ["train", "--data", chats(d), "--out", d.tmp / "o", "--max-iters", "5"],
     "chats.jsonl is a .jsonl file of chats, for an adapter (llmb train-assistant); a story model learns from"),
]


def chats(d):
    """A .jsonl file of chat rows, as an adapter trains on: a story model trained on it without a word."""
    path = d.tmp / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                    * 200)
    return path


def damaged(d, name, content=None, cut=None, **model):
    """A copy of the trained run with one file damaged: replaced by `content`, cut to `cut` bytes, or (config.json)
    with `model` values changed."""
    copy = shutil.copytree(d.run, d.tmp / f"damaged-{name}")
    file = copy / name
    if cut is not None:
        content = file.read_bytes()[:cut]
    if model:
        config = json.loads(file.read_text())
        content = json.dumps({**config, "model": {**config["model"], **model}}).encode()
    file.write_bytes(content)
    return copy


def snapshot(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


@pytest.fixture
def probe(corpus, run_copy, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "config.json").write_text('{"model_type": "phi"}')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    return SimpleNamespace(corpus=corpus, run=run_copy, tmp=tmp_path, other=other, adapter=adapter, mine=mine)


@pytest.mark.parametrize("what, argv, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_changes_nothing(probe, capsys, what, argv, message):
    before = snapshot(probe.run)
    code, _, err = cli(argv(probe), capsys)
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: " in last and message in last, err
    assert snapshot(probe.run) == before
    assert sorted(f.name for f in probe.adapter.iterdir()) == ["adapter_config.json", "config.json"]
    assert [f.name for f in probe.mine.iterdir()] == ["thesis.txt"]
    assert not (probe.tmp / "o").exists() and not (probe.tmp / "none").exists()


@pytest.mark.parametrize("argv", [
    ["training/train_char.py", "--data", "a.txt", "--out", "o", "--n-layer", "0"],
    ["training/train_char.py", "--bogus"],
    ["training/train_qlora.py", "--lora-r", "0"],
    ["-m", "llmb", "sample", "--temperature", "1"],
    ["app.py", "--port", "-1"],
])
def test_a_flag_error_is_one_line_in_every_command(argv):
    """train_char.py printed argparse's usage block (8 lines) before its `error:` line."""
    out = run_cli(*argv, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: "), out.stderr


# ------------------------------------------------------------------------------------- faults

def crash_after_first_checkpoint(d, monkeypatch):
    import llmb.story.train as story_train

    calls = {"n": 0}
    real = story_train.get_batch

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 15:
            raise RuntimeError("injected failure at step 15")
        return real(*args, **kwargs)

    monkeypatch.setattr(story_train, "get_batch", failing)
    with pytest.raises(RuntimeError, match="injected"):
        train(TrainConfig(data=[str(d.corpus)], out=str(d.out), max_iters=30, eval_interval=10, eval_iters=2,
                          **TINY), log=lambda *a: None)
    summary = json.loads((d.out / "summary.json").read_text())
    assert summary["stopped_by"] == "error" and summary["steps"] == 14
    assert load_checkpoint(d.out)[2]["step"] == 10


def disk_full_while_saving(d, monkeypatch):
    import llmb.story.train as story_train

    real = story_train.save_checkpoint
    saves = {"n": 0}

    def fill_then_save(out, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second save finds the disk full
            subprocess.run(["dd", "if=/dev/zero", f"of={out}/ballast", "bs=64k"], capture_output=True)
        return real(out, *args, **kwargs)

    monkeypatch.setattr(story_train, "save_checkpoint", fill_then_save)
    with tmpfs(d.tmp / "small", size="4m") as disk:
        with pytest.raises(UserError, match="could not save the checkpoint in .*: the disk is full .*; the checkpoint "
                                            "of step 10 is kept"):
            train(TrainConfig(data=[str(d.corpus)], out=str(disk / "run"), max_iters=30, eval_interval=10,
                              eval_iters=2, **TINY), log=lambda *a: None)
        (disk / "run" / "ballast").unlink()
        assert load_checkpoint(disk / "run")[2]["step"] == 10  # the last good checkpoint


def real_disk_fills(d, room):
    """Train on a real disk with room for one checkpoint of the trained run's size and `room(sizes)` bytes more:
    the second save (step 20) fills it. One error says the disk is full, about how much the save needs, and that
    the checkpoint of step 10 is kept; that checkpoint loads."""
    sizes = {f.name: f.stat().st_size for f in d.run.iterdir()}
    checkpoint = sum(sizes[name] for name in (WEIGHTS, STATE, CONFIG, "char_vocab.json"))
    with tmpfs(d.tmp / "small", size=str(checkpoint + room(sizes))) as disk:
        with pytest.raises(UserError) as e:
            train(TrainConfig(data=[str(d.corpus)], out=str(disk / "run"), max_iters=30, eval_interval=10,
                              eval_iters=2, sample_chars=0, **TINY), log=lambda *a: None)
        said = re.fullmatch(rf"could not save the checkpoint in {re.escape(str(disk / 'run'))}: the disk is full "
                            rf"\(the save needs about {megabytes(sizes[WEIGHTS] + sizes[STATE])}, ([\d.]+) MB is free "
                            r"there\); the checkpoint of step 10 is kept: free some space, then --resume continues "
                            r"from it", str(e.value))
        assert said and float(said[1]) * 1e6 < sizes[WEIGHTS] + sizes[STATE], str(e.value)
        assert load_checkpoint(disk / "run")[2]["step"] == 10 and not (disk / "run" / ".saving").exists()
        assert json.loads((disk / "run" / "summary.json").read_text())["saved_step"] == 10


def disk_fills_in_torch_save(d, monkeypatch):
    """The weights fit, the training state does not: torch.save says "[enforce fail at inline_container.cc:672]
    . unexpected pos ..."."""
    real_disk_fills(d, lambda sizes: sizes[WEIGHTS] + 64 * 1024)


def disk_fills_in_safetensors(d, monkeypatch):
    """The weights do not fit: safetensors says "I/O error: No space left on device" (a SafetensorError)."""
    real_disk_fills(d, lambda sizes: sizes[WEIGHTS] // 2)


def torch_save_finds_the_disk_full(d, monkeypatch):
    """torch.save fails with a RuntimeError, not an OSError, on a disk that is not full: one error line in its
    own words and exit 2, the staging folder removed, the last good checkpoint kept, and summary.json saying so."""
    import llmb.story.checkpoint as checkpoint

    real, saves = checkpoint.torch.save, {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed\ndetail")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    code, _, err = cli(["train", "--data", d.corpus, "--out", d.out, "--max-iters", "30", "--eval-interval", "10",
                        "--eval-iters", "2", *TINY_FLAGS], d.capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: could not save the checkpoint in {d.out}: PytorchStreamWriter "
                                            "failed writing file data/3: file write failed; the checkpoint of step 10 "
                                            "is kept")
    assert not (d.out / ".saving").exists()
    summary = json.loads((d.out / "summary.json").read_text())
    assert summary["stopped_by"] == "error" and summary["steps"] == 20 and summary["saved_step"] == 10
    assert load_checkpoint(d.out)[2]["step"] == 10


def read_only_fresh(d, monkeypatch):
    with tmpfs(d.tmp / "ro", read_only=True) as ro:
        with pytest.raises(UserError, match="cannot write"):
            train(TrainConfig(data=[str(d.corpus)], out=str(ro / "run"), max_iters=5, **TINY))


def read_only_resume(d, monkeypatch):
    with tmpfs(d.tmp / "ro", fill_from=d.run, read_only=True) as ro:
        with pytest.raises(UserError, match="cannot write"):
            train(TrainConfig(data=[str(d.corpus)], out=str(ro), max_iters=30, resume=True, **TINY))
        assert load_checkpoint(ro)[2]["step"] == 20


def read_only_lr_find(d, monkeypatch):
    from llmb.story.lr_finder import find_lr

    with tmpfs(d.tmp / "ro", read_only=True) as ro:
        with pytest.raises(UserError, match="cannot write"):
            find_lr(TrainConfig(data=[str(d.corpus)], out=str(ro), **TINY), num_iters=20, out_dir=ro)


def start(d, out, *flags):
    return subprocess.Popen([sys.executable, "training/train_char.py", "--data", str(d.corpus), "--out", str(out),
                             *TINY_FLAGS, "--log-interval", "1", "--eval-iters", "2", *map(str, flags)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(path, n, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and len(read_metrics(path)) < n:
        time.sleep(0.05)
    assert len(read_metrics(path)) >= n


def kill_9_mid_run(d, monkeypatch):
    proc = start(d, d.out, "--max-iters", 60, "--eval-interval", 10)
    wait_for_records(d.out / "metrics.jsonl", 25)
    proc.kill()
    proc.wait()
    saved = load_checkpoint(d.out)[2]["step"]
    assert saved >= 20 and saved % 10 == 0
    r = run_cli("training/train_char.py", "--data", d.corpus, "--out", d.out, "--max-iters", 60, "--eval-interval", 10,
                "--log-interval", 1, "--eval-iters", 2, *RESUME)
    assert r.returncode == 0, r.stderr
    assert [rec["step"] for rec in read_metrics(d.out / "metrics.jsonl")] == list(range(1, 61))


def kill_9_before_an_overwrite_saves(d, monkeypatch):
    before = snapshot(d.run)
    proc = start(d, d.run, "--overwrite", "--n-embd", 64, "--max-iters", 500, "--eval-interval", 400)
    wait_for_records(d.run / ".metrics.new.jsonl", 5)
    proc.kill()
    proc.wait()
    assert snapshot(d.run) == {**before, ".metrics.new.jsonl": (d.run / ".metrics.new.jsonl").read_bytes()}
    r = run_cli("-m", "llmb", "sample", "--ckpt", d.run, "--max-new-tokens", 20, "--seed", 1)
    assert r.returncode == 0, r.stderr


def stop_signal(d, monkeypatch, sig=signal.SIGINT):
    proc = start(d, d.out, "--max-iters", 2000, "--eval-interval", 1000)
    wait_for_records(d.out / "metrics.jsonl", 10)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    summary = json.loads((d.out / "summary.json").read_text())
    assert summary["stopped_by"] == "signal" and load_checkpoint(d.out)[2]["step"] == summary["steps"]
    assert summary["saved_step"] == summary["steps"]  # what is on disk, for whoever reads the summary


def sigterm(d, monkeypatch):
    stop_signal(d, monkeypatch, signal.SIGTERM)


FAULTS = [  # (what, check, needs a subprocess)
    ("exception after the first checkpoint", crash_after_first_checkpoint, False),
    ("disk full while saving", disk_full_while_saving, False),
    ("disk full in torch.save (a RuntimeError)", torch_save_finds_the_disk_full, False),
    ("a real disk fills in torch.save", disk_fills_in_torch_save, False),
    ("a real disk fills in safetensors", disk_fills_in_safetensors, False),
    ("read-only file system: new run", read_only_fresh, False),
    ("read-only file system: --resume", read_only_resume, False),
    ("read-only file system: lr-find", read_only_lr_find, False),
    ("kill -9 mid-run, then --resume", kill_9_mid_run, True),
    ("kill -9 of an --overwrite run before it saves", kill_9_before_an_overwrite_saves, True),
    ("SIGINT mid-run", stop_signal, True),
    ("SIGTERM mid-run", sigterm, True),
]


@pytest.mark.parametrize("what, fault", [pytest.param(w, f, marks=[pytest.mark.slow] if slow else [], id=w)
                                         for w, f, slow in FAULTS])
def test_fault_keeps_the_last_good_checkpoint(probe, tmp_path, monkeypatch, capsys, what, fault):
    fault(SimpleNamespace(**vars(probe), out=tmp_path / "faulted", capsys=capsys), monkeypatch)


def test_counts():
    print(f"story reliability: {len(BAD_INPUTS)} bad inputs, {len(FAULTS)} faults")
    assert len(BAD_INPUTS) >= 37 and len(FAULTS) >= 12
