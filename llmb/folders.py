"""What kind of model folder is this? The one answer for the CLIs, the trainers, the hub and the app.

    story     a story checkpoint: config.json with "llmb": "story", and model.safetensors
    adapter   a LoRA adapter: adapter_config.json (what peft's save_pretrained writes)
    model     a Hugging Face model folder: config.json and weights (a base for --base)

and, for every command that writes a folder, whether it may write there (`check_out_folder`):
a new folder, an empty one, --resume of a run of its own kind, or --overwrite of a folder that
holds what the command itself writes; anything else is refused in one line saying what is there.

Reading a folder's kind imports nothing heavy, so the app can list its pickers before torch loads.
"""

import functools
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl  # not on Windows: there two runs into one folder are not caught
except ImportError:
    fcntl = None

from llmb.errors import UserError

STORY_CONFIG, STORY_WEIGHTS = "config.json", "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _config(path):
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_adapter(path):
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_story_checkpoint(path):
    config = _config(path)
    return isinstance(config, dict) and config.get("llmb") == "story" and (Path(path) / STORY_WEIGHTS).is_file()


def is_base_model(path):
    """A Hugging Face causal-LM folder (config.json with a model_type, and weights) usable as --base."""
    path, config = Path(path), _config(path)
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return isinstance(config, dict) and "model_type" in config and has_weights and not is_adapter(path)


def folder_kind(path):
    """'story', 'adapter' or 'model'; None for anything else."""
    if is_adapter(path):
        return "adapter"
    if is_story_checkpoint(path):
        return "story"
    if is_base_model(path):
        return "model"
    return None


def require(path, kind, hint=""):
    """`path` as a Path if it is a folder of `kind`; else a UserError saying what it is and what to do."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} does not exist or is not a folder{'; ' + hint if hint else ''}")
    found = folder_kind(path)
    if found != kind:
        what = {"story": "a story checkpoint (config.json with \"llmb\": \"story\" and model.safetensors)",
                "adapter": f"a LoRA adapter dir ({ADAPTER_CONFIG})",
                "model": "a model folder (config.json and weights)"}[kind]
        got = f"it is {'an' if found == 'adapter' else 'a'} {found} folder" if found else "it holds none of those"
        raise UserError(f"{path} is not {what}: {got}{'; ' + hint if hint else ''}")
    return path


# ------------------------------------------------------------------------------ output folders

STORY_STATE = "train_state.pt"
JOB_LOG = "train.log"  # the app opens its job's log in the folder before the trainer starts: not a run's content
ADAPTER_CHECKPOINT = re.compile(r"checkpoint-\d+$")  # a QLoRA run's resumable checkpoints
OUTPUTS = {"story": "a story checkpoint", "adapter": "a LoRA adapter run", "model": "a model folder",
           "lr-find": "an LR-finder result", "run": "the log of a run that saved no model",
           "other": "files that are not a model"}


def output_kind(path):
    """What an output folder holds: None (missing or empty) or a key of OUTPUTS.

    A run that stopped before it finished counts as its kind: a story run with only its training
    state, a QLoRA run with only its checkpoint-N folders.
    """
    path = Path(path)
    if not path.is_dir() or not [p for p in path.iterdir() if p.name != JOB_LOG]:
        return None
    config = _config(path)
    if is_adapter(path) or any(ADAPTER_CHECKPOINT.match(p.name) for p in path.iterdir() if p.is_dir()):
        return "adapter"
    if (isinstance(config, dict) and config.get("llmb") == "story") or (path / STORY_STATE).is_file():
        return "story"
    if isinstance(config, dict) and "model_type" in config:
        return "model"
    if (path / "lr_find.json").is_file():
        return "lr-find"
    if any((path / name).is_file() for name in ("metrics.jsonl", "summary.json", "progress.json")):
        return "run"
    return "other"


def _listing(path, shown=4):
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir())
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def check_writable(path, flag="--out"):
    """`path` is not a file, and it (or the folder it would be made in) is writable by us."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {parent} (read-only or not yours); give {flag} a folder you can write")
    return path


KEEP = ".llmb-keep"  # a folder holding this file is never replaced nor resumed (the shipped demo model)


