"""llmb in a browser: continue a story, chat with the assistant, train your own models.

    python app.py                    # then open http://127.0.0.1:7860
    python app.py --help             # flags; each has an environment variable (for Spaces)

This file is only the page layout and thin handlers. The work is done by the library:
llmb.app_models (loading the models, sampling settings), llmb.jobs (training in a
subprocess) and llmb.app_config (flags, folders, what may be read and written).

Every handler turns a problem with the user's input (llmb.errors.UserError) into a yellow
warning and a status line, so a bad value never shows a traceback and the app keeps serving.
"""

import os
import sys
import time
import traceback

from llmb.app import config as app_config

for _key, _value in app_config.environment().items():  # before gradio: no analytics; HF cache on /data
    os.environ.setdefault(_key, _value)

import gradio as gr  # noqa: E402

from llmb.app.config import find_adapters, find_story_checkpoints  # noqa: E402
from llmb.app.jobs import JobManager, JobSpec, log_tail, lr_find, progress, save_upload  # noqa: E402
from llmb.app.models import (  # noqa: E402
    Assistant,
    StopFlags,
    StoryModels,
    check_chat_settings,
    check_prompt,
    check_story_settings,
    continue_story,
    plain_messages,
)
from llmb.assistant.config import TrainConfig as QLoRAConfig  # noqa: E402
from llmb.errors import UserError  # noqa: E402
from llmb.story.train import TrainConfig as StoryConfig  # noqa: E402


class Context:
    """What every tab shares: the settings, the models, the job manager, the stop flags."""

    def __init__(self, config):
        self.config = config
        self.stories = StoryModels(config.device)
        self.assistant = Assistant(config.base, app_config.default_adapter(config), config.device, config.cpu_int8)
        self.jobs = JobManager(config.job_state)
        self.stop_flags = StopFlags()


def warn(error):
    """Show a problem as a yellow toast; return it for the status line."""
    gr.Warning(str(error))
    return f"⚠️ {error}"


def unexpected(error):
    """A bug, not the user's fault: full traceback in the server log, one line in the page."""
    traceback.print_exc()
    return warn(f"unexpected error ({type(error).__name__}: {error}); the app keeps running")


def session_of(request):
    return getattr(request, "session_hash", None) or "no-session"


def story_choices(config):
    return [(p.name, str(p)) for p in find_story_checkpoints(config)]


def adapter_choices(config):
    return [("none: base model alone", "")] + [(p.name, str(p)) for p in find_adapters(config)]


def known_path(path, choices, what):
    """`path` if it is one of the picker's choices (fresh scan): the API cannot load arbitrary folders."""
    if path and path not in [value for _, value in choices]:
        raise UserError(f"{path} is not one of the {what} found under the checkpoints folder")
    return path


# ------------------------------------------------------------------------------------ story

def story_tab(ctx):
    choices = story_choices(ctx.config)
    first = choices[0][1] if choices else None
    with gr.Tab("Continue the story", id="story"):
        gr.Markdown("A small character-level GPT trained from scratch on the Oz books continues your text, "
                    "one character at a time.")
        model_status = gr.Markdown(ctx.stories.status(first), elem_id="story-model-status")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", value="Dorothy looked at the Scarecrow and said", lines=3)
                output = gr.Textbox(label="Story", lines=12, interactive=False, elem_id="story-output")
                note = gr.Markdown(elem_id="story-note")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="story-generate")
                    stop = gr.Button("Stop", elem_id="story-stop")
            with gr.Column(scale=1):
                ckpt = gr.Dropdown(choices, value=first, label="Checkpoint", allow_custom_value=True,
                                   info="story checkpoints under checkpoints/", elem_id="story-ckpt")
                max_new = gr.Slider(1, 2000, value=400, step=1, label="Max new characters")
                temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="Temperature", info="0 = always the likeliest")
                top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k", info="0 = off")
                top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
                seed = gr.Textbox("", label="Seed", info="empty = random")  # a Number cannot be empty

    def write(path, text, max_new, temperature, top_k, top_p, seed, request: gr.Request):
        flag = ctx.stop_flags.new(session_of(request))
        try:
            path = known_path(path, story_choices(ctx.config), "story checkpoints")
            settings = check_story_settings(max_new, temperature, top_k, top_p, seed)
            check_prompt(text)
            yield gr.skip(), "loading the model…", ctx.stories.status(path)
            story, extra = text, ""
            for story, extra in continue_story(ctx.stories, path, text, settings, flag):
                yield story, f"writing… {extra}", ctx.stories.status(path)
            done = "stopped" if flag.is_set() else f"done: {len(story) - len(text or '')} new characters"
            yield story, f"{done}. {extra}".strip(), ctx.stories.status(path)
        except UserError as e:
            yield gr.skip(), warn(e), ctx.stories.status(path)
        except Exception as e:
            yield gr.skip(), unexpected(e), ctx.stories.status(path)
        finally:
            ctx.stop_flags.done(session_of(request), flag)

    def stop_writing(request: gr.Request):
        ctx.stop_flags.stop(session_of(request))

    generate.click(write, [ckpt, prompt, max_new, temperature, top_k, top_p, seed], [output, note, model_status],
                   api_name="story", concurrency_limit=4, concurrency_id="story")
    stop.click(stop_writing, None, None, api_name="story_stop", concurrency_limit=None, queue=False)
    ckpt.change(lambda path: ctx.stories.status(path), ckpt, model_status, api_visibility="private",
                concurrency_limit=None)
    return ckpt


