"""The page: three tabs (story, assistant, train) around what they share, and `main()` that serves it.

    demo = build(app_config.parse_args([]))   # a gr.Blocks; nothing is loaded yet
    main(["--port", "7860"])                  # what `python app.py` runs

Every handler turns a problem with the user's input (UserError) into a yellow warning and a
status line, so a bad value never shows a traceback and the app keeps serving. Handlers take
their inputs by name (`inputs_kwargs`), so the HTTP API is named too: `client.predict(prompt=...,
api_name="/story")`. Nothing here imports torch: the models load on the first request that needs them.
"""

import threading
import traceback
from contextlib import contextmanager

import gradio as gr

from llmb.app import config as app_config
from llmb.app.jobs import JobManager
from llmb.app.models import Assistant, StopFlags, StoryModels
from llmb.app.uploads import MAX_UPLOAD
from llmb.errors import UserError

QUEUE_SIZE = 64  # waiting calls, all events together; one session holds at most one per kind (Busy)
CACHE_CLEANUP = (3600, 3600)  # Gradio's upload cache: every hour, delete files older than an hour


class Busy:
    """At most one running call per session and kind (story, answer): a client cannot queue up work
    for everyone else; its extra calls end at once with a message."""

    def __init__(self):
        self.active, self.lock = set(), threading.Lock()

    @contextmanager
    def hold(self, session, what):
        with self.lock:
            if (session, what) in self.active:
                raise UserError(f"your previous {what} is still running: wait for it, or press Stop")
            self.active.add((session, what))
        try:
            yield
        finally:
            with self.lock:
                self.active.discard((session, what))


class Context:
    """What every tab shares: the settings, the models, the job manager, the stop flags."""

    def __init__(self, config):
        adapters = [str(a) for a in app_config.default_adapters(config)]
        self.config = config
        self.stories = StoryModels(config.device)
        self.assistant = Assistant(config.base, adapters[0] if adapters else None, config.device, config.cpu_int8,
                                   fallbacks=adapters if config.adapter == "auto" else ())
        self.jobs = JobManager(config.job_state)
        self.stop_flags = StopFlags()
        self.busy = Busy()


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
    """Show a problem as a yellow toast; return it for the status line."""
    gr.Warning(str(error))
    return f"⚠️ {error}"


def unexpected(error):
    """A bug, not the user's fault: full traceback in the server log, one line in the page."""
    traceback.print_exc()
    return warn(f"unexpected error ({type(error).__name__}); the app keeps running")


def session_of(request):
    return getattr(request, "session_hash", None) or "no-session"


def known_path(path, choices, what):
    """`path` if it is one of the picker's choices (fresh scan): the API cannot load arbitrary folders."""
    if path is not None and not isinstance(path, str):
        raise UserError(f"the {what} must be given as text (got {type(path).__name__})")
    if path and path not in [value for _, value in choices]:
        raise UserError(f"{path} is not one of the {what} found under the checkpoints folder")
    return path


def build(config):
    """The whole page; the tabs live in story_tab, chat_tab and train_tab."""
    from llmb.app import chat_tab, story_tab, train_tab

    ctx = Context(config)
    with gr.Blocks(title="llmb: LLM basics", delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown("# llmb: LLM basics\nA story model trained from scratch, an assistant fine-tuned with QLoRA, "
                    "and the training itself, in one page.")
        # outside the tabs: a hidden tab's components are not mounted when the page loads
        saved = gr.BrowserState({"chat": [], "base": []}, storage_key="llmb-chat")
        with gr.Tabs():
            story = story_tab.build(ctx)
            chat = chat_tab.build(ctx, saved)
            train = train_tab.build(ctx)
        train_tab.watch(ctx, demo, train, story, chat)
        demo.load(lambda s: (s.get("chat", []), s.get("base", [])), saved, [chat["chatbot"], chat["base_bot"]],
                  api_visibility="private", concurrency_limit=None)
    return demo


def upload_limit(config):
    """Gradio's size limit for every upload: 50 MB for training data; with training off nothing needs
    uploads, so its upload route refuses everything (it would otherwise store any file of any size)."""
    return MAX_UPLOAD if config.allow_training else 1


def main(argv=None):
    config = app_config.parse_args(argv)
    demo = build(config)
    demo.queue(default_concurrency_limit=2, max_size=QUEUE_SIZE)
    # only what a page must show is served: the LR-finder plots (never uploads or job state)
    config.plots.mkdir(parents=True, exist_ok=True)
    demo.launch(server_name=config.host, server_port=config.port, share=config.share, show_error=False,
                allowed_paths=[str(config.plots)], max_file_size=upload_limit(config))
