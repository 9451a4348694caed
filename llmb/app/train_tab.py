"""The Train tab: train a story model or a QLoRA adapter in a subprocess, and watch it learn.

The form is generated from the trainers' config dataclasses (llmb.story.config, llmb.assistant.config):
every field marked `form=True` becomes a widget with the field's label, default and help (its range
in words); the values are checked by `settings.from_values` and the job runs `settings.to_argv`'s
command line. API: `/train_start` (kind, name, data, story_<setting>, qlora_<setting>, qlora_base; by
name), `/train_stop`, `/train_progress`, `/lr_find`, `/train_upload` (files, selected, uploads_key, kind).
Each kind keeps its own Data selection and defaults while the other is shown (`switch_kind`).
"""

import base64
import json
import re
import time
from pathlib import Path

import gradio as gr

from llmb.app import config as app_config
from llmb.app.common import browser_key, known_path, owner_of, shows_problems, warn
from llmb.app.jobs import CONFIGS, RUNNING, job_order, log_tail, progress
from llmb.app.uploads import forget_upload, save_upload, upload_key
from llmb.errors import UserError
from llmb.settings import specs

KINDS = ("story", "qlora")  # what the form can start (each is also its settings' prefix)
LR_FIND_TIMEOUT = 900


def form_field(spec, prefix):
    """The widget for one setting: a tick box for yes/no, a number box for a number, a text box where words
    or "empty" are allowed."""
    info = f"{spec.help}: {spec.allowed()}" + ("; empty = none" if spec.optional else "")
    common = dict(label=spec.label or spec.name, info=info, elem_id=f"train-{prefix}-{spec.name.replace('_', '-')}")
    if spec.kind is bool:
        return gr.Checkbox(spec.default, **common)
    if spec.kind in (int, float) and not spec.optional and not spec.words:
        return gr.Number(spec.default, precision=0 if spec.kind is int else None, **common)
    return gr.Textbox("" if spec.default is None else f"{spec.default:g}" if isinstance(spec.default, float)
                      else str(spec.default), **common)


def form(prefix, per_row=5):
    """{setting name: widget} for the form fields of a config class, in rows."""
    fields = [s for s in specs(CONFIGS[prefix]) if s.form]
    widgets = {}
    for start in range(0, len(fields), per_row):
        with gr.Row():
            for spec in fields[start:start + per_row]:
                widgets[spec.name] = form_field(spec, prefix)
    return widgets


def job_markdown(job):
    """The job's status in a few lines: state, step/total, speed, ETA."""
    if job is None:
        return "No training job yet."
    p = progress(job) if job["kind"] in KINDS else None
    state = {"starting": "starting", "running": "running", "stopping": "stopping (saving…)", "finished": "finished",
             "stopped": "stopped", "failed": "failed"}[job["status"]]
    what = {"lr-find": "LR finder", "export-gguf": "GGUF export"}.get(job["kind"], f"{job['kind']} model")
    lines = [f"**{job['name']}** ({what}): **{state}**"]
    if job["status"] == "stopping":
        if p and p.phase:  # the trainer's answer: "stop requested: saving step N"
            lines.append(f"{p.phase}…")
        lines.append(f"signals sent: {', '.join(job.get('signals', []))}; press Stop again to end it now "
                     "(SIGTERM, then SIGKILL: unsaved work is lost)")
    if p and p.step:
        total = f"/{p.total}" if p.total else ""
        speed = f", {p.tokens_per_sec:,.0f} tokens/s" if p.tokens_per_sec else ""
        eta = f", ETA {p.eta_s / 60:.1f} min" if p.eta_s is not None and job["status"] == "running" else ""
        loss = f", loss {p.loss:.4f}" if p.loss is not None else ""
        lines.append(f"step {p.step}{total}{speed}{eta}{loss}")
    elif job["status"] == "running" and job["kind"] == "export-gguf":
        lines.append(export_progress(job))
    elif job["status"] == "running":
        lines.append(f"{p.phase}…" if p and p.phase else "preparing data and model…")
    if job.get("error"):
        lines.append(f"error: {job['error']}")
    if job["status"] == "finished" and job["kind"] == "export-gguf" and job.get("summary"):
        lines.append(f"wrote `{job['summary']['file']}` ({job['summary']['bytes'] / 1e6:,.0f} MB): download it "
                     "below; llama.cpp, Ollama and LM Studio run it (docs/export-gguf.md)")
    elif job["status"] == "stopped" and job["kind"] == "story" and (job.get("summary") or {}).get("steps") == 0:
        lines.append("stopped before its first step: nothing was saved")
    elif job["status"] in ("finished", "stopped") and job.get("summary") and job["kind"] in KINDS:
        lines.append(f"saved in `{job['name']}`; it is now in the "
                     + ("story checkpoint picker." if job["kind"] == "story" else "assistant's adapter picker."))
    return "\n\n".join(lines)