# ------------------------------------------------------------------------------------ chat

def chat_tab(ctx, saved):
    """`saved`: the chat history in the browser's localStorage (gr.BrowserState), restored on page load."""
    adapters = adapter_choices(ctx.config)
    current = str(ctx.assistant.adapter) if ctx.assistant.adapter else ""
    with gr.Tab("Assistant", id="chat"):
        gr.Markdown("Phi-2 fine-tuned with QLoRA on openassistant-guanaco. Turn on **compare** to see what the base "
                    "model says to the same conversation.")
        model_status = gr.Markdown(ctx.assistant.status(), elem_id="chat-model-status")
        with gr.Row():
            chatbot = gr.Chatbot(label="Assistant (fine-tuned)", height=420, elem_id="chatbot")
            base_bot = gr.Chatbot(label="Base Phi-2 (no adapter)", height=420, visible=False, elem_id="chatbot-base")
        message = gr.Textbox(label="Message", placeholder="Ask something…", lines=2, elem_id="chat-message")
        status = gr.Markdown(elem_id="chat-status")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="chat-send")
            stop = gr.Button("Stop", elem_id="chat-stop")
            regenerate = gr.Button("Regenerate", elem_id="chat-regenerate")
            clear = gr.Button("Clear", elem_id="chat-clear")
        with gr.Accordion("Sampling settings", open=False):
            with gr.Row():
                adapter = gr.Dropdown(adapters, value=current, label="Adapter", allow_custom_value=True,
                                      info="switching reloads the model")
                compare = gr.Checkbox(False, label="Compare with base Phi-2", elem_id="chat-compare")
            system = gr.Textbox(label="System preamble (optional)", lines=2)
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
                top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k", info="0 = off")
                penalty = gr.Slider(1, 2, value=1.1, step=0.05, label="Repetition penalty")
                max_new = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens", elem_id="chat-max-new")
                seed = gr.Textbox("", label="Seed", info="empty = random")  # a Number cannot be empty

    sampling = [temperature, top_p, top_k, penalty, max_new, seed]

    def answer(engine, history, text, system, settings, flag, use_adapter):
        """Yield the history with the answer growing at its end."""
        reply = {"role": "assistant", "content": ""}
        asked = history + [{"role": "user", "content": text}]
        for piece in engine.stream(history, text, system=system or None, cancel=flag, use_adapter=use_adapter,
                                   **settings):
            reply["content"] += piece
            yield asked + [dict(reply)]
        yield asked + [dict(reply)]

    def respond(text, history, base_history, system, compare, temperature, top_p, top_k, penalty, max_new, seed,
                request: gr.Request):
        """Outputs: chat, base chat, message box, status, model status, saved history."""
        flag = ctx.stop_flags.new(session_of(request))
        try:
            history, base_history = plain_messages(history), plain_messages(base_history)
            settings = check_chat_settings(temperature, top_p, top_k, penalty, max_new, seed)
            text = check_prompt(text, "message").strip()
            if not text:
                raise UserError("type a message first")
            if not ctx.assistant.loaded:
                asked = history + [{"role": "user", "content": text}]
                yield asked, base_history, "", ctx.assistant.loading_message(), ctx.assistant.status(), gr.skip()
            engine = ctx.assistant.engine()
            for history in answer(engine, history, text, system, settings, flag, use_adapter=True):
                yield history, base_history, "", "answering…", gr.skip(), gr.skip()
            stats = engine.last_stats
            if compare and not flag.is_set():
                for base_history in answer(engine, base_history, text, system, settings, flag, use_adapter=False):
                    yield history, base_history, "", "base model answering…", gr.skip(), gr.skip()
            done = "stopped" if flag.is_set() else \
                f"{stats['new_tokens']} tokens, {stats['tokens_per_sec']:.1f} tokens/s" + \
                (f", {stats['dropped_turns']} old turns left out to fit the context" if stats["dropped_turns"] else "")
            if compare and not engine.has_adapter:
                done += " (no adapter loaded: both answers come from the base model)"
            yield history, base_history, "", done, ctx.assistant.status(), {"chat": history, "base": base_history}
        except UserError as e:
            yield gr.skip(), gr.skip(), gr.skip(), warn(e), ctx.assistant.status(), gr.skip()
        except Exception as e:
            yield gr.skip(), gr.skip(), gr.skip(), unexpected(e), ctx.assistant.status(), gr.skip()
        finally:
            ctx.stop_flags.done(session_of(request), flag)

    def regenerate_last(history, base_history, system, compare, temperature, top_p, top_k, penalty, max_new, seed,
                        request: gr.Request):
        values = (temperature, top_p, top_k, penalty, max_new, seed)
        history, base_history = plain_messages(history), plain_messages(base_history)
        users = [i for i, m in enumerate(history) if m["role"] == "user"]
        if not users:
            yield gr.skip(), gr.skip(), gr.skip(), warn("nothing to regenerate yet"), gr.skip(), gr.skip()
            return
        text = history[users[-1]]["content"]
        base_users = [i for i, m in enumerate(base_history) if m["role"] == "user"]
        base_history = base_history[:base_users[-1]] if base_users else base_history
        yield from respond(text, history[:users[-1]], base_history, system, compare, *values, request=request)

    def stop_answer(request: gr.Request):
        ctx.stop_flags.stop(session_of(request))

    def switch_adapter(path):
        try:
            ctx.assistant.use_adapter(known_path(path, adapter_choices(ctx.config), "adapters"))
            return ctx.assistant.status()
        except UserError as e:
            return warn(e)

    inputs = [message, chatbot, base_bot, system, compare, *sampling]
    outputs = [chatbot, base_bot, message, status, model_status, saved]
    send.click(respond, inputs, outputs, api_name="chat", concurrency_limit=2, concurrency_id="chat")
    message.submit(respond, inputs, outputs, api_visibility="private", concurrency_limit=2, concurrency_id="chat")
    regenerate.click(regenerate_last, inputs[1:], outputs, api_name="chat_regenerate", concurrency_limit=2,
                     concurrency_id="chat")
    stop.click(stop_answer, None, None, api_name="chat_stop", concurrency_limit=None, queue=False)
    clear.click(lambda: ([], [], "", {"chat": [], "base": []}), None, [chatbot, base_bot, status, saved],
                api_name="chat_clear", concurrency_limit=None)
    compare.change(lambda on: gr.update(visible=on), compare, base_bot, api_visibility="private", concurrency_limit=None)
    adapter.change(switch_adapter, adapter, model_status, api_name="chat_adapter", concurrency_limit=1)
    return chatbot, base_bot, adapter, model_status


