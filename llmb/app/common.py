"""What the tabs share: the `Context` (settings, models, jobs, lanes), the lanes that bound each kind of call,
and the helpers every handler uses (warnings, the status line of a bug, the pickers' names, the sliders).

The tabs import this module, never the page nor each other: the page (llmb.app.page) builds the tabs and wires
them together. Every handler turns a problem with the user's input (UserError) into a yellow warning and a
status line (`shows_problems`), so a bad value never shows a traceback and the app keeps serving.
"""

import functools
import hashlib
import inspect
import re
import threading
import time
import traceback
from contextlib import closing, contextmanager

import gradio as gr

from llmb.app import config as app_config
from llmb.app.jobs import JobManager
from llmb.app.models import Assistant, StopFlags, StoryModels
from llmb.app.uploads import upload_key
from llmb.errors import UserError, clip

LANES = {"story": (4, 8), "answer": (2, 4)}  # calls of a kind that run at once, and that may wait for them
MAX_WAIT_S = 15.0  # a waiting call that has no place after this long ends with "busy", as one with no place in line
MAX_UNREAD, UNREAD_S = 100, 2.0  # a stream left this many messages behind for this long: nobody reads it
WAIT_POLL_S = 0.5  # a waiting call looks for its turn (and can be closed) this often


class Lane:
    """The calls of one kind (story, answer): `running` at once, `waiting` more in line for `max_wait` seconds at
    most, one per session.

    Gradio has a single queue for all events, and no limit per event: a call beyond a lane's places
    ends at once with a message, so one kind flooded (by one client, or many session ids) never fills
    the queue that the other kinds and the Train tab share; and a call in line behind long ones ends
    with the same message after `max_wait` seconds, never waits for them all.
    """

    def __init__(self, what, running, waiting, max_wait=MAX_WAIT_S):
        self.what, self.running, self.waiting, self.max_wait = what, running, waiting, max_wait
        self.line, self.active = [], set()  # sessions waiting (first in line first), sessions running
        self.changed = threading.Condition()

    @contextmanager
    def place(self, session):
        """Hold a place in the lane for `session` (waiting until `turn` says run); UserError if there is none."""
        with self.changed:
            if session in self.active or session in self.line:
                raise UserError(f"your previous {self.what} is still running: wait for it, or press Stop")
            if len(self.active) + len(self.line) >= self.running + self.waiting:
                raise UserError(f"busy: all {self.running + self.waiting} places for a {self.what} are taken; "
                                "try again in a moment")
            self.line.append(session)
        try:
            yield
        finally:
            with self.changed:
                if session in self.line:
                    self.line.remove(session)
                self.active.discard(session)
                self.changed.notify_all()

    def turn(self, session):
        """Wait for `session`'s turn to run, yielding how many calls are ahead every WAIT_POLL_S seconds
        (a yield is where Gradio can close a call whose client left); UserError after `max_wait` seconds."""
        since = time.monotonic()
        while (ahead := self._take(session)) is not None:
            if time.monotonic() - since > self.max_wait:
                raise UserError(f"busy: no place for a {self.what} came free in {self.max_wait:g} s ({ahead} ahead "
                                "of you); try again in a moment")
            yield ahead

    def _take(self, session):
        """Start `session` if it is first in line and a place runs free within WAIT_POLL_S; else how many
        calls wait ahead of it."""
        with self.changed:
            if not self._free(session):
                self.changed.wait(WAIT_POLL_S)
            if not self._free(session):
                return self.line.index(session)
            self.line.remove(session)
            self.active.add(session)
            return None

    def _free(self, session):
        return self.line[0] == session and len(self.active) < self.running


class Reader:
    """Does anyone read a call's stream? Gradio closes a call whose client disconnected at its next
    yield, but a client that never opens the stream, or stops reading it, stays "connected": its
    messages pile up in Gradio's queue for the session (`pending_messages_per_session`, not public
    API; there is none for this). Past MAX_UNREAD messages for UNREAD_S seconds the call is abandoned."""

    def __init__(self, demo, session_hash):
        queue = getattr(demo, "_queue", None)
        self.messages = getattr(queue, "pending_messages_per_session", {})
        self.session, self.behind_since = session_hash, None

    def gone(self):
        pending = self.messages.get(self.session)
        if pending is None or pending.qsize() < MAX_UNREAD:
            self.behind_since = None
            return False
        self.behind_since = self.behind_since or time.monotonic()
        return time.monotonic() - self.behind_since > UNREAD_S


def in_lane(ctx, request, kind, steps, waiting):
    """Run a call of `kind` in its lane: yield `waiting(ahead)` while it waits, then what `steps(stop_flag)`
    yields; stop at the next step once nobody reads the stream (the model stops at its next token)."""
    session = call_key(request, kind)
    reader = Reader(ctx.demo, session_of(request))
    with ctx.lanes[kind].place(session):
        for ahead in ctx.lanes[kind].turn(session):
            if reader.gone():
                return
            yield waiting(ahead)
        flag, count = ctx.stop_flags.new(session), 0
        try:
            with closing(steps(flag)) as outputs:
                for count, output in enumerate(outputs):
                    if reader.gone():
                        print(f"llmb: stopped a {kind} that nobody reads (at step {count})", flush=True)
                        return
                    yield output
        except GeneratorExit:  # Gradio closes a call whose client disconnected (or cancelled it)
            print(f"llmb: stopped a {kind} whose client left (at step {count})", flush=True)
            raise
        finally:
            ctx.stop_flags.done(session, flag)


