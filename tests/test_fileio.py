"""Atomic writes: a failure part-way leaves the old file or folder, never half of a new one."""

import os

import pytest

from llmb.fileio import atomic_path, read_json, save_dir_atomically, write_json


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
