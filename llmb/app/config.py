"""Settings of the Gradio app (`python app.py`): flags, environment variables and folders.

Every flag has an environment variable, so a Hugging Face Space (which cannot pass flags)
is configured the same way:

    --host / GRADIO_SERVER_NAME      --story-ckpt / LLMB_STORY_CKPT   --device / LLMB_DEVICE
    --port / GRADIO_SERVER_PORT      --base / LLMB_BASE               --cpu-int8 / LLMB_CPU_INT8
    --checkpoints / LLMB_CHECKPOINTS --adapter / LLMB_ADAPTER         --data-dir / LLMB_DATA_DIRS
    --work-dir / LLMB_WORK_DIR       --allow-training / LLMB_ALLOW_TRAINING
    --max-turns / LLMB_MAX_TURNS     --uploads-mb / LLMB_UPLOADS_MB   --uploads-files / LLMB_UPLOADS_FILES
    --uploads-total-mb / LLMB_UPLOADS_TOTAL_MB

This module also decides which folders the app may read data from and write to, and finds
the story checkpoints, LoRA adapters, base models and data the pickers offer. It imports no
torch, transformers or peft (a test checks `sys.modules` after start-up), so the app answers
HTTP before any model code is loaded.
"""

import functools
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmb.app.jobs import read_owners
from llmb.assistant.config import DEFAULT_BASE
from llmb.assistant.gguf import SMALL_NAME
from llmb.errors import UserError, clip
from llmb.folders import is_adapter, is_base_model, is_story_checkpoint
from llmb.hub import HUB_PREFIX, hub_dataset_id
from llmb.settings import Parser, add_arguments, from_args, parse, setting, specs

REPO = Path(__file__).resolve().parents[2]
PERSISTENT = Path("/data")  # a Space with persistent storage mounts it here
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SMALL_BUTTON = "Get the small assistant"  # the Assistant tab's button: installs SMALL_NAME, as get-small-assistant
UPLOAD_KEY = re.compile(r"^[A-Za-z0-9_-]{16,64}$")  # a browser's own uploads folder (uploads.upload_key)


def persistent_storage():
    """/data when it exists and we may write there (a Space with persistent storage), else None."""
    if PERSISTENT.is_dir() and os.access(PERSISTENT, os.W_OK):
        return PERSISTENT
    return None