def export_progress(job):
    """An export's progress, from its log: the merge, then the tensor bar (tqdm's last 'i/n')."""
    found = re.findall(r"write GGUF:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)", log_tail(job, lines=3))
    return f"writing tensor {found[-1][0]} of {found[-1][1]}…" if found else "loading the base and merging the adapter…"


def export_source(job):
    """(base, adapter folder) that Export to GGUF takes: the last finished QLoRA run's, or the last export's;
    None when the last job is neither."""
    if job is None or job["status"] != "finished":
        return None
    if job["kind"] == "qlora":
        return job["config"]["base"], job["out"]
    if job["kind"] == "export-gguf":
        return job["config"]["base"], job["config"]["adapter"]
    return None


def export_order(ctx, out_type, caller, adapter=None):
    """The job that writes an adapter merged into its base as <work dir>/exports/<name>-<type>/<name>-<type>.gguf:
    `adapter`, a name the Adapter picker offers the caller (common.owner_of; on a Space its own), with the base it
    was trained on; none: the last finished run's."""
    if adapter:
        folder = known_path(adapter, app_config.adapters(ctx.config, caller), "adapters")
        source = adapter_base(folder), folder
    else:
        source = export_source(own_job(ctx.config, ctx.jobs.current(), caller))
    if source is None:
        raise UserError("pick an adapter to export, or finish a LoRA run first")
    base, adapter = source
    name = Path(adapter).name
    out = ctx.config.exports / f"{name}-{out_type}" / f"{name}-{out_type}.gguf"
    if out.is_file():
        raise UserError(f"{name} is already exported as {out.name}")
    return job_order("export-gguf", {"base": base, "adapter": adapter, "out": str(out), "type": out_type})


def adapter_base(folder):
    """The base an adapter folder was trained on: its run's summary says, else its adapter_config.json."""
    base = app_config.run_summary(folder).get("base")
    if not base:
        try:
            base = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
            base = base.get("base_model_name_or_path") if isinstance(base, dict) else None
        except (OSError, ValueError):
            base = None
    if not isinstance(base, str) or not base:
        raise UserError(f"{Path(folder).name} does not say which base it was trained on (no summary.json, and no "
                        "base in adapter_config.json)")
    return base


def public_job(config, job, own_key=None):
    """The job as the page shows it: its command line and error without server paths or another browser's
    uploads key; on your own machine the viewer's own uploads (`own_key`) by their path, so the command runs as
    shown in a terminal (a Space has no terminal: there they stay `uploads/NAME`)."""
    if job is None:
        return None
    own_key = None if config.on_space else own_key
    return job | {k: app_config.public_text(config, job[k], own_key) for k in ("command", "error") if job.get(k)}


SPLITS = ("train", "val")  # the loss plot's lines


def loss_frame(job):
    import pandas as pd

    rows = progress(job).losses if job and job["kind"] != "lr-find" else []
    # The page fixes the plot's colours from the splits in the first frame it draws: an empty first frame
    # would leave the lines of a later run without a colour (invisible). A point-less row per split keeps both.
    rows = [{"step": None, "loss": None, "split": split} for split in SPLITS] + list(rows)
    frame = pd.DataFrame(rows, columns=["step", "loss", "split"])
    return frame.astype({"step": "float64", "loss": "float64", "split": "str"})  # numbers, so the axes are numeric


def qlora_quant(device):
    """4-bit (QLoRA proper) on a GPU; bitsandbytes needs CUDA, so full precision on a CPU."""
    from llmb.device import resolve_device

    return "4bit" if resolve_device(device) == "cuda" else "none"


def settings_of(values, prefix):
    """The form values of one kind: {setting: value} from {prefix_setting: value}."""
    return {k.removeprefix(prefix + "_"): v for k, v in values.items() if k.startswith(prefix + "_")}


def picked_data(config, values):
    """Server paths of the picked data: the data folders' books, and uploads of the caller's browser only."""
    return app_config.resolve_data(config, values.get("data") or [], values.get("uploads_key"))


