"""The page: three tabs (story, assistant, train) around what they share, and `main()` that serves it.

    demo = build(app_config.parse_args([]))   # a gr.Blocks; nothing is loaded yet
    main(["--port", "7860"])                  # what `python app.py` runs

The tabs (story_tab, chat_tab, train_tab) share llmb.app.common and never import each other; this
module builds them and wires them together (`watch`: the Train tab's progress fills the other tabs'
pickers). Every handler turns a problem with the user's input into a yellow warning and a status line
(common.shows_problems), so a bad value never shows a traceback and the app keeps serving. Handlers take
their inputs by name (`inputs_kwargs`), so the HTTP API is named too: `client.predict(prompt=...,
api_name="/story")`. Nothing here imports torch: the models load on the first request that needs them.
"""

import errno
import os
import secrets
import socket
import sys
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from llmb.app import chat_tab, story_tab, train_tab
from llmb.app import config as app_config
from llmb.app.common import Context, browser_key, owner_of
from llmb.app.guard import CallCheck
from llmb.app.jobs import log_tail, progress
from llmb.app.uploads import UploadTypes
from llmb.errors import UserError
from llmb.fileio import atomic_path

QUEUE_SIZE = 64  # Gradio's one queue for every event; story and answer calls wait in their own lanes instead
CACHE_CLEANUP = (3600, 3600)  # Gradio's upload cache: every hour, delete files older than an hour


def browser_secret(config):
    """The key that encrypts what the page keeps in each browser (its chat history, its uploads key).

    Gradio picks a new random one at every start, so after a restart every browser would forget its chat
    and lose sight of its uploads. This one is kept in the work folder, readable by its owner only (the
    app never serves that folder); where it cannot be kept, a random one for this run, and a note.
    """
    path = config.work_dir / "browser-secret"
    try:
        if len(secret := path.read_text().strip()) >= 32:
            return secret
    except OSError:
        pass
    secret = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(secret)
            os.chmod(tmp, 0o600)
    except OSError as e:
        print(f"llmb: could not keep {path} ({e.strerror or e}); browsers will forget their chat when the app "
              "restarts", flush=True)
    return secret


def build(config):
    """The whole page; the tabs live in story_tab, chat_tab and train_tab."""
    ctx = Context(config)
    with gr.Blocks(title="llmb: LLM basics", delete_cache=CACHE_CLEANUP) as demo:
        ctx.demo = demo
        gr.Markdown("# llmb: LLM basics\nA story model trained from scratch, an assistant fine-tuned with QLoRA, "
                    "and the training itself, in one page.")
        # outside the tabs: a hidden tab's components are not mounted when the page loads
        secret = browser_secret(config)
        saved = gr.BrowserState({"chat": [], "base": []}, storage_key="llmb-chat", secret=secret)
        picks = gr.BrowserState({}, storage_key="llmb-chat-picks", secret=secret)  # its Base, Adapter, Compare
        sampling = gr.BrowserState({}, storage_key="llmb-chat-sampling", secret=secret)  # its temperature, ...
        # names the browser's own uploads folder
        uploads_key = gr.BrowserState("", storage_key="llmb-uploads", secret=secret)
        with gr.Tabs():
            story = story_tab.build(ctx, uploads_key)
            chat = chat_tab.build(ctx, saved, picks, uploads_key, sampling)
            train = train_tab.build(ctx, uploads_key)
        watch(ctx, demo, train, story, chat, uploads_key)

        def own_uploads(key, request: gr.Request):
            return train_tab.own_uploads(ctx, key, request)

        demo.load(own_uploads, uploads_key, [uploads_key, train["data"]], api_visibility="private",
                  concurrency_limit=None)
        demo.load(lambda s: (s.get("chat", []), s.get("base", [])), saved, [chat["chatbot"], chat["base_bot"]],
                  api_visibility="private", concurrency_limit=None)
    return demo