@dataclass
class AppConfig:
    """The app's settings: each field is a flag of `python app.py` and, where it names one, an environment
    variable (read when the flag is not given)."""

    host: str = setting("127.0.0.1", "address to serve on", env="GRADIO_SERVER_NAME")
    port: int = setting(7860, "port to serve on (0: any free port)", low=0, high=65535, env="GRADIO_SERVER_PORT")
    share: bool = setting(False, "ask Gradio for a public share link")
    story_ckpt: Path = setting(REPO / "checkpoints" / "oz-story", "story checkpoint the Story tab opens with",
                               env="LLMB_STORY_CKPT")
    base: str = setting(DEFAULT_BASE, "the assistant's base model: hub id or local folder", env="LLMB_BASE")
    adapter: str = setting("auto", "LoRA adapter folder, 'none', or 'auto' (the newest adapter under the "
                                   "checkpoints folder)", env="LLMB_ADAPTER")
    device: str = setting("auto", "where the models run", choices=("auto", "cpu", "cuda"), env="LLMB_DEVICE")
    cpu_int8: bool = setting(False, "assistant on CPU: int8 linear layers (faster, less memory, but a small model's "
                                    "answers change)", env="LLMB_CPU_INT8")
    checkpoints: Path = setting(REPO / "checkpoints", "folder scanned for checkpoints and adapters; new training "
                                "runs go here (default on a Space with persistent storage: /data/checkpoints)",
                                env="LLMB_CHECKPOINTS")
    data_dir: list = setting(help="folder the Train tab may read data from (several: --data-dir A B; default: "
                                  "the repository's data/, which ships public books and chats)", factory=list)
    work_dir: Path = setting(REPO / "runs" / "app", "job state, uploads, LR finder runs and exports (default on "
                             "a Space with persistent storage: /data/llmb)", env="LLMB_WORK_DIR")
    allow_training: bool = setting(False, "allow training on a public Space (always allowed elsewhere)",
                                   env="LLMB_ALLOW_TRAINING")
    max_turns: int = setting(200, "messages a chat history may hold (an API client sends it back with each "
                                  "message)", low=1, high=10**6, env="LLMB_MAX_TURNS")
    uploads_mb: int = setting(50, "megabytes of uploads one browser may keep (and send in one request)", low=1,
                              high=10**6, env="LLMB_UPLOADS_MB")
    uploads_files: int = setting(20, "files one browser may keep uploaded (and send in one request)", low=1,
                                 high=10**6, env="LLMB_UPLOADS_FILES")
    uploads_total_mb: int = setting(1000, "megabytes of uploads all browsers together may keep", low=1, high=10**7,
                                    env="LLMB_UPLOADS_TOTAL_MB")
    on_space: bool = False  # SPACE_ID is set: a Hugging Face Space (not a flag)

    @property
    def data_dirs(self):
        """The folders the Train tab may read data from."""
        return [Path(d) for d in self.data_dir]

    @property
    def uploads(self):
        return self.work_dir / "uploads"

    @property
    def upload_quota(self):
        """(files, MB) one browser may keep, and MB all browsers together may keep (uploads.save_upload)."""
        return self.uploads_files, self.uploads_mb, self.uploads_total_mb

    @property
    def exports(self):
        """GGUF files written by Export to GGUF (the Train tab offers them for download)."""
        return self.work_dir / "exports"

    @property
    def job_state(self):
        return self.work_dir / "job.json"

    @property
    def run_owners(self):
        """Which browser started the job that wrote each folder (jobs.JobManager keeps it; `shown_to` reads it)."""
        return self.work_dir / "owners.json"

    def data_roots(self, uploads_key=None):
        """[(label, folder)] the Train tab may read data from: the data folders, and the uploads of the
        browser holding `uploads_key` (none without a valid key: one browser never sees another's)."""
        roots = [(d.name, d) for d in self.data_dirs]
        if isinstance(uploads_key, str) and UPLOAD_KEY.match(uploads_key):
            roots.append(("uploads", self.uploads / uploads_key))
        return roots

    def scan_dirs(self):
        """Where checkpoints and adapters are looked for: the output folder and the repo's own."""
        return list(dict.fromkeys([self.checkpoints, REPO / "checkpoints"]))


def parse_args(argv=None, env=None):
    """AppConfig from flags, falling back to environment variables, then to the defaults."""
    env = os.environ if env is None else env
    storage = persistent_storage()
    defaults = {"data_dir": [d for d in env.get("LLMB_DATA_DIRS", "").split(os.pathsep) if d]
                or [d for d in [REPO / "data"] if d.is_dir()]}
    if storage:
        defaults |= {"checkpoints": storage / "checkpoints", "work_dir": storage / "llmb"}
    p = Parser(prog="python app.py", description="llmb: story model, assistant and training in a browser. Every "
               "flag with an environment variable (LLMB_DATA_DIRS: folders separated by the path separator) takes "
               "it when not given.")
    add_arguments(p, AppConfig, skip=("on_space",), defaults=defaults)
    try:
        p.set_defaults(**{s.name: parse(s, env[s.env], s.env) for s in specs(AppConfig)
                          if s.env and env.get(s.env, "").strip()})
    except UserError as e:
        p.error(str(e))
    args = p.parse_args(argv)
    args.data_dir = args.data_dir or defaults["data_dir"]  # the flag replaces the default folders, not adds to them
    config = from_args(AppConfig, args)
    config.data_dir = [Path(d).resolve() for d in config.data_dir]
    for folder in config.data_dir:
        if not folder.is_dir():
            print(f"warning: the data folder {folder} does not exist; the Train tab offers nothing from it",
                  file=sys.stderr)
    config.on_space = bool(env.get("SPACE_ID"))
    config.allow_training = config.allow_training or not config.on_space
    return config