def order_from_form(ctx, values):
    """A checked JobOrder from the Train form's named values."""
    config, kind = ctx.config, values.get("kind")
    if kind not in KINDS:
        raise UserError(f"unknown job type {kind!r}; use story or qlora")
    name = app_config.check_name(values.get("name") or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = settings_of(values, kind) | {"data": picked_data(config, values), "out": str(config.checkpoints / name),
                                            "device": config.device}
    if kind == "qlora":
        settings["base"] = known_path(settings.get("base") or app_config.base_name(config.base),
                                      app_config.bases(config), "base models")
        problem = app_config.hub_problem(config, settings["base"])  # said now, not by the trainer a minute later
        if problem:
            raise UserError(problem)
        settings["quant"] = qlora_quant(config.device)
    return job_order(kind, settings)


def placeholder(kind):
    return f"empty = {kind}-<date>-<time>"


def bad_rows(config, labels, uploads_key=None):
    """The unusable rows ('name:line: why') of the picked chat files, as the trainer would find them."""
    from llmb.assistant.data import read_rows, rows_to_conversations

    bad = []
    for label in labels:
        try:
            path = Path(picked_data(config, {"data": [label], "uploads_key": uploads_key})[0])
            bad += rows_to_conversations(read_rows(path), label)[1]
        except (UserError, OSError):  # not a chat file: the trainer says so
            pass
    return bad


def switch_kind(ctx, kind, data, kept, uploads_key=None):
    """"What to train" changed: each kind keeps its own Data selection (its default the first time), and the
    run name's placeholder follows; the first switch to an adapter picks its base and bad-rows defaults.
    Returns the updates, in the order of `build`'s outputs."""
    other = "qlora" if kind == "story" else "story"
    kept = (kept if isinstance(kept, dict) else {}) | {other: data}
    first = kind not in kept
    data = app_config.default_data(ctx.config, kind, uploads_key) if first else kept[kind]
    base, skip, note = gr.skip(), gr.skip(), ""
    if kind == "qlora" and first:
        base = app_config.train_base(ctx.config, has_gpu=lambda: qlora_quant(ctx.config.device) == "4bit")
        bad = bad_rows(ctx.config, data, uploads_key)
        skip = bool(bad)
        if bad:
            rows = "1 bad row" if len(bad) == 1 else f"{len(bad)} bad rows"
            note = f"{rows} in the picked data ({bad[0][:200]}): **Skip bad rows** is on"
    return [gr.update(visible=kind == "story")] * 2 + [gr.update(visible=kind == "qlora"), data,
                                                       gr.update(placeholder=placeholder(kind)), base, skip,
                                                       kept | {kind: data}, note]


def own_job(config, job, viewer):
    """`job` if `viewer` (common.owner_of of the caller) may see it, else None: on a Space, another browser's
    job shows nothing of itself (its name, command, log, data, losses); on your own machine, all is yours."""
    if job is None or not config.on_space or job.get("owner") == viewer:
        return job
    return None


def job_status(config, job, viewer):
    """The status line of the latest job as `viewer` sees it: all of its own job; of another browser's, that a
    job runs."""
    mine = own_job(config, job, viewer)
    if job is not None and mine is None:
        running = job["status"] in RUNNING
        return "A job started in another browser is running; one job runs at a time." if running else \
            "No training job yet."
    return job_markdown(public_job(config, mine))


def stop_for(ctx, caller):
    """Stop the running job for `caller` (common.owner_of): (message, the job or None). On a Space with training
    on, only the browser that started a job may stop it; on your own machine, any."""
    job = ctx.jobs.current()
    if job and job["status"] in RUNNING and own_job(ctx.config, job, caller) is None:
        return warn("this run was started in another browser; only that browser can stop it"), None
    job = public_job(ctx.config, ctx.jobs.stop())
    if job is None:
        return warn("no training job is running"), None
    if job["signals"][-1] == "SIGKILL":
        return "sent SIGKILL: the run ends now, without saving", job
    if job["signals"][-1] == "SIGTERM":
        return "sent SIGTERM; press Stop once more to end it at once (SIGKILL, unsaved)", job
    return "stop requested: the run drops the step in progress, saves the last one and exits", job


def check_allowed(config):
    if not config.allow_training:
        raise UserError("training is off on this public Space (set LLMB_ALLOW_TRAINING=1 to allow it)")


def run_lr_finder(ctx, values, owner):
    """Run the LR finder as the one job (Stop stops it; `owner` started it); returns (suggested lr, the plot)."""
    config = ctx.config
    check_allowed(config)
    name = f"lr-find-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = settings_of(values, "story") | {"data": picked_data(config, values),
                                               "out": str(config.work_dir / "lr-find" / name), "device": config.device}
    job = ctx.jobs.start(job_order("lr-find", settings, values.get("lr_steps")), owner)
    try:
        job = ctx.jobs.wait(LR_FIND_TIMEOUT)
    except TimeoutError:
        ctx.jobs.stop()
        raise UserError(f"the LR finder took more than {LR_FIND_TIMEOUT} s; try fewer steps or a smaller model") \
            from None
    if job["status"] != "finished":
        raise UserError(f"the LR finder {job['status']}: {job.get('error') or 'no result'}")
    return job["summary"]["suggested_lr"], Path(job["out"], "lr_find.png").read_bytes()


