"""The models behind the app: loaded on first use, kept in memory, described in one status line.

    stories = StoryModels(device="auto")
    for text, note in continue_story(stories, "checkpoints/oz-story", "Dorothy", check_story_settings(...)):
        ...

    assistant = Assistant(base="microsoft/phi-2", adapter="checkpoints/phi2-guanaco")
    assistant.engine()   # loads on first call (minutes for Phi-2 the first time), then returns the same one

Loading is lazy so the app answers HTTP at once; a model that fails to load keeps the reason
(shown in its tab) and is tried again on the next use. Nothing here knows about Gradio.
"""

import threading
import time
from collections import OrderedDict
from pathlib import Path

from llmb.device import resolve_device
from llmb.errors import UserError

MAX_PROMPT_CHARS = 20_000
MAX_STORY_CHARS = 5_000
MAX_CHAT_TOKENS = 2_048


def load_error(e):
    """One line for the status of a model that failed to load."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return f"out of memory ({type(e).__name__}); try --cpu-int8, a GPU, or close other programs"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"


# --------------------------------------------------------------------------------- settings

def number(label, value, low, high, kind=float, optional=False):
    """`value` as a number in [low, high]; UserError (naming the field) otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise UserError(f"{label} is empty; give a number between {low:g} and {high:g}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{label} must be a number (got {str(value)[:30]!r})") from None
    if x != x or not low <= x <= high:
        raise UserError(f"{label} must be between {low:g} and {high:g} (got {x:g})")
    if kind is int and x != int(x):
        raise UserError(f"{label} must be a whole number (got {x:g})")
    return kind(x)


def check_prompt(prompt, what="prompt"):
    prompt = prompt or ""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"the {what} has {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    return prompt


def check_story_settings(max_new, temperature, top_k, top_p, seed):
    return dict(
        max_new_tokens=number("max new characters", max_new, 1, MAX_STORY_CHARS, int),
        temperature=number("temperature", temperature, 0, 5),
        top_k=number("top-k", top_k, 0, 100_000, int) or None,  # 0 = off
        top_p=number("top-p", top_p, 0.01, 1),
        seed=number("seed", seed, 0, 2**31 - 1, int, optional=True),
    )


def check_chat_settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed):
    return dict(
        temperature=number("temperature", temperature, 0, 5),
        top_p=number("top-p", top_p, 0.01, 1),
        top_k=number("top-k", top_k, 0, 100_000, int),
        repetition_penalty=number("repetition penalty", repetition_penalty, 1, 3),
        max_new_tokens=number("max new tokens", max_new_tokens, 1, MAX_CHAT_TOKENS, int),
        seed=number("seed", seed, 0, 2**31 - 1, int, optional=True),
    )


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
        from llmb.story.checkpoint import WEIGHTS, load_checkpoint

        if not path:
            raise UserError("no story checkpoint: train one in the Train tab, or start the app with --story-ckpt DIR")
        key = Path(path).resolve()
        with self.lock:
            mtime = (key / WEIGHTS).stat().st_mtime if (key / WEIGHTS).is_file() else None
            if key in self.loaded and self.loaded[key][0] == mtime:
                self.loaded.move_to_end(key)
                return self.loaded[key][1:]
            try:
                model, tokenizer, meta = load_checkpoint(key, resolve_device(self.device_wanted))
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
        param = next(model.parameters())
        return (f"**Story model `{name}`:** loaded on {param.device.type}, {str(param.dtype).replace('torch.', '')}, "
                f"{model.num_params() / 1e6:.2f}M parameters, {tokenizer.kind} tokenizer, step {meta.get('step', '?')}")


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
    """One ChatEngine (base model + optional adapter), loaded on first use."""

    def __init__(self, base, adapter=None, device="auto", cpu_int8=False):
        self.base, self.adapter, self.device, self.cpu_int8 = base, adapter, device, cpu_int8
        self._engine = None
        self.error = None
        self.loading_since = None
        self.lock = threading.Lock()

    @property
    def loaded(self):
        return self._engine is not None

    def engine(self):
        """The ChatEngine, loading it first if needed; UserError (with the reason) if it cannot load."""
        from llmb.assistant.engine import ChatEngine

        with self.lock:
            if self._engine is None:
                self.loading_since, self.error = time.time(), None
                try:
                    self._engine = ChatEngine(self.base, adapter=str(self.adapter) if self.adapter else None,
                                              device=self.device, cpu_int8=self.cpu_int8)
                except Exception as e:  # offline, out of memory, a bad adapter: shown in the tab
                    self.error = load_error(e)
                    raise UserError(f"could not load the assistant: {self.error}") from None
                finally:
                    self.loading_since = None
            return self._engine

    def use_adapter(self, adapter):
        """Switch to another adapter (or None for the base alone); the model reloads on next use."""
        adapter = Path(adapter) if adapter else None
        with self.lock:
            if adapter != self.adapter:
                self.adapter, self._engine, self.error = adapter, None, None

    def loading_message(self):
        what = "Phi-2" if self.base == "microsoft/phi-2" else f"`{self.base}`"
        return f"loading {what} (the first time downloads ~5 GB)…" if self.base == "microsoft/phi-2" \
            else f"loading {what}…"

    def name(self):
        adapter = f"+ adapter `{Path(self.adapter).name}`" if self.adapter else "(base model alone: no adapter)"
        return f"`{self.base}` {adapter}"

    def status(self):
        if self.loading_since is not None:
            return f"**Assistant {self.name()}:** {self.loading_message()} {time.time() - self.loading_since:.0f} s"
        if self.error:
            return f"**Assistant {self.name()}:** failed to load: {self.error}"
        if self._engine is None:
            return f"**Assistant {self.name()}:** not loaded yet (loads on the first message)"
        model = self._engine.model
        quant = ", int8 linear layers" if self.cpu_int8 else ""
        return (f"**Assistant {self.name()}:** loaded on {self._engine.device}, "
                f"{str(model.dtype).replace('torch.', '')}{quant}")


def plain_messages(history):
    """Chat history as [{"role", "content": str}] whatever shape Gradio sent it in."""
    from llmb.assistant.engine import history_to_turns

    return [{"role": t.role, "content": t.content} for t in history_to_turns(history)]


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