def environment(env=None):
    """Environment variables to set before gradio/huggingface_hub are imported.

    No analytics; and with persistent storage the Hugging Face cache lives on /data, so the
    Phi-2 download survives a restart of the Space.
    """
    env = os.environ if env is None else env
    wanted = {"GRADIO_ANALYTICS_ENABLED": "False"}
    storage = persistent_storage()
    if storage and "HF_HOME" not in env:
        wanted["HF_HOME"] = str(storage / ".huggingface")
    return wanted


# ---------------------------------------------------------------------------------- folders

def inside(path, roots):
    """`path` resolved, if it lies inside one of `roots` and no part of it below the root is a symlink.

    Else UserError: stops ../ tricks, and links that point anywhere (even inside the folder).
    """
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise UserError(f"a data path must be text (got {clip(repr(path))})")
    resolved = Path(path).resolve()
    for root in map(Path, roots):
        if resolved.is_relative_to(root.resolve()):
            if has_symlink(Path(os.path.abspath(path)), root):
                raise UserError(f"{path} is a symbolic link (or inside one); links are refused")
            return resolved
    raise UserError(f"{path} is outside the allowed data folders")


def has_symlink(path, root):
    """Is `path`, or a folder between it and `root`, a symbolic link?"""
    root = Path(os.path.abspath(root))
    while path != root and path != path.parent:
        if path.is_symlink():
            return True
        path = path.parent
    return False


def check_name(name):
    """A run name becomes a folder name: letters, digits, '.', '_' and '-' only."""
    name = (name or "").strip()
    if not NAME.match(name) or name in (".", ".."):
        raise UserError(f"run name {clip(name)!r} must be 1-64 letters, digits, '.', '_' or '-' (no slashes)")
    return name


def _subdirs(folders):
    for folder in folders:
        if Path(folder).is_dir():
            yield from (d for d in sorted(Path(folder).iterdir()) if d.is_dir() and not d.name.startswith("."))


def by_name(paths, name=lambda p: Path(p).name):
    """{name: path} for a picker: the page shows and the API takes names (a folder's name, a hub id), never
    server paths; of two folders with one name, the first is offered."""
    named = {}
    for path in paths:
        named.setdefault(name(path), str(path))
    return named


def newest_first(paths):
    return sorted(set(paths), key=lambda p: p.stat().st_mtime, reverse=True)


def shown_to(config, viewer):
    """Whether a run folder is `viewer`'s to see and use (a function of the folder). On a Space, a run trained
    in the app belongs to the browser that started it (`viewer`: common.owner_of of the caller; None: no
    browser's), and folders that were there already to everyone; on your own machine every folder is yours."""
    if not config.on_space:
        return lambda folder: True
    owners = read_owners(config.run_owners)
    return lambda folder: owners.get(str(Path(folder).resolve()), viewer) == viewer


def find_story_checkpoints(config, viewer=None):
    """Story checkpoints `viewer` may use: the configured one first, then the others under the checkpoints
    folders."""
    found = [d for d in _subdirs(config.scan_dirs()) if is_story_checkpoint(d)]
    found = newest_first(found)
    if is_story_checkpoint(config.story_ckpt):
        found = [config.story_ckpt] + [d for d in found if d.resolve() != config.story_ckpt.resolve()]
    return list(filter(shown_to(config, viewer), found))


def find_adapters(config, viewer=None):
    """LoRA adapter folders under the checkpoints folders that `viewer` may use, newest first."""
    found = newest_first(d for d in _subdirs(config.scan_dirs()) if is_adapter(d))
    return list(filter(shown_to(config, viewer), found))


def find_bases(config):
    """Base models the Assistant tab and the QLoRA form offer: the configured one, the default hub
    model, and every local model folder under the checkpoints folders (e.g. the small assistant)."""
    local = [str(d) for d in _subdirs(config.scan_dirs()) if is_base_model(d)]
    return list(dict.fromkeys([str(config.base), DEFAULT_BASE, *local]))


def default_adapters(config):
    """Adapters the assistant may start with, in order of preference (the first that loads is used):
    the flag's folder, none, or every adapter found, newest first (a broken newest one is skipped)."""
    if config.adapter == "none":
        return []
    if config.adapter == "auto":
        return find_adapters(config)
    return [Path(config.adapter)]


# ---------------------------------------------------------- what the pickers offer, by name

