"""The models behind the app: loaded on first use, kept in memory, described in one status line.

    stories = StoryModels(device="auto")
    for text, note in continue_story(stories, "checkpoints/oz-story", "Dorothy", check_story_settings(...)):
        ...

    assistant = Assistant(base="microsoft/phi-2", adapter="checkpoints/phi2-guanaco")
    engine = assistant.engine(base, adapter)   # loads on first call (minutes for Phi-2), then the same one
    answer = engine.stream(history, "Hello")   # iterate for the pieces; answer.stats afterwards

Loading is lazy so the app answers HTTP at once; a model that fails to load keeps the reason
(shown in its tab) and is tried again on the next use. Nothing here knows about Gradio.
"""

import threading
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

from llmb.assistant.config import ChatSampling
from llmb.assistant.engine import message_text
from llmb.errors import UserError
from llmb.settings import app_values, check, specs
from llmb.story.config import StorySampling

MAX_PROMPT_CHARS = 20_000
MAX_HISTORY_CHARS = 100_000  # the whole conversation an API client may send back


def load_error(e):
    """One line for the status of a model that failed to load."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return f"out of memory ({type(e).__name__}); try --cpu-int8, a GPU, or close other programs"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"


# --------------------------------------------------------------------------------- settings

def check_prompt(prompt, what="prompt"):
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise UserError(f"the {what} must be text (got {type(prompt).__name__})")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"the {what} has {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    return prompt


def sliders(cls):
    """{name: (label, lowest, highest, kind)} of the sampling settings of `cls` (StorySampling, ChatSampling), in
    the ranges the app offers: the tabs draw their sliders from these (page.slider), and the handlers hold the
    values an API call sends to the same ranges, refusing one with the setting's name."""
    return {s.name: (s.label, *s.app_range, s.kind) for s in specs(cls) if s.app_range}


STORY_SAMPLING, CHAT_SAMPLING = sliders(StorySampling), sliders(ChatSampling)
STORY_DEFAULTS, CHAT_DEFAULTS = StorySampling(), ChatSampling()


def check_story_settings(max_new, temperature, top_k, top_p, seed):
    """generate()'s keywords from the Story tab's values (by the API's names); top-k 0 is off."""
    s = app_values(StorySampling, dict(max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                       seed=seed))
    return asdict(check(StorySampling(**s | {"top_k": s["top_k"] or None})))


def check_chat_settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed):
    """ChatEngine.stream's keywords from the Assistant tab's values."""
    return asdict(check(ChatSampling(**app_values(ChatSampling, dict(
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens, seed=seed)))))


