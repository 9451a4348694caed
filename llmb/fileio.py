"""Files that are never half-written: every write goes to a temporary name, is fsynced, then renamed.

A crash, a kill -9 or a full disk at any moment leaves either the old file (or folder) or the
new one, never a mix. Used for checkpoints, job state, metrics trims and uploads. A checkpoint
save that fails says why in one line (save_failed): a full disk, how much the save needs, and
which checkpoint is kept.
"""

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from llmb.errors import UserError
from llmb.folders import saved_step


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj):
    """Write `obj` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sync_folder(folder, files=True):
    """Make what was written in `folder` final: its files get the mode open() would give them (safetensors
    writes 0600) and are fsynced, then the folder itself is (so renames into it are on disk too)."""
    folder = Path(folder)
    for f in sorted(folder.rglob("*")) if files else ():
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~current_umask())
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_dir_atomically(target, write):
    """Call write(tmp_dir), then rename tmp_dir to `target`: a crash never leaves half a checkpoint,
    and an old `target` is replaced only once the new one is complete."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        sync_folder(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


def write_error(e):
    """Why a write failed, in one line: the OS's words ("No space left on device"), or the first line of
    torch's, which reports a full disk as a RuntimeError ("PytorchStreamWriter failed writing file ...")."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# The errors of a failed save: the OS's, torch.save's (a RuntimeError: "[enforce fail at inline_container.cc:672]
# . unexpected pos ..." when the disk fills) and safetensors' ("I/O error: No space left on device").
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


def save_failed(what, folder, e, needed):
    """The UserError for a save of `what` ("the checkpoint") into `folder` that failed with `e` (one of
    SAVE_ERRORS), once what it half-wrote is removed: why, and which checkpoint the folder keeps.

    Why: the disk is full (the OS says so, or less is free than the save needs: `needed`, roughly the
    bytes it writes), with how much it needs and how much is free; else the error's first line.
    """
    free = shutil.disk_usage(folder).free
    kept = saved_step(folder)
    keeps = f"the checkpoint of step {kept} is kept" if kept is not None else "no checkpoint is kept"
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e)
    if not (full or free < needed):
        return UserError(f"could not save {what} in {folder}: {write_error(e)}; {keeps}")
    then = "then --resume continues from it" if kept is not None else "then start again"
    return UserError(f"could not save {what} in {folder}: the disk is full (the save needs about "
                     f"{megabytes(needed)}, {megabytes(free)} is free there); {keeps}: free some space, {then}")


def save_size(*objects, files=()):
    """Roughly the bytes a checkpoint save writes: the last checkpoint's `files` (paths of files or
    folders), or before the first one the bytes of the tensors in `objects` (nested dicts and lists)."""
    on_disk = sum(f.stat().st_size for path in map(Path, files) for f in [path, *path.rglob("*")] if f.is_file())
    return on_disk or sum(map(tensor_bytes, objects))


def tensor_bytes(obj):
    if isinstance(obj, dict):
        return sum(map(tensor_bytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(tensor_bytes, obj))
    return getattr(obj, "nbytes", 0)  # a tensor or an array


def megabytes(n):
    return f"{n / 1e6:,.1f} MB"