def inline_png(data, alt):
    """An <img> holding the PNG `data` itself: the page and the API get the picture, not a file's server path."""
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{alt}" style="max-height:300px">'


def add_uploads(ctx, files, selected, key, kind="story"):
    """Save each upload that is usable data into the browser's own folder (`key`: common.browser_key, made if
    missing); (message, Data picker update, emptied upload box, the key). The uploads replace the page's
    preselection of `kind` if the user left it as it was; else they are added to the user's own selection."""
    check_allowed(ctx.config)
    key = upload_key(key)
    preselected = app_config.default_data(ctx.config, kind if kind in KINDS else "story", key)
    if files is not None and not isinstance(files, list):
        files = [files]
    saved, problems = [], []
    for f in files or []:
        try:
            saved.append(save_upload(f, ctx.config.uploads / key, ctx.config.upload_quota))
        except UserError as e:
            problems.append(str(e))
        finally:
            forget_upload(f)
    labels = {path: label for label, path in app_config.data_choices(ctx.config, key)}
    names = [labels[str(p)] for p in saved if str(p) in labels]
    picked = [x for x in (selected or []) if isinstance(x, str)] if isinstance(selected, list) else []
    fits = ".jsonl" if kind == "qlora" else ".txt"  # an adapter trains on chats, a story model on books
    other = [n for n in names if not n.lower().endswith(fits)]
    replace = bool(names) and picked == preselected and not other
    message = ""
    if saved:
        message = f"uploaded {len(saved)} file(s)" + (f"; Data now holds it instead of the preselected "
                                                      f"{', '.join(picked)}" if replace else ", added to Data")
    if other:
        problems.append(f"{', '.join(other)} is {'story data (a .txt book)' if kind == 'qlora' else 'chat data'}: "
                        f"{'an adapter trains on .jsonl chats' if kind == 'qlora' else 'a story model reads .txt books'}")
    message += ("; " if saved and problems else "") + (warn("; ".join(problems)) if problems else "")
    value = names if replace else list(dict.fromkeys([*picked, *names]))
    return message, gr.update(choices=list(labels.values()), value=value), None, key


def own_uploads(ctx, uploads_key, request):
    """On page load: the browser's uploads key (its session's if it has none) and the Data picker's choices,
    the data folders' and this browser's uploads."""
    key = browser_key(uploads_key, request)
    return key, gr.update(choices=[label for label, _ in app_config.data_choices(ctx.config, key)])


def components(ctx):
    """The tab's widgets, by name (story_<setting> and qlora_<setting> for the generated form)."""
    allowed = ctx.config.allow_training
    if not allowed:
        gr.Markdown("### Training is off on this public Space\nIt would let every visitor use the Space's "
                    "hardware. Duplicate the Space, or set `LLMB_ALLOW_TRAINING=1`, to train.", elem_id="train-off")
    widgets = what_to_train(ctx)
    with gr.Group(visible=True) as widgets["story_group"]:
        widgets |= {f"story_{k}": w for k, w in form("story").items()}
    with gr.Column(visible=True) as widgets["lr_box"]:  # outside the Group: a button there is a grey slab
        with gr.Row(equal_height=False):
            widgets["lr_steps"] = gr.Number(100, label="LR finder steps", precision=0, scale=1,
                                            elem_id="train-lr-steps",
                                            info="batches in the sweep: a whole number from 10 to 2000")
            widgets["lr_button"] = gr.Button("Run the LR finder", interactive=allowed, size="md", scale=0,
                                             min_width=200, elem_id="train-lr-find")
            widgets["lr_result"] = gr.Markdown(elem_id="train-lr-result")
        widgets["lr_plot"] = gr.HTML(visible=False, elem_id="train-lr-plot")  # the picture itself (inline_png)
    with gr.Group(visible=False) as widgets["qlora_group"]:
        widgets["qlora_base"] = gr.Dropdown(app_config.base_choices(ctx.config),
                                            value=app_config.base_name(ctx.config.base), label="Base model",
                                            allow_custom_value=True,  # checked by the handler against a fresh scan
                                            elem_id="train-qlora-base", info="the same bases as the Assistant tab; "
                                            "on a CPU Phi-2 is slow (a GPU is recommended), the small local model "
                                            "is quick")
        widgets |= {f"qlora_{k}": w for k, w in form("qlora").items()}
    return widgets | job_widgets(allowed)


