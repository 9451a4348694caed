"""The "Continue the story" tab: a story checkpoint continues the user's text, streamed.

API: `/story` (checkpoint, prompt, max_new, temperature, top_k, top_p, seed, uploads_key; by name) and
`/story_stop`. One call per session at a time, a few at once in all (common.LANES: more wait, for a while at
most, and beyond those a call ends at once with "busy"); Stop stops only the caller's own generation. On a
Space a checkpoint trained in the app is offered to the browser that trained it only (`uploads_key`).
"""

from functools import partial

import gradio as gr

from llmb.app.common import call_key, in_lane, known_path, owner_of, shows_problems, slider, while_running
from llmb.app.config import run_summary, story_checkpoints, trained_on
from llmb.app.models import STORY_DEFAULTS, STORY_SAMPLING, check_prompt, check_story_settings, continue_story
from llmb.errors import UserError


def model_status(ctx, path, viewer=None):
    """The picker's status line; a typed path that is not a checkpoint says so (not "not loaded yet").
    `viewer`: who asks (common.owner_of), for the checkpoints that are theirs to use."""
    try:
        return ctx.stories.status(known_path(path, story_checkpoints(ctx.config, viewer), "story checkpoints"))
    except UserError as e:
        return f"**Story model:** {e}"


def intro(ctx, name, viewer=None):
    """What the picked checkpoint is, and what it was trained on (its own summary.json)."""
    try:
        path = known_path(name, story_checkpoints(ctx.config, viewer), "story checkpoints")
    except UserError:
        path = None
    if not path:
        return "A small GPT trained from scratch continues your text. Pick a story checkpoint, or train one."
    summary = run_summary(path)
    unit = "character" if summary.get("tokenizer", "char") == "char" else "subword token"
    data = trained_on(summary)
    return (f"The story model `{name}`, a small GPT trained from scratch{f' on {data}' if data else ''}, "
            f"continues your text one {unit} at a time.")


def stream(ctx, shown, checkpoint, prompt, settings, viewer, flag):
    """Yield the outputs as the model writes: the story so far, a note, the model's status (`shown`: those widgets).
    `viewer`: who asks (common.owner_of), for the checkpoints that are theirs to use."""
    output, note, status = shown
    path = known_path(checkpoint, story_checkpoints(ctx.config, viewer), "story checkpoints")
    settings = check_story_settings(**settings)
    check_prompt(prompt)
    yield {note: "loading the model…", status: ctx.stories.status(path)}
    story, extra = prompt, ""
    for story, extra in continue_story(ctx.stories, path, prompt, settings, flag):
        yield {output: story, note: f"writing… {extra}", status: ctx.stories.status(path)}
    done = "stopped" if flag.is_set() else f"done: {len(story) - len(prompt or '')} new characters"
    yield {output: story, note: f"{done}. {extra}".strip(), status: ctx.stories.status(path)}


def sampling_sliders():
    """{API parameter name: widget} of the sampling settings, starting where `llmb sample` does."""
    return {"max_new": slider(STORY_SAMPLING, "max_new_tokens", STORY_DEFAULTS.max_new_tokens,
                              elem_id="story-max-new"),
            "temperature": slider(STORY_SAMPLING, "temperature", STORY_DEFAULTS.temperature,
                                  info="0 = always the likeliest"),
            "top_k": slider(STORY_SAMPLING, "top_k", 0, info="0 = off"),  # the default, None, is off
            "top_p": slider(STORY_SAMPLING, "top_p", STORY_DEFAULTS.top_p),
            "seed": gr.Textbox("", label="Seed", info="empty = random")}  # a Number cannot be empty


def build(ctx, uploads_key):
    """The tab's components and events; returns the checkpoint picker (the Train tab refreshes it).
    `uploads_key`: the browser's (gr.BrowserState), which says whose trained checkpoints it may use."""
    found = story_checkpoints(ctx.config)
    first = next(iter(found), None)
    with gr.Tab("Continue the story", id="story"):
        about = gr.Markdown(intro(ctx, first), elem_id="story-intro")
        status = gr.Markdown(ctx.stories.status(found.get(first)), elem_id="story-model-status")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", value="Dorothy looked at the Scarecrow and said", lines=3)
                output = gr.Textbox(label="Story", lines=12, interactive=False, elem_id="story-output")
                note = gr.Markdown(elem_id="story-note")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="story-generate")
                    stop = gr.Button("Stop", elem_id="story-stop")
            with gr.Column(scale=1):
                ckpt = gr.Dropdown(list(found), value=first, label="Checkpoint", allow_custom_value=True,
                                   info="story checkpoints under checkpoints/", elem_id="story-ckpt")
                sampling = sampling_sliders()

    def problem(line, inputs, theirs):
        """The note says what went wrong; the model's status is refreshed when the input was at fault."""
        viewer = owner_of(inputs.get("uploads_key"), inputs["request"])
        return {note: line} | ({status: model_status(ctx, inputs["checkpoint"], viewer)} if theirs else {})

    @shows_problems(problem)
    def write(request: gr.Request, checkpoint, prompt, uploads_key=None, **settings):
        """Outputs: the story so far, a note, the model's status."""
        def waiting(ahead):
            return {note: f"waiting for a free place ({ahead} ahead of you)…"}

        viewer = owner_of(uploads_key, request)
        steps = partial(stream, ctx, (output, note, status), checkpoint, prompt, settings, viewer)  # steps(stop flag)
        yield from in_lane(ctx, request, "story", steps, waiting)

    def stop_writing(request: gr.Request):
        ctx.stop_flags.stop(call_key(request, "story"))

    def picked(path, uploads_key, request: gr.Request):
        viewer = owner_of(uploads_key, request)
        return model_status(ctx, path, viewer), intro(ctx, path, viewer)

    while_running([generate.click], [generate], write,
                  inputs_kwargs=dict(checkpoint=ckpt, prompt=prompt, **sampling, uploads_key=uploads_key),
                  outputs=[output, note, status], api_name="story",
                  concurrency_limit=None)  # its own lane (common.LANES) bounds it
    stop.click(stop_writing, None, None, api_name="story_stop", concurrency_limit=None, queue=False)
    ckpt.change(picked, [ckpt, uploads_key], [status, about], api_visibility="private", concurrency_limit=None)
    return ckpt
