"""Uploaded training data: checked, then saved under a clean name, never half-written.

    save_upload("/tmp/gradio/…/My Book.TXT", "runs/app/uploads")   # -> runs/app/uploads/My_Book.txt

A .txt upload must be a plain-text book; a .jsonl upload must hold chat rows the QLoRA trainer
understands. The copy goes to a temporary name and is renamed when complete, so a full disk
never leaves a truncated file for the Data picker to offer. Messages name the file as the user
called it, never the server's temporary path.
"""

import re
import shutil
from pathlib import Path

from llmb.errors import UserError
from llmb.fileio import atomic_path

SUFFIXES = (".txt", ".jsonl")
MAX_UPLOAD = "50mb"  # Gradio's own limit on every upload (launch(max_file_size=...))


def clean_name(name):
    """A safe file name: letters, digits, '.', '_' and '-'; the suffix in lower case."""
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".") or "upload"
    return stem + suffix


def check_upload(src, shown):
    """UserError (naming the file as `shown`) if `src` is not usable training data."""
    from llmb.assistant.data import load_conversations
    from llmb.story.corpus import read_book

    suffix = Path(shown).suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{shown}: upload .txt books or .jsonl chats")
    try:
        if suffix == ".txt":
            read_book(src)
            return
        _, _, bad = load_conversations(str(src))
    except UnicodeDecodeError:
        raise UserError(f"{shown} is not UTF-8 text") from None
    except UserError as e:  # the reader names the server's temporary path: name the user's file instead
        raise UserError(str(e).replace(str(src), shown)) from None
    if bad:
        raise UserError(f"{shown}: {len(bad)} bad rows, e.g. {bad[0].split(':', 1)[-1].strip()}")


def save_upload(path, uploads_dir):
    """Check the uploaded file, then copy it into `uploads_dir` atomically; returns the saved path."""
    if not isinstance(path, (str, Path)):
        raise UserError(f"an upload must be a file (got {type(path).__name__})")
    src = Path(path)
    shown = src.name
    check_upload(src, shown)
    dest = Path(uploads_dir) / clean_name(shown)
    try:
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    except OSError as e:
        raise UserError(f"{shown} could not be saved ({e.strerror or e}); nothing was kept") from None
    return dest