class Context:
    """What every tab shares: the settings, the models, the job manager, the stop flags."""

    def __init__(self, config):
        adapters = [str(a) for a in app_config.default_adapters(config)]
        self.config = config
        self.stories = StoryModels(config.device)
        self.assistant = Assistant(config.base, adapters[0] if adapters else None, config.device,
                                   "int8" if config.cpu_int8 else "auto",
                                   fallbacks=adapters if config.adapter == "auto" else ())
        self.jobs = JobManager(config.job_state, config.run_owners)
        self.stop_flags = StopFlags()
        self.lanes = {kind: Lane(kind, *places) for kind, places in LANES.items()}
        self.demo = None  # the page, once built (Reader looks at its queue)


def slider(table, name, value, **kwargs):
    """The slider of one sampling setting of `table` (app.models.STORY_SAMPLING / CHAT_SAMPLING).

    Its value reaches the handler as sent: the handler checks it against the same table and names the
    setting when it refuses, where Gradio's own check would answer an API client with an unnamed error
    and a traceback in the log.
    """
    label, low, high, kind = table[name]
    widget = gr.Slider(low, high, value=value, step=1 if kind is int else 0.05, label=label, **kwargs)
    widget.preprocess = lambda payload: payload  # an instance attribute: a subclass would make Gradio write a .pyi
    return widget


def warn(error):
    """Show a problem as a yellow toast; return it for the status line (Markdown)."""
    gr.Warning(plain(error))
    return f"⚠️ {error}"


def plain(text):
    """Markdown `code` as quoted plain text: a toast shows its text as it is."""
    return re.sub(r"`([^`]*)`", r"'\1'", str(text))


def while_running(triggers, buttons, fn, **event):
    """Run the stream `fn` on `triggers` with `buttons` disabled from the press until it ends, fails or is
    stopped, so a second press cannot queue a second call; returns the stream's event."""
    def buttons_on(on):
        return lambda: {button: gr.update(interactive=on) for button in buttons}

    quick = dict(queue=False, show_progress="hidden", api_visibility="private")
    stream = gr.on(triggers, buttons_on(False), None, buttons, **quick).then(fn, **event)
    stream.then(buttons_on(True), None, buttons, **quick)
    return stream


def unexpected(error):
    """A bug, not the user's fault: full traceback in the server log, one line in the page."""
    traceback.print_exc()
    return warn(f"unexpected error ({type(error).__name__}); the app keeps running")


def session_of(request):
    return getattr(request, "session_hash", None) or "no-session"


def browser_key(uploads_key, request):
    """The caller's uploads key: the one its browser keeps (gr.BrowserState), else its session's (an API
    client that sends none is one browser for all the calls of its session)."""
    return upload_key(uploads_key, getattr(request, "session_hash", None))


def owner_of(uploads_key, request):
    """Who a job, and all it writes, belongs to: the caller's browser (`browser_key`), by a hash of its key
    (kept in the job's state and the runs' owners file; never the key itself)."""
    return hashlib.sha256(f"browser {browser_key(uploads_key, request)}".encode()).hexdigest()[:16]


def call_key(request, kind):
    """A session's calls of one kind (story, answer): their lane place and their stop flag."""
    return f"{session_of(request)}/{kind}"


def known_path(name, known, what):
    """The server path of the picker value `name` in `known` ({name: path}, a fresh scan); UserError if it
    is not there: the API takes the names the pickers offer and cannot load arbitrary folders."""
    if name is not None and not isinstance(name, str):
        raise UserError(f"the {what} must be given as text (got {type(name).__name__})")
    if not name:
        return name
    if name not in known:
        offered = ", ".join(n for n in known if n)[:300] or "none"
        raise UserError(f"{clip(name)} is not one of the {what} found (the names offered: {offered})")
    return known[name]


def shows_problems(outputs, refuse=warn):
    """Decorate a handler (a function or a stream) so that a problem ends in its outputs, never in a traceback.

    `outputs(line, inputs, theirs)` gives the handler's outputs ({component: value}) showing the status line
    `line`; `inputs` are the handler's arguments by name; `theirs` says whose the problem is: the user's input
    (a UserError, shown by `refuse`: a toast and the line) or the app's (`unexpected`: the traceback in the log).
    """
    def decorate(handler):
        def problem(error, args, kwargs):  # called inside `except`, where `unexpected` finds the traceback
            theirs = isinstance(error, UserError)
            line = refuse(error) if theirs else unexpected(error)
            return outputs(line, named_arguments(handler, args, kwargs), theirs)

        if inspect.isgeneratorfunction(handler):  # Gradio streams a generator's outputs: so must the wrapper
            @functools.wraps(handler)
            def stream(*args, **kwargs):
                try:
                    yield from handler(*args, **kwargs)
                except Exception as error:
                    yield problem(error, args, kwargs)
            return stream

        @functools.wraps(handler)  # Gradio reads the handler's parameters (gr.Request, names) through it
        def call(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Exception as error:
                return problem(error, args, kwargs)
        return call
    return decorate


def named_arguments(function, args, kwargs):
    """{name: value} of a call's arguments, those gathered by a `**values` parameter among them."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        gathered = bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
        named |= value if gathered else {name: value}
    return named
