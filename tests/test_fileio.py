"""Atomic writes: a failure part-way leaves the old file or folder, never half of a new one."""

import errno
import json
import os
import re
import shutil

import pytest

from llmb.fileio import atomic_path, megabytes, read_json, save_dir_atomically, save_failed, save_size, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"step": 2, "half": ', encoding="utf-8")
            raise RuntimeError("disk full")
    assert read_json(target) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_folder_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt"
    save_dir_atomically(target, lambda d: (d / "a.txt").write_text("old"))

    def half_write(d):
        (d / "a.txt").write_text("new")
        raise OSError("killed")

    with pytest.raises(OSError):
        save_dir_atomically(target, half_write)
    assert (target / "a.txt").read_text() == "old"
    save_dir_atomically(target, lambda d: (d / "b.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "summary.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == mode


def test_a_folder_saved_atomically_follows_the_umask_whatever_wrote_it(tmp_path):
    """safetensors (an adapter, a merged model) writes 0600; the saved folder's files get the umask's mode."""
    def write(d):
        (d / "weights.safetensors").write_bytes(b"w")
        (d / "weights.safetensors").chmod(0o600)
        (d / "sub").mkdir()
        (d / "sub" / "state.pt").write_bytes(b"s")
        (d / "sub" / "state.pt").chmod(0o600)

    old = os.umask(0o022)
    try:
        save_dir_atomically(tmp_path / "ckpt", write)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "ckpt").rglob("*") if f.is_file()}
    assert modes == {"weights.safetensors": 0o644, "state.pt": 0o644}


def test_a_failed_folder_save_leaves_no_temporary_folder(tmp_path):
    def full_disk(d):
        (d / "half").write_bytes(b"h")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(RuntimeError):
        save_dir_atomically(tmp_path / "ckpt", full_disk)
    assert os.listdir(tmp_path) == []


def test_a_failed_save_says_why_and_which_checkpoint_is_kept(tmp_path):
    """The disk is full when the OS says so or when less is free than the save needs; then the error says how
    much it needs and how much is free. Any other failure is its own first line. Both name the step kept."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"llmb": "story", "step": 30}))
    (run / "model.safetensors").write_bytes(b"w" * 1000)
    more_than_free = shutil.disk_usage(run).free + 10**9  # the disk is shared: what is free may change meanwhile
    full = rf"could not save the checkpoint in {re.escape(str(run))}: the disk is full \(the save needs about {{}}, " \
           r"[\d,]+\.\d MB is free there\); the checkpoint of step 30 is kept: free some space, then --resume " \
           r"continues from it"
    no_space = OSError(errno.ENOSPC, "No space left on device")
    torch_words = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534\nframes")
    assert re.fullmatch(full.format(r"0\.0 MB"), str(save_failed("the checkpoint", run, no_space, 1000)))
    assert re.fullmatch(full.format(megabytes(more_than_free)),
                        str(save_failed("the checkpoint", run, torch_words, more_than_free)))
    assert str(save_failed("the checkpoint", run, torch_words, 1000)) == (
        f"could not save the checkpoint in {run}: [enforce fail at inline_container.cc:672] . unexpected pos 576 vs "
        "534; the checkpoint of step 30 is kept")
    assert str(save_failed("the checkpoint", tmp_path, no_space, 1000)).endswith(
        "no checkpoint is kept: free some space, then start again")


def test_a_save_needs_about_the_last_checkpoint_or_its_tensors(tmp_path):
    import torch

    state = {"weights": [torch.zeros(10), torch.zeros(5, dtype=torch.float64)], "step": 3, "name": "run"}
    assert save_size(state, files=[tmp_path / "none"]) == 80
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "a.bin").write_bytes(b"a" * 7)
    (tmp_path / "b.pt").write_bytes(b"b" * 5)
    assert save_size(state, files=[tmp_path / "ckpt", tmp_path / "b.pt"]) == 12