def story_checkpoints(config, viewer=None):
    """{name: folder} of the story checkpoints `viewer` may use (`shown_to`); the picker offers the names."""
    return by_name(find_story_checkpoints(config, viewer))


def story_choices(config, viewer=None):
    return list(story_checkpoints(config, viewer))


def adapters(config, viewer=None):
    """{name: folder} of the adapters `viewer` may use, and "" for none; the picker offers the names."""
    return {"": ""} | by_name(find_adapters(config, viewer))


def adapter_choices(config, viewer=None):
    return [("none: base model alone", "")] + [(name, name) for name in adapters(config, viewer) if name]


def base_name(base):
    """A local model folder's name, or the hub id."""
    return Path(base).name if Path(base).is_dir() else str(base)


def bases(config):
    """{name: folder or hub id} of the base models; the picker offers the names."""
    return by_name(find_bases(config), base_name)


def base_choices(config):
    return list(bases(config))


def local_bases(config):
    """Names of the base models in local folders, the small assistant first."""
    local = [name for name, value in bases(config).items() if Path(value).is_dir()]
    return sorted(local, key=lambda name: name != SMALL_NAME)


def train_base(config, has_gpu):
    """The QLoRA form's base: the configured one, unless it is a hub model that would crawl (no GPU: `has_gpu()`
    says) or cannot load (offline) and the small local assistant is here."""
    base = base_name(config.base)
    if Path(config.base).is_dir() or SMALL_NAME not in bases(config):
        return base
    return SMALL_NAME if not has_gpu() or hub_problem(config, config.base) else base


_hub = {"checked": 0.0, "reachable": None}


def hub_problem(config, base):
    """Why `base` cannot load now (a hub id, not downloaded, and the hub unreachable), or None.

    Said at once instead of after the download's long timeout; points to the small local assistant.
    """
    from llmb.hub import hub_reachable

    if not base or Path(base).is_dir() or downloaded(base):
        return None
    if time.time() - _hub["checked"] > 60:  # one 2 s connection test a minute at most
        _hub.update(checked=time.time(), reachable=hub_reachable())
    if _hub["reachable"]:
        return None
    local = local_bases(config)
    install = f"press **{SMALL_BUTTON}** in the Assistant tab to install the small local assistant `{SMALL_NAME}`"
    hint = f"pick the local model `{local[0]}` in Base" + ("" if local[0] == SMALL_NAME else f", or {install}") \
        if local else f"{install}, then pick it in Base"
    return f"`{base}` is not downloaded and the Hugging Face hub cannot be reached (offline); {hint}"


def downloaded(repo):
    """Is the hub model `repo` in the local Hugging Face cache already?"""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # not a valid repo id: from_pretrained will say so
        return False


# ------------------------------------------------------------------------------------- data


def data_choices(config, uploads_key=None):
    """(label, path) for every usable data source in the data folders and the caller's uploads.

    A source is a .txt book, a folder of .txt books, or a .jsonl chat file (any case of the
    suffix). Symbolic links, hidden files and model folders (a tokenizer's merges.txt is not a
    book) are left out.
    """
    choices = []
    for name, root in config.data_roots(uploads_key):
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or len(rel.parts) > 3 or \
                    has_symlink(path, root) or is_model_folder(path.parent):
                continue
            if path.is_file() and path.suffix.lower() in (".txt", ".jsonl"):
                choices.append((f"{name}/{rel}", str(path)))
            elif path.is_dir() and not is_model_folder(path):
                books = [b for b in path.glob("*") if b.suffix.lower() == ".txt" and not b.is_symlink()]
                if len(books) > 1:
                    choices.append((f"{name}/{rel}/ ({len(books)} books)", str(path)))
    return choices


def resolve_data(config, labels, uploads_key=None):
    """Server paths of the data sources picked by label (the page never sees server paths); uploads
    only from the folder of `uploads_key`, the caller's browser."""
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise UserError("data must be a list of the Data picker's names")
    known = dict(data_choices(config, uploads_key))
    missing = [x for x in labels if x not in known and not x.startswith(HUB_PREFIX)]
    if missing:
        raise UserError(f"{clip(missing[0])!r} is not one of the data sources in the allowed data folders (nor a "
                        f"Hugging Face data set written {HUB_PREFIX}owner/name)")
    roots = [root for _, root in config.data_roots(uploads_key)]
    return [f"{HUB_PREFIX}{hub_dataset_id(x)}" if x not in known else str(inside(known[x], roots)) for x in labels]