# ------------------------------------------------------------------------------------ train

# the trainers' own defaults (the form only adds a step limit: a story run needs one)
_story, _qlora = StoryConfig(), QLoRAConfig()
STORY_DEFAULTS = dict(n_layer=_story.n_layer, n_head=_story.n_head, n_embd=_story.n_embd, block_size=_story.block_size,
                      batch_size=_story.batch_size, dropout=_story.dropout, lr=f"{_story.lr:g}",
                      max_iters=2000, max_time=None, eval_interval=_story.eval_interval)
QLORA_DEFAULTS = dict(max_steps=_qlora.max_steps, max_seq_len=_qlora.max_seq_len, lr=_qlora.lr,
                      batch_size=_qlora.batch_size, lora_r=_qlora.lora_r, eval_steps=_qlora.eval_steps,
                      save_steps=_qlora.save_steps)


def job_markdown(job):
    """The job's status in a few lines: state, step/total, speed, ETA."""
    if job is None:
        return "No training job yet."
    p = progress(job)
    state = {"running": "running", "stopping": "stopping (saving…)", "finished": "finished", "stopped": "stopped",
             "failed": "failed"}[job["status"]]
    lines = [f"**{job['name']}** ({job['kind']} model): **{state}**"]
    if p.step:
        total = f"/{p.total}" if p.total else ""
        speed = f", {p.tokens_per_sec:,.0f} tokens/s" if p.tokens_per_sec else ""
        eta = f", ETA {p.eta_s / 60:.1f} min" if p.eta_s is not None and job["status"] == "running" else ""
        lines.append(f"step {p.step}{total}{speed}{eta}")
    elif job["status"] == "running":
        lines.append("preparing data and model…")
    if job.get("error"):
        lines.append(f"error: {job['error']}")
    if job["status"] in ("finished", "stopped") and job.get("summary"):
        lines.append(f"saved in `{job['out']}`; it is now in the "
                     + ("story checkpoint picker." if job["kind"] == "story" else "assistant's adapter picker."))
    return "\n\n".join(lines)