def what_to_train(ctx):
    """The kind, the run's name, the Data picker and the upload box."""
    config, widgets = ctx.config, {}
    with gr.Row():
        widgets["kind"] = gr.Radio([("Story model (from scratch)", "story"),
                                    ("QLoRA adapter for the assistant", "qlora")],
                                   value="story", label="What to train", elem_id="train-kind")
        widgets["name"] = gr.Textbox(label="Run name", placeholder=placeholder("story"),
                                     info="a new folder under the checkpoints folder", elem_id="train-name")
    with gr.Row():
        widgets["data"] = gr.Dropdown([label for label, _ in app_config.data_choices(config)], multiselect=True,
                                      label="Data", value=app_config.default_data(config, "story"),
                                      elem_id="train-data", allow_custom_value=True,
                                      info=".txt books for a story model, .jsonl chats for an adapter")
        widgets["upload"] = gr.File(file_count="multiple", file_types=[".txt", ".jsonl"], label="Upload data",
                                    interactive=config.allow_training, elem_id="train-upload")
    return widgets


def job_widgets(allowed):
    """Start and Stop, the job's message, command and status, the export, the loss plot, the sample, the log."""
    widgets = {}
    with gr.Row():
        widgets["start"] = gr.Button("Start training", variant="primary", interactive=allowed, elem_id="train-start")
        widgets["stop"] = gr.Button("Stop (saves)", variant="stop", interactive=allowed, elem_id="train-stop")
    widgets["message"] = gr.Markdown(elem_id="train-message")
    widgets["command"] = gr.Code(label="Equivalent command", language="shell", interactive=False, lines=1,
                                 wrap_lines=True, visible=False, elem_id="train-command")
    widgets["status"] = gr.Markdown("No training job yet.", elem_id="train-status")
    with gr.Row(visible=False, equal_height=True) as widgets["export_row"]:  # once there is an adapter
        widgets["export_adapter"] = gr.Dropdown([], label="Adapter to export", scale=2, elem_id="train-export-adapter",
                                                info="any adapter of the Assistant tab's picker, merged into the base "
                                                     "it was trained on")
        widgets["export_type"] = gr.Radio(["f16", "q8_0", "f32"], value="f16", label="GGUF type", scale=2,
                                          info="f16: half the size of f32, the usual choice; q8_0: 8-bit, half of f16",
                                          elem_id="train-export-type")
        widgets["export"] = gr.Button("Export to GGUF", interactive=allowed, scale=1, elem_id="train-export")
    widgets["download"] = gr.File(label="Exported GGUF", visible=False, interactive=False, elem_id="train-download")
    with gr.Row():
        widgets["plot"] = gr.LinePlot(loss_frame(None), x="step", y="loss", color="split", title="Loss (nats/token)",
                                      height=300, elem_id="train-plot")
        widgets["sample"] = gr.Textbox(label="Latest sample", lines=10, interactive=False, elem_id="train-sample")
    with gr.Accordion("Log", open=False):
        widgets["log"] = gr.Textbox(lines=12, interactive=False, show_label=False, elem_id="train-log")
    widgets["timer"] = gr.Timer(2.0)
    return widgets