def public_text(config, text, own_key=None):
    """`text` (a command line, a log line, an error) as the page may show it: no server path, no uploads key.

    Another browser's uploads folder becomes `uploads` (its key is what guards it); the viewer's own
    (`own_key`: common.browser_key) its path, relative to the repository where it is in it, so that the
    command shown runs as it is in a terminal there. A data folder becomes its path relative to the
    repository where it is in it or beside it (`data/books/oz`), else its name (as in the Data picker),
    the checkpoints folders `checkpoints`, the repository's own paths relative, and any other absolute
    path `.../` and its last part.
    """
    own = config.uploads / own_key if isinstance(own_key, str) and UPLOAD_KEY.match(own_key) else None
    own_text = os.path.relpath(own, REPO) if own is not None and own.is_relative_to(REPO) else str(own)
    key = rf"[^\s'\"=]*{re.escape(config.uploads.name)}/([A-Za-z0-9_-]{{16,64}})(?![A-Za-z0-9_-])"
    text = re.sub(key, lambda m: "\0own\0" if own is not None and m.group(1) == own.name else "uploads", str(text))
    folders = [(d, near_repo(d) or d.name) for d in config.data_dirs] + \
        [(d, "checkpoints") for d in config.scan_dirs()]
    for folder, name in sorted(folders + [(REPO, ".")], key=lambda f: len(str(f[0])), reverse=True):
        text = text.replace(f"{folder}/", "" if name == "." else f"{name}/").replace(str(folder), name)
    return re.sub(r"(?<![\w.~-])(?:/[^/\s'\"]+)+/([^/\s'\"]+)", r".../\1", text).replace("\0own\0", own_text)


@functools.lru_cache(maxsize=64)
def near_repo(folder):
    """`folder` relative to the repository if it is in it or in a folder beside it (`data`,
    `../my-books`, also where a folder beside it is a link); else None."""
    folder = Path(folder).resolve()
    for top in [REPO, *sorted(REPO.parent.iterdir())]:
        try:
            inside = folder.relative_to(top.resolve())
        except (ValueError, OSError):
            continue
        return os.path.normpath(os.path.join(os.path.relpath(top, REPO), inside))
    return None


def is_model_folder(path):
    """A folder holding a model or a tokenizer (config.json, tokenizer files): not training data."""
    return any((Path(path) / name).is_file() for name in ("config.json", "tokenizer_config.json", "tokenizer.json"))


def run_summary(folder):
    """A trained folder's summary.json (what it was trained on, how long), or {} when it has none."""
    import json

    try:
        summary = json.loads((Path(folder) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def trained_on(summary, most=3):
    """The data of a run's summary by file or folder name ("tinyshakespeare.txt", "the 7 books in oz/"), never a
    server path."""
    data = summary.get("data") or []
    names = [source_name(Path(str(d))) for d in (data if isinstance(data, list) else [data])]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def source_name(path):
    if not path.is_dir():
        return path.name
    books = len([b for b in path.glob("*") if b.suffix.lower() == ".txt"])
    return f"the {books} books in {path.name}/" if books > 1 else f"{path.name}/"


CHAT_SUFFIXES = (".jsonl",)  # a chat file for an adapter; anything else the Data picker offers is a story's book


def default_data(config, kind, uploads_key=None):
    """The Data picker's preselection for a kind of run: the first book for a story model, the first chat
    file for an adapter (a training file before an evaluation one)."""
    labels = [label for label, _ in data_choices(config, uploads_key)]
    if kind == "qlora":
        chats = [label for label in labels if label.lower().endswith(CHAT_SUFFIXES)]
        return sorted(chats, key=lambda label: "train" not in Path(label).name.lower())[:1]
    return [label for label in labels if not label.lower().endswith(CHAT_SUFFIXES)][:1]