def watch(ctx, demo, train, story_picker, chat, uploads_key):
    """Every 2 s (and on page load): the job's progress into the Train tab (`train`: its widgets), and new
    checkpoints and adapters into the Story and Assistant tabs' pickers (`chat`: the Assistant tab's widgets).
    Each browser (`uploads_key`) sees its own job and runs, and on a Space nothing of another's."""
    held = gr.State({"story": None, "adapters": None, "download": None})  # what the pickers and the download hold

    def refresh(request: gr.Request, known, base, adapter, uploads_key=None):
        viewer = owner_of(uploads_key, request)
        latest = ctx.jobs.current()
        mine = train_tab.own_job(ctx.config, latest, viewer)
        job = train_tab.public_job(ctx.config, mine, browser_key(uploads_key, request))
        stories = app_config.story_choices(ctx.config, viewer)
        adapters = app_config.adapter_choices(ctx.config, viewer)
        exported = mine["config"]["out"] if mine and mine["kind"] == "export-gguf" and mine.get("summary") else None
        shown = {train["status"]: train_tab.job_status(ctx.config, latest, viewer),
                 train["command"]: gr.update(value=job["command"], visible=True) if job else gr.update(visible=False),
                 train["plot"]: train_tab.loss_frame(job),
                 train["sample"]: progress(job).sample if job and job["kind"] in train_tab.KINDS else "",
                 train["log"]: app_config.public_text(ctx.config, log_tail(job)) if job else "",
                 held: {"story": stories, "adapters": adapters, "download": exported},
                 chat["model_status"]: chat_tab.model_status(ctx, base, adapter, viewer),
                 train["export_row"]: gr.update(visible=len(adapters) > 1)}  # an adapter beside "none"
        if known["story"] != stories:
            shown[story_picker] = gr.update(choices=stories)
        if known["adapters"] != adapters:
            shown[chat["adapter"]] = gr.update(choices=adapters)
            names = [name for _, name in adapters if name]
            last = train_tab.export_source(mine)
            shown[train["export_adapter"]] = gr.update(choices=names, value=Path(last[1]).name if last and
                                                       Path(last[1]).name in names else names[0] if names else None)
        if known.get("download") != exported:  # the file is sent once, not every 2 s
            shown[train["download"]] = gr.update(value=exported, visible=exported is not None)
        return shown

    outputs = [train["status"], train["command"], train["plot"], train["sample"], train["log"], story_picker,
               chat["adapter"], held, chat["model_status"], train["export_row"], train["download"],
               train["export_adapter"]]
    inputs = {"known": held, "base": chat["base"], "adapter": chat["adapter"], "uploads_key": uploads_key}
    train["timer"].tick(refresh, inputs_kwargs=inputs, outputs=outputs, api_name="train_progress",
                        concurrency_limit=None, show_progress="hidden")
    demo.load(refresh, inputs_kwargs=inputs, outputs=outputs, api_visibility="private", concurrency_limit=None,
              show_progress="hidden")


def upload_limit(config):
    """Gradio's size limit for every upload: what one browser may keep (50 MB by default); with training
    off nothing needs uploads, so its upload route refuses everything (it would otherwise store any file)."""
    return f"{config.uploads_mb}mb" if config.allow_training else 1


def open_port(host, port):
    """`port` if the app can serve on it (for 0: a free one the system picks); UserError if it is in use.
    Gradio's own check says it with a 12-line traceback, and cannot serve on port 0."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gradio's server: a port just freed is free
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} is in use (another app, or llmb already running); give another with "
                                "--port, or --port 0 for any free one") from None
            return port  # another problem (an IPv6 host, say): Gradio's start says it
        return probe.getsockname()[1]


def main(argv=None):
    config = app_config.parse_args(argv)
    try:
        config.port = open_port(config.host, config.port)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build(config)
    demo.queue(default_concurrency_limit=2, max_size=QUEUE_SIZE)
    # only what a page must show is served: the exported GGUF files (never uploads, job state or checkpoints;
    # the LR finder's plot goes into the page itself)
    config.exports.mkdir(parents=True, exist_ok=True)
    demo.launch(server_name=config.host, server_port=config.port, share=config.share, show_error=False,
                allowed_paths=[str(config.exports)], max_file_size=upload_limit(config),
                app_kwargs={"middleware": [Middleware(CallCheck, demo=demo, max_turns=config.max_turns),
                                           Middleware(UploadTypes, max_files=config.uploads_files,  # its upload
                                                      max_mb=config.uploads_mb)]})  # route takes any type and size
