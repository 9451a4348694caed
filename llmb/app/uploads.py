"""Uploaded training data: checked, then saved under a clean name, never half-written.

    save_upload("/tmp/gradio/…/My Book.TXT", "runs/app/uploads/KEY")   # -> runs/app/uploads/KEY/My_Book.txt

Each browser has its own uploads folder, named by a random key kept in the browser (`upload_key`), so
no visitor can list or train on another's uploads. Gradio's upload route itself keeps only .txt and
.jsonl files (`UploadTypes`), and a handled upload is deleted from Gradio's cache (`forget_upload`).

A .txt upload must be a plain-text book; a .jsonl upload must hold chat rows the QLoRA trainer
understands. The copy goes to a temporary name and is renamed when complete, so a full disk
never leaves a truncated file for the Data picker to offer. Messages name the file as the user
called it, never the server's temporary path.
"""

import json
import re
import secrets
import shutil
from pathlib import Path

from llmb.app.config import UPLOAD_KEY
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


def upload_key(value):
    """The browser's uploads key if `value` is one (16-64 letters, digits, '_' or '-'), else a new random
    one: the name of the browser's own uploads folder, unguessable, so no one else can list or use it."""
    return value if isinstance(value, str) and UPLOAD_KEY.match(value) else secrets.token_urlsafe(24)


def forget_upload(path):
    """Delete Gradio's cached copy of an upload once handled (kept, it could be fetched over HTTP until
    the hourly clean-up). Only files inside Gradio's upload folder: an API client names the path."""
    from gradio.utils import get_upload_folder

    try:
        cached = Path(path).resolve()
        if cached.is_relative_to(Path(get_upload_folder()).resolve()) and cached.is_file():
            cached.unlink()
    except (OSError, TypeError, ValueError):
        pass  # already gone, or not a path: nothing to forget


class UploadTypes:
    """ASGI middleware: Gradio's upload route keeps only .txt books and .jsonl chats (any case).

    Gradio 6 checks gr.File(file_types=...) only when an event takes the file, not on its upload route
    (`POST /gradio_api/upload`), which stores any file in its cache. This lets the route finish (Gradio
    moves the files into place after its answer), then, if any file has another type, deletes every file
    of the request and answers 415 with a message instead of their paths.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/gradio_api/upload"):
            return await self.app(scope, receive, send)
        held = []

        async def hold(message):
            held.append(message)

        await self.app(scope, receive, hold)
        refused = refused_files(held)
        if not refused:
            for message in held:
                await send(message)
            return
        for path in refused:
            Path(path).unlink(missing_ok=True)
        wrong = next(Path(p).name for p in refused if Path(p).suffix.lower() not in SUFFIXES)
        text = f"{wrong}: upload .txt books or .jsonl chats; nothing was kept".encode()
        await send({"type": "http.response.start", "status": 415,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(text))]})
        await send({"type": "http.response.body", "body": text})


def refused_files(messages):
    """The files of an upload answer (ASGI messages) if any of them is not a .txt or .jsonl file, else []."""
    start = next((m for m in messages if m["type"] == "http.response.start"), {})
    if start.get("status") != 200:
        return []
    try:
        paths = json.loads(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body"))
    except ValueError:
        return []
    if not isinstance(paths, list) or all(Path(str(p)).suffix.lower() in SUFFIXES for p in paths):
        return []
    return [str(p) for p in paths]