def whole_number(name, label):
    """A Number field for a story setting, with its default and an id the browser test can find."""
    return gr.Number(STORY_DEFAULTS[name], label=label, precision=0, elem_id=f"train-{name.replace('_', '-')}")


def loss_frame(job):
    import pandas as pd

    rows = progress(job).losses if job else []
    frame = pd.DataFrame(rows, columns=["step", "loss", "split"])
    return frame.astype({"step": "int64", "loss": "float64", "split": "str"})  # numbers, so the axes are numeric


def train_tab(ctx):
    config = ctx.config
    allowed = config.allow_training
    data_choices = app_config.data_choices(config)
    with gr.Tab("Train", id="train"):
        if not allowed:
            gr.Markdown("### Training is off on this public Space\nIt would let every visitor use the Space's "
                        "hardware. Duplicate the Space, or set `LLMB_ALLOW_TRAINING=1`, to train.",
                        elem_id="train-off")
        with gr.Row():
            kind = gr.Radio([("Story model (from scratch)", "story"), ("QLoRA adapter for the assistant", "qlora")],
                            value="story", label="What to train", elem_id="train-kind")
            name = gr.Textbox(label="Run name", placeholder="empty = story-<date>-<time>",
                              info="a new folder under the checkpoints folder", elem_id="train-name")
        with gr.Row():
            data = gr.Dropdown(data_choices, multiselect=True, label="Data", allow_custom_value=True,
                               value=[data_choices[0][1]] if data_choices else [],
                               info=".txt books for a story model, .jsonl chats for an adapter", elem_id="train-data")
            upload = gr.File(file_count="multiple", file_types=[".txt", ".jsonl"], label="Upload data",
                             interactive=allowed, elem_id="train-upload")
        with gr.Group(visible=True) as story_group:
            with gr.Row():
                n_layer = whole_number("n_layer", "Layers")
                n_head = whole_number("n_head", "Heads")
                n_embd = whole_number("n_embd", "Embedding width")
                block_size = whole_number("block_size", "Context (characters)")
                batch_size = whole_number("batch_size", "Batch size")
            with gr.Row():
                dropout = gr.Number(STORY_DEFAULTS["dropout"], label="Dropout", elem_id="train-dropout")
                lr = gr.Textbox(STORY_DEFAULTS["lr"], label="Learning rate", info="a number, or auto", elem_id="train-lr")
                max_iters = whole_number("max_iters", "Max steps")
                max_time = gr.Textbox("", label="Max time (s)", info="empty = no limit", elem_id="train-max-time")
                eval_interval = whole_number("eval_interval", "Evaluate every")
            with gr.Row():
                lr_steps = gr.Number(100, label="LR finder steps", precision=0, scale=1)
                with gr.Column(scale=3):
                    lr_button = gr.Button("Run the LR finder", interactive=allowed, size="md", elem_id="train-lr-find")
                    lr_result = gr.Markdown(elem_id="train-lr-result")
            lr_plot = gr.Image(label="LR finder", type="filepath", visible=False, height=300)
        with gr.Group(visible=False) as qlora_group:
            with gr.Row():
                q_steps = gr.Number(QLORA_DEFAULTS["max_steps"], label="Max steps", precision=0)
                q_seq = gr.Number(QLORA_DEFAULTS["max_seq_len"], label="Max sequence length", precision=0)
                q_lr = gr.Number(QLORA_DEFAULTS["lr"], label="Learning rate")
                q_batch = gr.Number(QLORA_DEFAULTS["batch_size"], label="Batch size", precision=0)
                q_rank = gr.Number(QLORA_DEFAULTS["lora_r"], label="LoRA rank", precision=0)
                q_eval = gr.Number(QLORA_DEFAULTS["eval_steps"], label="Evaluate every", precision=0)
                q_save = gr.Number(QLORA_DEFAULTS["save_steps"], label="Save every", precision=0)
            gr.Markdown(f"Base model: `{config.base}`. On a CPU this is slow with Phi-2; a GPU is recommended.")
        with gr.Row():
            start = gr.Button("Start training", variant="primary", interactive=allowed, elem_id="train-start")
            stop = gr.Button("Stop (saves)", variant="stop", interactive=allowed, elem_id="train-stop")
        message = gr.Markdown(elem_id="train-message")
        command = gr.Code(label="Equivalent command", language="shell", interactive=False, lines=1, wrap_lines=True,
                          elem_id="train-command")
        status = gr.Markdown("No training job yet.", elem_id="train-status")
        with gr.Row():
            plot = gr.LinePlot(loss_frame(None), x="step", y="loss", color="split", title="Loss (nats/token)",
                               height=300, elem_id="train-plot")
            sample = gr.Textbox(label="Latest sample", lines=10, interactive=False, elem_id="train-sample")
        with gr.Accordion("Log", open=False):
            log = gr.Textbox(lines=12, interactive=False, show_label=False, elem_id="train-log")
        timer = gr.Timer(2.0)

    story_params = [n_layer, n_head, n_embd, block_size, batch_size, dropout, lr, max_iters, max_time, eval_interval]
    qlora_params = [q_steps, q_seq, q_lr, q_batch, q_rank, q_eval, q_save]

    def check_allowed():
        if not allowed:
            raise UserError("training is off on this public Space (set LLMB_ALLOW_TRAINING=1 to allow it)")

    def data_paths(values):
        return [str(app_config.inside(v, config.allowed_data_roots)) for v in values or []]

    def spec_of(kind, run_name, values, params):
        run_name = app_config.check_name(run_name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
        if kind == "story":
            settings = dict(zip(STORY_DEFAULTS, params[:len(story_params)]))
        elif kind == "qlora":
            settings = dict(zip(["max_steps", "max_seq_len", "lr", "batch_size", "lora_r", "eval_steps", "save_steps"],
                                params[len(story_params):]))
            settings |= {"base": config.base, "device": config.device, "quant": qlora_quant(config.device)}
        else:
            raise UserError(f"unknown job type {kind!r}")
        return JobSpec(kind, data_paths(values), str(config.checkpoints / run_name), settings)

    def start_job(kind, run_name, values, *params):
        try:
            check_allowed()
            job = ctx.jobs.start(spec_of(kind, run_name, values, params))
            return f"started `{job['name']}`", job["command"], job_markdown(job)
        except UserError as e:
            return warn(e), gr.skip(), gr.skip()
        except Exception as e:
            return unexpected(e), gr.skip(), gr.skip()

    def stop_job():
        job = ctx.jobs.stop()
        if job is None:
            return warn("no training job is running"), gr.skip()
        return "stop requested: the run finishes its step, saves and exits", job_markdown(job)

    def find_lr(values, steps, *params):
        try:
            check_allowed()
            settings = dict(zip(STORY_DEFAULTS, params))
            out = config.work_dir / "lr-find" / time.strftime("%Y%m%d-%H%M%S")
            suggested, png = lr_find(data_paths(values), str(out), settings, steps)
            return f"suggested learning rate: **{suggested:.2e}** (filled in above)", f"{suggested:.2e}", \
                gr.update(value=str(png), visible=True)
        except UserError as e:
            return warn(e), gr.skip(), gr.skip()
        except Exception as e:
            return unexpected(e), gr.skip(), gr.skip()

    def add_uploads(files, selected):
        try:
            check_allowed()
        except UserError as e:
            return warn(e), gr.skip()
        saved, problems = [], []
        for f in files or []:
            try:
                saved.append(str(save_upload(f, config.uploads)))
            except UserError as e:
                problems.append(str(e))
        message = (f"uploaded {len(saved)} file(s)" if saved else "") + \
                  ("; " if saved and problems else "") + (warn("; ".join(problems)) if problems else "")
        selected = list(dict.fromkeys([*(selected or []), *saved]))
        return message, gr.update(choices=app_config.data_choices(config), value=selected)

    def show_kind(kind):
        return gr.update(visible=kind == "story"), gr.update(visible=kind == "qlora")

    start.click(start_job, [kind, name, data, *story_params, *qlora_params], [message, command, status],
                api_name="train_start", concurrency_limit=1, concurrency_id="train")
    stop.click(stop_job, None, [message, status], api_name="train_stop", concurrency_limit=None)
    lr_button.click(find_lr, [data, lr_steps, *story_params[:6]], [lr_result, lr, lr_plot], api_name="lr_find",
                    concurrency_limit=1, concurrency_id="lr_find")
    upload.upload(add_uploads, [upload, data], [message, data], api_name="train_upload", concurrency_limit=1)
    kind.change(show_kind, kind, [story_group, qlora_group], api_visibility="private", concurrency_limit=None)
    return timer, status, command, plot, sample, log


def qlora_quant(device):
    """4-bit (QLoRA proper) on a GPU; bitsandbytes needs CUDA, so full precision on a CPU."""
    from llmb.device import resolve_device

    return "4bit" if resolve_device(device) == "cuda" else "none"


# ------------------------------------------------------------------------------------ page

def build(config):
    ctx = Context(config)
    with gr.Blocks(title="llmb: LLM basics") as demo:
        gr.Markdown("# llmb: LLM basics\nA story model trained from scratch, an assistant fine-tuned with QLoRA, "
                    "and the training itself, in one page.")
        # outside the tabs: a hidden tab's components are not mounted when the page loads
        saved = gr.BrowserState({"chat": [], "base": []}, storage_key="llmb-chat")
        with gr.Tabs():
            story_ckpt = story_tab(ctx)
            chatbot, base_bot, adapter, chat_status = chat_tab(ctx, saved)
            timer, status, command, plot, sample, log = train_tab(ctx)
        pickers = gr.State({"story": None, "adapters": None})

        def watch(known):
            """Every 2 s: the job's progress, and new checkpoints/adapters into the pickers."""
            job = ctx.jobs.current()
            stories, adapters = story_choices(config), adapter_choices(config)
            seen = {"story": stories, "adapters": adapters}
            story_update = gr.update(choices=stories) if known["story"] != stories else gr.skip()
            adapter_update = gr.update(choices=adapters) if known["adapters"] != adapters else gr.skip()
            return (job_markdown(job), job["command"] if job else "", loss_frame(job),
                    progress(job).sample if job else "", log_tail(job) if job else "",
                    story_update, adapter_update, seen, ctx.assistant.status())

        timer.tick(watch, pickers, [status, command, plot, sample, log, story_ckpt, adapter, pickers, chat_status],
                   api_name="train_progress", concurrency_limit=None, show_progress="hidden")
        demo.load(watch, pickers, [status, command, plot, sample, log, story_ckpt, adapter, pickers, chat_status],
                  api_visibility="private", concurrency_limit=None)
        demo.load(lambda s: (s.get("chat", []), s.get("base", [])), saved, [chatbot, base_bot],
                  api_visibility="private", concurrency_limit=None)
    return demo


def main(argv=None):
    config = app_config.parse_args(argv)
    demo = build(config)
    demo.queue(default_concurrency_limit=2, max_size=64)
    demo.launch(server_name=config.host, server_port=config.port, share=config.share, show_error=False,
                allowed_paths=[str(config.work_dir)])


if __name__ == "__main__":
    sys.exit(main())