def check_out_folder(path, kind, overwrite=False, resume=False, flag="--out"):
    """May a command that writes `kind` (a key of OUTPUTS) write its folder at `path`? The one rule:

    a new or empty folder; with `resume`, a folder holding a run of `kind`; with `overwrite`, a folder
    holding `kind` (or the log of a run that saved no model, or an LR-finder result), which the command
    replaces only once its new content is complete; never a folder marked with a KEEP file. Anything else
    is a UserError naming what is there. Returns output_kind(path): what the command will replace or resume
    (None for a fresh folder).
    """
    path = check_writable(path, flag)
    if (path / KEEP).is_file():
        why = (path / KEEP).read_text(encoding="utf-8", errors="replace").strip().splitlines()[:1] or ["kept"]
        raise UserError(f"{path} is kept as it is ({why[0][:120]}); give another {flag}")
    found = output_kind(path)
    if resume:
        if found == kind:
            return found
        if found is None:
            raise UserError(f"--resume: no checkpoint in {path} to resume from; start a run without --resume")
        raise UserError(f"--resume: {path} holds {OUTPUTS[found]} ({_listing(path)}), not {OUTPUTS[kind]} "
                        f"to continue; give the {flag} of a run of this kind")
    replaceable = (kind, "run", "lr-find")  # what the command writes, or records of a run that saved no model
    if found is None or (overwrite and found in replaceable):
        return found
    if found in replaceable:
        again = " --resume to continue it," if kind in ("story", "adapter") and found == kind else ""
        raise UserError(f"{path} already holds {OUTPUTS[found]} ({_listing(path)}); give{again} another {flag}, "
                        "or --overwrite to replace it")
    raise UserError(f"{path} already holds {OUTPUTS[found]} ({_listing(path)}); give another {flag} "
                    f"(--overwrite only replaces {OUTPUTS[kind]})")


FILES = {"gguf": (b"GGUF", "a GGUF file")}  # the files a command writes: their first bytes, and their name


def check_out_file(path, kind, overwrite=False, flag="--out"):
    """May a command that writes a file of `kind` (a key of FILES) write `path`? A new file, or with
    `overwrite` a file of that kind (known by its first bytes; replaced atomically once written, see
    llmb.fileio); never a folder, nor a file inside a model, adapter or story checkpoint folder.
    """
    path = Path(path)
    what = FILES[kind][1]
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    folder = path.resolve().parent
    holder = output_kind(folder)
    if holder in ("story", "adapter", "model"):
        raise UserError(f"{folder} holds {OUTPUTS[holder]}, which must stay as it is; give {flag} a file "
                        f"outside it, e.g. {folder.parent / (folder.name + '.' + kind)}")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; give another {flag}, or --overwrite to replace it")
    if path.exists() and not is_file_of(path, kind):
        raise UserError(f"{path} is not {what}; give another {flag} (--overwrite only replaces {what})")
    check_writable(path.parent, flag)
    return path


def is_file_of(path, kind):
    """Does the file `path` start with the bytes of `kind` (a key of FILES)? False if it cannot be read."""
    magic = FILES[kind][0]
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def saved_step(path):
    """The training step of the checkpoint a run left in `path` (what --resume continues), or None.

    story: the step in config.json; a QLoRA run: the newest checkpoint-N. Read from the folder
    itself, so it is right even after a kill -9 that wrote no summary.
    """
    path = Path(path)
    config = _config(path)
    if is_story_checkpoint(path) and isinstance(config.get("step"), int):
        return config["step"]
    steps = [int(p.name.split("-")[1]) for p in path.glob("checkpoint-*") if ADAPTER_CHECKPOINT.match(p.name)]
    return max(steps) if steps else None


@contextmanager
def claim(path, flag="--out"):
    """Hold the folder `path` for this process while the block runs: a second process that claims it
    meanwhile is refused (two trainers writing one folder would mix or destroy both runs).

    The lock is a file in the system's temporary folder named after the folder's absolute path, held
    with flock: the kernel releases it when the process ends, kill -9 included. Only the first process
    of a multi-process run (RANK 0) claims; a process may claim a folder again while it holds it.
    """
    key = str(Path(path).expanduser().resolve())
    if fcntl is None or int(os.environ.get("RANK", "0")) != 0 or key in _HELD:
        yield
        return
    locks = Path(tempfile.gettempdir()) / "llmb-locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(locks / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another run is writing to {path} right now; wait until it ends (or stop it), "
                        f"or give another {flag}") from None
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        os.close(fd)  # releases the lock


_HELD = set()  # the folders this process holds


def one_writer(train):
    """Decorator for a trainer train(cfg, ...): it holds cfg.out while it runs (claim)."""
    @functools.wraps(train)
    def holding(cfg, *args, **kwargs):
        with claim(cfg.out):
            return train(cfg, *args, **kwargs)
    return holding