def plain_messages(history, what="chat history"):
    """Chat history as [{"role", "content": str}], checked: the shape Gradio sends, each turn and the
    whole history within the limits (an API client can send anything)."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise UserError(f"the {what} must be a list of messages (got {type(history).__name__})")
    messages = []
    for item in history:
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            raise UserError(f"the {what} must hold {{'role': 'user' or 'assistant', 'content': text}} messages")
        content = message_text(item.get("content"))
        messages.append({"role": item["role"], "content": check_prompt(content if isinstance(content, str)
                                                                       else str(content or ""), f"{what} message")})
    total = sum(len(m["content"]) for m in messages)
    if total > MAX_HISTORY_CHARS:
        raise UserError(f"the {what} has {total:,} characters; the limit is {MAX_HISTORY_CHARS:,}: press Clear")
    return messages


# -------------------------------------------------------------------------------- story model

class StoryModels:
    """Story checkpoints loaded on first use; reloaded when training rewrites the weights."""

    def __init__(self, device="auto", keep=4):
        self.device_wanted, self.keep = device, keep
        self.loaded = OrderedDict()  # resolved path -> (weights mtime, model, tokenizer, meta)
        self.errors = {}  # resolved path -> why it failed to load
        self.lock = threading.Lock()

    def get(self, path):
        """(model, tokenizer, meta) of the checkpoint in `path`; UserError if it cannot be loaded."""
        from llmb.story.checkpoint import WEIGHTS, load_for_sampling

        if not path:
            raise UserError("no story checkpoint: train one in the Train tab, or start the app with --story-ckpt DIR")
        key = Path(path).resolve()
        with self.lock:
            mtime = (key / WEIGHTS).stat().st_mtime if (key / WEIGHTS).is_file() else None
            if key in self.loaded and self.loaded[key][0] == mtime:
                self.loaded.move_to_end(key)
                return self.loaded[key][1:]
            try:  # the CLI's `sample` loader: int8 linear layers on a CPU
                model, tokenizer, meta = load_for_sampling(key, self.device_wanted)
            except Exception as e:  # bad checkpoint, no memory, ...: the tab says why
                self.errors[key] = load_error(e)
                raise UserError(f"could not load the story model: {self.errors[key]}") from None
            self.errors.pop(key, None)
            self.loaded[key] = (mtime, model, tokenizer, meta)
            while len(self.loaded) > self.keep:
                self.loaded.popitem(last=False)
            return model, tokenizer, meta

    def status(self, path):
        if not path:
            return "**Story model:** none found. Train one in the Train tab, or pass `--story-ckpt DIR`."
        key = Path(path).resolve()
        name = Path(path).name
        if key in self.errors:
            return f"**Story model `{name}`:** failed to load: {self.errors[key]}"
        if key not in self.loaded:
            return f"**Story model `{name}`:** not loaded yet (loads on first Generate, a second or two)"
        _, model, tokenizer, meta = self.loaded[key]
        device = next(model.parameters()).device.type
        weights = "int8 linear layers" if meta["precision"] == "int8" else "fp32"
        return (f"**Story model `{name}`:** loaded on {device}, {weights}, {meta['num_params'] / 1e6:.2f}M parameters, "
                f"{tokenizer.kind} tokenizer, step {meta.get('step', '?')}")


def continue_story(models, path, prompt, settings, cancel=None):
    """Yield (prompt + continuation so far, note) as the model writes. `cancel` (an Event) stops it."""
    from llmb.story.sample import generate

    prompt = check_prompt(prompt)
    model, tokenizer, _ = models.get(path)
    notes = []
    unknown = tokenizer.unknown(prompt)
    if unknown:
        notes.append(f"dropped characters the model never saw: {''.join(unknown)[:80]!r}")
    if not prompt.strip():
        notes.append("empty prompt: the model starts from a blank line")
    note = "; ".join(notes)
    text = prompt
    yield text, note
    should_stop = cancel.is_set if cancel is not None else None
    for piece in generate(model, tokenizer, prompt, should_stop=should_stop, **settings):
        text += piece
        yield text, note


# ---------------------------------------------------------------------------------- assistant

class Assistant:
    """Chat engines (a base model + an optional adapter), loaded on first use; each request names its own.

    Every session picks its base and adapter; the request carries them, so one visitor's choice
    never changes another's model. `keep` engines stay loaded (one by default: Phi-2 is 5 GB).
    `fallbacks`: with `--adapter auto`, the adapters to try in turn when the newest will not load.
    `precision`: as `llmb chat --precision` (auto: fp32 on a CPU; int8: int8 linear layers, CPU only).
    """

    def __init__(self, base, adapter=None, device="auto", precision="auto", fallbacks=(), keep=1):
        self.base, self.adapter, self.device, self.precision, self.keep = str(base), adapter, device, precision, keep
        self.fallbacks = [str(a) for a in fallbacks]
        self.engines = OrderedDict()  # (base, adapter or "") -> ChatEngine
        self.errors, self.replaced, self.notes = {}, {}, []  # key -> why it failed; adapter -> the one used
        self.loading = {}  # key -> when loading began
        self.lock = threading.Lock()

    def key(self, base=None, adapter=None):
        adapter = str(adapter or "")
        return str(base or self.base), self.replaced.get(adapter, adapter)

    def loaded(self, base=None, adapter=None):
        return self.key(base, adapter) in self.engines

    def engine(self, base=None, adapter=None):
        """The ChatEngine for (base, adapter), loading it first if needed; UserError (why) if it cannot load."""
        with self.lock:
            key = self.key(base, adapter)
            if key not in self.engines:
                key = self._load(key)
            self.engines.move_to_end(key)
            return self.engines[key]

    def _load(self, key):
        """Load `key`; an auto-picked adapter that fails gives way to the next one that loads."""
        base, adapter = key
        tries = [adapter] + ([a for a in self.fallbacks if a != adapter] + [""] if adapter in self.fallbacks else [])
        first_error = None
        for candidate in tries:
            try:
                engine = self._build((base, candidate))
            except UserError as e:
                first_error = first_error or e
                continue
            if candidate != adapter:
                self.replaced[adapter] = candidate
                self.notes.append(f"adapter `{Path(adapter).name}` did not load ({self.errors[key]}); "
                                  f"using {f'`{Path(candidate).name}`' if candidate else 'the base model alone'}")
            self.engines[(base, candidate)] = engine
            while len(self.engines) > self.keep:
                self.engines.popitem(last=False)
            return base, candidate
        raise first_error

    def _build(self, key):
        from llmb.assistant.engine import ChatEngine

        base, adapter = key
        self.loading[key], self.errors[key] = time.time(), None
        try:
            return ChatEngine(base, adapter=adapter or None, device=self.device, precision=self.precision)
        except Exception as e:  # offline, out of memory, a bad adapter: shown in the tab
            self.errors[key] = load_error(e)
            raise UserError(f"could not load the assistant: {self.errors[key]}") from None
        finally:
            self.loading.pop(key, None)

    def loading_message(self, base=None):
        base = str(base or self.base)
        return "loading Phi-2 (the first time downloads ~5 GB)…" if base == "microsoft/phi-2" else \
            f"loading `{Path(base).name if Path(base).is_dir() else base}`…"

    def name(self, key):
        base, adapter = key
        shown = Path(base).name if Path(base).is_dir() else base
        return f"`{shown}` " + (f"+ adapter `{Path(adapter).name}`" if adapter else "(base model alone: no adapter)")

    def status(self, base=None, adapter=None):
        key = self.key(base, adapter)
        notes = "".join(f" ({note})" for note in self.notes if Path(key[1]).name in note)
        if key in self.loading:
            return f"**Assistant {self.name(key)}:** {self.loading_message(key[0])} {time.time() - self.loading[key]:.0f} s"
        if self.errors.get(key):
            return f"**Assistant {self.name(key)}:** failed to load: {self.errors[key]}"
        if key not in self.engines:
            return f"**Assistant {self.name(key)}:** not loaded yet (loads on the first message){notes}"
        return f"**Assistant {self.name(key)}:** loaded on {self.engines[key].describe()}{notes}"


# ------------------------------------------------------------------------------------ stopping

class StopFlags:
    """One stop flag per browser session, so Stop in one tab stops only that tab's generation."""

    def __init__(self):
        self.flags, self.lock = {}, threading.Lock()

    def new(self, session):
        flag = threading.Event()
        with self.lock:
            self.flags[session] = flag
        return flag

    def stop(self, session):
        with self.lock:
            flag = self.flags.get(session)
        if flag is not None:
            flag.set()
        return flag is not None

    def done(self, session, flag):
        with self.lock:
            if self.flags.get(session) is flag:
                del self.flags[session]
