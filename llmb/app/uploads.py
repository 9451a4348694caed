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

import base64
import hmac
import json
import re
import secrets
import shutil
from pathlib import Path

from llmb.app.config import UPLOAD_KEY
from llmb.app.guard import uploaded
from llmb.errors import UserError
from llmb.fileio import atomic_path

SUFFIXES = (".txt", ".jsonl")
SESSION_SECRET = secrets.token_bytes(32)  # turns a session id into its uploads key (upload_key), for this run


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


def save_upload(path, uploads_dir, quota=(20, 50, 1000)):
    """Check the uploaded file, then copy it into `uploads_dir` atomically; returns the saved path.
    `quota`: (files, MB) the folder may hold, and MB all the folders beside it (every browser's) may hold."""
    if not isinstance(path, (str, Path)):
        raise UserError(f"an upload must be a file (got {type(path).__name__})")
    src = Path(path)
    shown = src.name
    check_upload(src, shown)
    check_quota(uploads_dir, src, shown, *quota)
    dest = Path(uploads_dir) / clean_name(shown)
    try:
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    except OSError as e:
        raise UserError(f"{shown} could not be saved ({e.strerror or e}); nothing was kept") from None
    return dest


def check_quota(folder, adding, shown, max_files, max_mb, total_mb):
    """UserError if keeping `adding` (a file) as `shown` in the browser's `folder` goes over its quota, or takes
    the uploads of all browsers (the folders beside it) over `total_mb` (a file of the same name is replaced,
    so it does not count twice)."""
    replaced, size = Path(folder) / clean_name(shown), Path(adding).stat().st_size
    mine = [f.stat().st_size for f in files_in(folder, "*") if f != replaced] + [size]
    if len(mine) > max_files or sum(mine) > max_mb * 2**20:
        raise UserError(f"{shown}: not kept; each browser may keep {max_files} files and {max_mb} MB of uploads "
                        f"(yours would hold {len(mine)} files, {sum(mine) / 2**20:.1f} MB). "
                        "Uploading a file of the same name replaces it")
    everyone = sum(f.stat().st_size for f in files_in(Path(folder).parent, "*/*") if f != replaced) + size
    if everyone > total_mb * 2**20:
        raise UserError(f"{shown}: not kept; the app keeps at most {total_mb} MB of uploads from all browsers "
                        f"together, and this would make {everyone / 2**20:.1f} MB. Ask the app's owner to free space")


def files_in(folder, pattern):
    return [f for f in Path(folder).glob(pattern) if f.is_file()] if Path(folder).is_dir() else []


def upload_key(value, session=None):
    """The browser's uploads key if `value` is one (16-64 letters, digits, '_' or '-'), else the key of the
    caller's `session` (the same for every call of that session, so a client that sends no key gets one
    folder, not one per call), else a new random one: the name of the browser's own uploads folder,
    unguessable, so no one else can list or use it."""
    if isinstance(value, str) and UPLOAD_KEY.match(value):
        return value
    if session:
        digest = hmac.new(SESSION_SECRET, str(session).encode(), "sha256").digest()
        return base64.urlsafe_b64encode(digest[:24]).decode()
    return secrets.token_urlsafe(24)


def forget_upload(path):
    """Delete Gradio's cached copy of an upload once handled (kept, it could be fetched over HTTP until
    the hourly clean-up). Only files inside Gradio's upload folder: an API client names the path."""
    try:
        if uploaded(path) and Path(path).is_file():
            Path(path).unlink()
    except (OSError, TypeError, ValueError):
        pass  # already gone, or not a path: nothing to forget


class UploadTypes:
    """ASGI middleware: Gradio's upload route keeps only .txt books and .jsonl chats (any case), at most
    `max_files` files and `max_mb` MB in one request (what one browser may keep in all).

    Gradio 6 checks gr.File(file_types=...) only when an event takes the file, not on its upload route
    (`POST /gradio_api/upload`), which stores any file in its cache, and limits each file's size, not a
    request's. A request that says it is too large is refused before it is read; otherwise the route
    finishes (Gradio moves the files into place after its answer), then, if any file has another type or
    there are too many or too large in all, every file of the request is deleted and the answer is 415 or
    413 with a message instead of their paths.
    """

    def __init__(self, app, max_files=20, max_mb=50):
        self.app, self.max_files, self.max_bytes = app, max_files, max_mb * 2**20

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/gradio_api/upload"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes + 2**20:  # + room for the form's own lines
            return await refuse(send, 413, self.too_much())
        held = []

        async def hold(message):
            held.append(message)

        await self.app(scope, receive, hold)
        paths = uploaded_files(held)
        wrong = [p for p in paths if Path(p).suffix.lower() not in SUFFIXES]
        too_much = len(paths) > self.max_files or sum(Path(p).stat().st_size for p in paths if Path(p).is_file()) \
            > self.max_bytes
        if not wrong and not too_much:
            for message in held:
                await send(message)
            return
        for path in paths:
            Path(path).unlink(missing_ok=True)
        if wrong:
            name = Path(wrong[0]).name
            return await refuse(send, 415, f"{name}: upload .txt books or .jsonl chats; nothing was kept")
        await refuse(send, 413, self.too_much())

    def too_much(self):
        return (f"too much in one upload: at most {self.max_files} files and {self.max_bytes // 2**20} MB in all "
                "(what one browser may keep); nothing was kept")


async def refuse(send, status, text):
    text = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(text))]})
    await send({"type": "http.response.body", "body": text})


def uploaded_files(messages):
    """The files of a successful upload answer (ASGI messages), else []."""
    start = next((m for m in messages if m["type"] == "http.response.start"), {})
    if start.get("status") != 200:
        return []
    try:
        paths = json.loads(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body"))
    except ValueError:
        return []
    return [str(p) for p in paths] if isinstance(paths, list) else []