def build(ctx, uploads_key):
    """`uploads_key`: the browser's own uploads folder (gr.BrowserState; uploads.upload_key). Returns the tab's
    widgets (the page's `watch` fills them with the job's progress)."""
    with gr.Tab("Train", id="train"):
        widgets = components(ctx)
    handlers = job_handlers(ctx, widgets)
    form_values = {k: w for k, w in widgets.items() if k.startswith(("story_", "qlora_")) and not k.endswith("_group")}
    data = {"data": widgets["data"], "uploads_key": uploads_key}
    job = dict(outputs=[widgets["message"], widgets["command"], widgets["status"]], concurrency_limit=1,
               concurrency_id="train")
    widgets["start"].click(handlers["start"], inputs_kwargs={"kind": widgets["kind"], "name": widgets["name"]} | data
                           | form_values, api_name="train_start", **job)
    widgets["export"].click(handlers["export"], inputs_kwargs={"uploads_key": uploads_key,
                                                               "out_type": widgets["export_type"],
                                                               "adapter": widgets["export_adapter"]},
                            api_name="train_export", **job)
    widgets["stop"].click(handlers["stop"], inputs_kwargs={"uploads_key": uploads_key}, api_name="train_stop",
                          outputs=[widgets["message"], widgets["status"]], concurrency_limit=None)
    story_form = {k: w for k, w in form_values.items() if k.startswith("story_")}
    widgets["lr_button"].click(handlers["find_lr"], inputs_kwargs=data | {"lr_steps": widgets["lr_steps"]} | story_form,
                               outputs=[widgets["lr_result"], widgets["story_lr"], widgets["lr_plot"]],
                               api_name="lr_find", concurrency_limit=1, concurrency_id="train")
    widgets["upload"].upload(handlers["upload"], inputs_kwargs={"files": widgets["upload"], "selected": widgets["data"],
                                                                "uploads_key": uploads_key, "kind": widgets["kind"]},
                             outputs=[widgets["message"], widgets["data"], widgets["upload"], uploads_key],
                             api_name="train_upload", concurrency_limit=1)
    kept = gr.State({})  # each kind's Data selection while the other is shown
    widgets["kind"].change(lambda kind, data, selections, key: switch_kind(ctx, kind, data, selections, key),
                           [widgets["kind"], widgets["data"], kept, uploads_key],
                           [widgets["story_group"], widgets["lr_box"], widgets["qlora_group"], widgets["data"],
                            widgets["name"], widgets["qlora_base"], widgets["qlora_skip_bad_rows"], kept,
                            widgets["message"]], api_visibility="private", concurrency_limit=None)
    return widgets


def job_handlers(ctx, widgets):
    """The Train tab's handlers, by name: start, export, stop, find_lr, upload. A refused call says why in the
    message line (the job's own command and status stay as they are)."""
    def refused(error):
        """A UserError as the page shows it (a trainer's message may name a server path)."""
        return warn(app_config.public_text(ctx.config, error))

    def message(line, inputs, theirs):
        return {widgets["message"]: line}

    # uploads_key=None: optional through the API too (a client without one is one browser for its session)
    @shows_problems(message, refused)
    def start(request: gr.Request, uploads_key=None, **values):
        check_allowed(ctx.config)
        key = browser_key(uploads_key, request)
        order = order_from_form(ctx, values | {"uploads_key": key})
        return started(public_job(ctx.config, ctx.jobs.start(order, owner_of(uploads_key, request)), key))

    @shows_problems(message, refused)
    def export(request: gr.Request, uploads_key=None, out_type="f16", adapter=None):
        check_allowed(ctx.config)
        caller = owner_of(uploads_key, request)
        return started(public_job(ctx.config, ctx.jobs.start(export_order(ctx, out_type, caller, adapter), caller)))

    def started(job):
        return {widgets["message"]: f"started `{job['name']}`", widgets["status"]: job_markdown(job),
                widgets["command"]: gr.update(value=job["command"], visible=True)}

    def stop(request: gr.Request, uploads_key=None):
        line, job = stop_for(ctx, owner_of(uploads_key, request))
        return {widgets["message"]: line} | ({widgets["status"]: job_markdown(job)} if job else {})

    @shows_problems(lambda line, inputs, theirs: {widgets["lr_result"]: line}, refused)
    def find_lr(request: gr.Request, uploads_key=None, **values):
        suggested, png = run_lr_finder(ctx, values | {"uploads_key": browser_key(uploads_key, request)},
                                       owner_of(uploads_key, request))
        return {widgets["lr_result"]: f"suggested learning rate: **{suggested:.2e}** (filled in above)",
                widgets["story_lr"]: f"{suggested:.2e}",
                widgets["lr_plot"]: gr.update(value=inline_png(png, "LR finder: loss against learning rate"),
                                              visible=True)}

    @shows_problems(lambda line, inputs, theirs: {widgets["message"]: line, widgets["upload"]: None}, refused)
    def upload(request: gr.Request, files, selected, uploads_key=None, kind="story"):
        return add_uploads(ctx, files, selected, browser_key(uploads_key, request), kind)

    return {"start": start, "export": export, "stop": stop, "find_lr": find_lr, "upload": upload}
