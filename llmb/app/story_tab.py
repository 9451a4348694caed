"""The "Continue the story" tab: a story checkpoint continues the user's text, streamed.

API: `/story` (checkpoint, prompt, max_new, temperature, top_k, top_p, seed; by name) and
`/story_stop`. One call per session at a time, a few at once in all (page.LANES: more wait, and beyond
those a call ends at once with "busy"); Stop stops only the caller's own generation.
"""

import gradio as gr

from llmb.app.config import by_name, find_story_checkpoints, run_summary, trained_on
from llmb.app.models import STORY_DEFAULTS, STORY_SAMPLING, check_prompt, check_story_settings, continue_story
from llmb.app.page import call_key, in_lane, known_path, slider, unexpected, warn, while_running
from llmb.errors import UserError


def checkpoints(config):
    """{name: folder} of the story checkpoints; the picker offers the names."""
    return by_name(find_story_checkpoints(config))


def choices(config):
    return list(checkpoints(config))


def model_status(ctx, path):
    """The picker's status line; a typed path that is not a checkpoint says so (not "not loaded yet")."""
    try:
        return ctx.stories.status(known_path(path, checkpoints(ctx.config), "story checkpoints"))
    except UserError as e:
        return f"**Story model:** {e}"


def intro(ctx, name):
    """What the picked checkpoint is, and what it was trained on (its own summary.json)."""
    try:
        path = known_path(name, checkpoints(ctx.config), "story checkpoints")
    except UserError:
        path = None
    if not path:
        return "A small GPT trained from scratch continues your text. Pick a story checkpoint, or train one."
    summary = run_summary(path)
    unit = "character" if summary.get("tokenizer", "char") == "char" else "subword token"
    data = trained_on(summary)
    return (f"The story model `{name}`, a small GPT trained from scratch{f' on {data}' if data else ''}, "
            f"continues your text one {unit} at a time.")


def stream(ctx, checkpoint, prompt, settings, flag):
    """Yield (story so far, note, model status) as the model writes."""
    path = known_path(checkpoint, checkpoints(ctx.config), "story checkpoints")
    settings = check_story_settings(**settings)
    check_prompt(prompt)
    yield gr.skip(), "loading the model…", ctx.stories.status(path)
    story, extra = prompt, ""
    for story, extra in continue_story(ctx.stories, path, prompt, settings, flag):
        yield story, f"writing… {extra}", ctx.stories.status(path)
    done = "stopped" if flag.is_set() else f"done: {len(story) - len(prompt or '')} new characters"
    yield story, f"{done}. {extra}".strip(), ctx.stories.status(path)


def build(ctx):
    """The tab's components and events; returns the checkpoint picker (the Train tab refreshes it)."""
    found = checkpoints(ctx.config)
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
                max_new = slider(STORY_SAMPLING, "max_new_tokens", STORY_DEFAULTS.max_new_tokens,
                                 elem_id="story-max-new")
                temperature = slider(STORY_SAMPLING, "temperature", STORY_DEFAULTS.temperature,
                                     info="0 = always the likeliest")
                top_k = slider(STORY_SAMPLING, "top_k", 0, info="0 = off")  # the default, None, is off
                top_p = slider(STORY_SAMPLING, "top_p", STORY_DEFAULTS.top_p)
                seed = gr.Textbox("", label="Seed", info="empty = random")  # a Number cannot be empty

    def write(request: gr.Request, checkpoint, prompt, **settings):
        """Outputs: the story so far, a note, the model's status."""
        def waiting(ahead):
            return gr.skip(), f"waiting for a free place ({ahead} ahead of you)…", gr.skip()

        try:
            yield from in_lane(ctx, request, "story", lambda flag: stream(ctx, checkpoint, prompt, settings, flag),
                               waiting)
        except UserError as e:
            yield gr.skip(), warn(e), model_status(ctx, checkpoint)
        except Exception as e:
            yield gr.skip(), unexpected(e), gr.skip()

    def stop_writing(request: gr.Request):
        ctx.stop_flags.stop(call_key(request, "story"))

    while_running([generate.click], [generate], write,
                  inputs_kwargs=dict(checkpoint=ckpt, prompt=prompt, max_new=max_new, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed),
                  outputs=[output, note, status], api_name="story",
                  concurrency_limit=None)  # its own lane (page.LANES) bounds it
    stop.click(stop_writing, None, None, api_name="story_stop", concurrency_limit=None, queue=False)
    ckpt.change(lambda path: (model_status(ctx, path), intro(ctx, path)), ckpt, [status, about],
                api_visibility="private", concurrency_limit=None)
    return ckpt
