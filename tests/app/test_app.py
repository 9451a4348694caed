"""The app through its HTTP API (gradio_client), launched once as `python app.py` in a subprocess.

Story: a tiny story checkpoint. Assistant: the tiny random Phi with the real Phi-2 tokenizer
(tests/conftest.py) and a LoRA adapter trained on it. Training: a tiny story run.
"""

import threading
import time

import pytest
from gradio_client import Client, handle_file

from tests.app.app_server import TINY_TRAIN, WIZARD, app_folders, free_port, launch_app, stop_app, stop_training

pytestmark = pytest.mark.slow  # one app in a subprocess, a tiny Phi, training runs: about two minutes

SAMPLING = dict(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=12, seed="1")


@pytest.fixture(scope="module")
def app(tmp_path_factory, repo_data, tiny_phi, tiny_phi_adapter):
    root = tmp_path_factory.mktemp("app")
    ckpts, data, work = app_folders(root, repo_data, adapter=tiny_phi_adapter)
    app = launch_app(root, ["--checkpoints", ckpts, "--story-ckpt", ckpts / "tiny-story", "--base", tiny_phi,
                            "--data-dir", data, "--work-dir", work, "--device", "cpu"])
    app.ckpts, app.data, app.work = ckpts, data, work
    yield app
    stop_training(work)
    stop_app(app)


@pytest.fixture
def client(app):
    return Client(app.url, verbose=False)


def story(client, ckpt, prompt="Dorothy", max_new=40, temperature=0.8, top_k=0, top_p=1.0, seed=1):
    return client.predict(checkpoint=str(ckpt), prompt=prompt, max_new=max_new, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=str(seed), api_name="/story")


def chat(client, message, history=(), base_history=(), system="", compare=False, **sampling):
    sampling = SAMPLING | {k: str(v) if k == "seed" else v for k, v in sampling.items()}
    return client.predict(message=message, history=list(history), base_history=list(base_history), system=system,
                          compare=compare, **sampling, api_name="/chat")


def text_of(message):
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


# ---------------------------------------------------------------------------------- start-up

STARTUP_PROBE = """
import json, os, runpy, sys, threading, time, urllib.request
sys.argv = ["app.py", *sys.argv[1:]]
threading.Thread(target=lambda: runpy.run_path("app.py", run_name="__main__"), daemon=True).start()
for _ in range(600):
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/", timeout=2).status == 200:
            break
    except OSError:
        time.sleep(0.1)
sys.stdout.write(f"imported: {json.dumps([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])}\\n")
sys.stdout.flush()  # one write, marked: Gradio's own start-up lines may come before, after or amid it
os._exit(0)
"""


def test_starts_without_loading_models(app, client):
    # how fast it answers is measured by benchmarks/bench_app_startup.py, not asserted here
    assert "Loading weights" not in app.log_text()  # the assistant has not been loaded yet
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/story", "/story_stop", "/chat", "/chat_regenerate", "/chat_stop", "/chat_clear", "/chat_model",
                 "/train_start", "/train_stop", "/train_progress", "/lr_find", "/train_upload", "/train_export"):
        assert name in endpoints
    names = [p["parameter_name"] for p in endpoints["/train_start"]["parameters"]]
    assert {"kind", "name", "data", "story_n_layer", "story_lr", "qlora_lr", "qlora_lora_r", "qlora_base"} <= set(names)


def test_answers_http_before_importing_torch(app):
    """`python app.py` serves its page with torch, transformers and peft not imported (sys.modules, in-process)."""
    import json
    import re
    import subprocess
    import sys

    args = ["--port", str(free_port()), "--checkpoints", str(app.ckpts), "--work-dir", str(app.work / "probe")]
    out = subprocess.run([sys.executable, "-c", STARTUP_PROBE, *args], cwd=app_folders.__globals__["REPO"],
                         capture_output=True, text=True, timeout=120)
    imported = re.search(r"imported: (\[.*?\])", out.stdout)
    assert imported and json.loads(imported[1]) == [], out.stdout[-1000:] + out.stderr[-2000:]


# -------------------------------------------------------------------------------------- story

def test_story_streams_a_continuation(app, client):
    job = client.submit(checkpoint="tiny-story", prompt="Dorothy", max_new=200, seed="3",
                        api_name="/story")
    updates = [out for out in job]
    final = job.result()
    assert len(updates) > 5, "the continuation should arrive in pieces"
    assert final[0].startswith("Dorothy") and len(final[0]) == len("Dorothy") + 200
    assert "done: 200 new characters" in final[1]
    from llmb.quantize import int8_supported

    weights = "int8 linear layers" if int8_supported() else "fp32"
    assert f"loaded on cpu, {weights}" in final[2], "the app samples as `llmb sample` does"
    assert story(client, "tiny-story", seed=3, max_new=200)[0] == final[0], "same seed, same text"


def test_story_stop_stops_generation(app, client):
    job = client.submit(checkpoint="tiny-story", prompt="Once", max_new=2000, api_name="/story")
    deadline = time.time() + 30
    while len(job.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    client.predict(api_name="/story_stop")
    text, note, _ = job.result(timeout=30)
    assert note.startswith("stopped")
    assert len(text) < len("Once") + 2000


def test_story_reports_unknown_characters(app, client):
    text, note, _ = story(client, "tiny-story", prompt="Dorothy ✨ ☃", max_new=5)
    assert "never saw" in note and "✨" in note and "☃" in note
    assert len(text) == len("Dorothy ✨ ☃") + 5


@pytest.mark.parametrize("prompt, kwargs, message", [
    ("x" * 100_000, {}, "limit is 20,000"),
    ("Dorothy", {"ckpt": "/etc"}, "not one of the story checkpoints"),
    ("Dorothy", {"ckpt": "../../etc"}, "not one of the story checkpoints"),
    ("Dorothy", {"top_k": 2.5}, "top-k must be a whole number"),
])
def test_story_bad_input_gives_a_message(app, client, prompt, kwargs, message):
    ckpt = kwargs.pop("ckpt", "tiny-story")
    text, note, _ = story(client, ckpt, prompt=prompt, **kwargs)
    assert message in note and note.startswith("⚠️")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new": 0}, "max new characters must be between 1 and 2000 (got 0)"),
    ({"max_new": -5}, "max new characters must be between 1 and 2000 (got -5)"),
    ({"max_new": 10**9}, "max new characters must be between 1 and 2000 (got 1e+09)"),
    ({"temperature": -1}, "temperature must be between 0 and 2 (got -1)"),
    ({"temperature": 2.5}, "temperature must be between 0 and 2 (got 2.5)"),  # the slider's range holds for the API
])
def test_story_out_of_range_numbers_are_refused_with_a_message(app, client, kwargs, message):
    text, note, _ = story(client, "tiny-story", **kwargs)
    assert note.startswith("⚠️") and message in note, note
    assert story(client, "tiny-story", max_new=3)[1].startswith("done"), "the app keeps serving"


def test_empty_story_prompt_starts_from_a_blank_line(app, client):
    text, note, _ = story(client, "tiny-story", prompt="", max_new=10)
    assert len(text) == 10 and "empty prompt" in note


# --------------------------------------------------------------------------------------- chat

def test_chat_answers_with_the_adapter_and_compares_with_the_base(app, client):
    history, base, box, status, model_status, saved = chat(client, "Hello, who are you?", compare=True)
    assert [m["role"] for m in history] == ["user", "assistant"] and text_of(history[1])
    assert [m["role"] for m in base] == ["user", "assistant"] and text_of(base[1])
    # the box was emptied with the first piece; the answer's end leaves it as the user has it (a follow-up)
    assert "tokens/s" in status and box == {"__type__": "update"}
    sent = client.submit(message="Hi", history=[], base_history=[], system="", compare=False, **SAMPLING,
                         api_name="/chat")
    assert [out[2] for out in sent][0] == ""
    assert "adapter `tiny-adapter`" in model_status and "loaded on cpu" in model_status
    assert saved == {"chat": [{"role": m["role"], "content": text_of(m)} for m in history],
                     "base": [{"role": m["role"], "content": text_of(m)} for m in base]}
    history2, base2, *_ = chat(client, "Tell me more.", history, base, system="Be brief.", compare=True)
    assert [m["role"] for m in history2] == ["user", "assistant"] * 2
    assert text_of(history2[2]) == "Tell me more." and len(base2) == 4


def test_chat_regenerate_replaces_the_last_answer_and_clear_empties(app, client):
    history, base, *_ = chat(client, "Name a colour.", seed=1)
    again = client.predict(history=history, base_history=base, system="", **(SAMPLING | {"seed": "2"}),
                           api_name="/chat_regenerate")
    assert len(again[0]) == 2 and text_of(again[0][0]) == "Name a colour."
    assert text_of(again[0][1]) != text_of(history[1])
    cleared = client.predict(api_name="/chat_clear")
    assert cleared[0] == [] and cleared[1] == [] and cleared[3] == {"chat": [], "base": []}


def test_chat_stop_sets_the_cancel_event(app, client):
    job = client.submit(message="Write a long story.", system="", **(SAMPLING | {"max_new_tokens": 1000, "seed": ""}),
                        api_name="/chat")
    deadline = time.time() + 60
    while not any(out[3] == "answering…" for out in job.outputs()) and time.time() < deadline:
        time.sleep(0.05)
    client.predict(api_name="/chat_stop")
    history, _, _, status, _, _ = job.result(timeout=60)
    assert status == "stopped"
    assert len(text_of(history[1])) > 0


@pytest.mark.parametrize("message, sampling, expected", [
    ("", {}, "type a message first"),
    ("   ", {}, "type a message first"),
    ("y" * 100_000, {}, "limit is 20,000"),
    ("hi", {"seed": -3}, "seed must be between"),
    ("hi", {"system": "s" * 30_000}, "the system preamble has 30,000 characters"),
    ("hi", {"history": [{"role": "user", "content": [{"type": "text", "text": "x" * 30_000}]}]},
     "chat history message has 30,000 characters"),
    ("hi", {"history": [{"role": "user", "content": [{"type": "text", "text": "x" * 19_000}]}] * 6},
     "the chat history has 114,000 characters"),
    ("hi", {"base": "/etc"}, "/etc is not one of the base models"),
    ("hi", {"adapter": "../../etc"}, "../../etc is not one of the adapters"),
])
def test_chat_bad_input_gives_a_message(app, client, message, sampling, expected):
    extra = {k: sampling.pop(k) for k in ("system", "history", "base", "adapter") if k in sampling}
    if extra:
        sampling = SAMPLING | sampling
        history, base, box, status, *_ = client.predict(message=message, **({"system": ""} | sampling | extra),
                                                        api_name="/chat")
    else:
        history, base, box, status, *_ = chat(client, message, **sampling)
    assert expected in status and status.startswith("⚠️")


def test_eight_clients_at_once_get_their_own_answers(app):
    """4 story + 4 chat clients together: all answered, and no chat sees another's message."""
    results, errors = {}, []

    def story_user(i):
        try:
            results[f"story{i}"] = story(Client(app.url, verbose=False), "tiny-story", prompt=f"Oz {i}",
                                         max_new=60, seed=i)
        except Exception as e:  # collected and reported below
            errors.append(e)

    def chat_user(i):
        try:
            c = Client(app.url, verbose=False)
            first = chat(c, f"My name is user{i}.", seed=i, max_new_tokens=6)
            results[f"chat{i}"] = chat(c, "What is my name?", first[0], seed=i, max_new_tokens=6)
        except Exception as e:  # collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=story_user, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=chat_user, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    for i in range(4):
        text, note, _ = results[f"story{i}"]
        assert text.startswith(f"Oz {i}") and note.startswith("done")
        history = results[f"chat{i}"][0]
        users = [text_of(m) for m in history if m["role"] == "user"]
        assert users == [f"My name is user{i}.", "What is my name?"], "history crossed sessions"
        assert all(text_of(m) for m in history if m["role"] == "assistant")


# -------------------------------------------------------------------------------------- train

def progress(client):
    status, command, plot, sample, log, story_picker, adapter_picker, chat_status, download, export_adapter = \
        client.predict(api_name="/train_progress")
    return dict(status=status, command=command, plot=plot, sample=sample, log=log, story_picker=story_picker,
                export_adapter=export_adapter)


def wait_for(client, condition, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = progress(client)
        if condition(p):
            return p
        time.sleep(0.5)
    pytest.fail(f"timed out; last progress: {p['status']}\n{p['log']}")


def test_train_start_refuse_second_stop_and_find_the_checkpoint(app, client):
    message, command, status = client.predict(kind="story", name="run1", data=[WIZARD], **TINY_TRAIN,
                                              api_name="/train_start")
    assert message == "started `run1`"
    assert command["value"].startswith("python -m llmb train-story --data ") and "--max-iters 100000" in \
        command["value"]
    assert str(app.data) not in status, "the page shows run names, not server paths"
    refused = client.predict(kind="story", name="run2", data=[WIZARD], **TINY_TRAIN, api_name="/train_start")[0]
    assert "already running (run1" in refused

    # a val point with a value (each frame also carries a point-less row per split, for the plot's colours)
    p = wait_for(client, lambda p: any(row[2] == "val" and row[1] is not None for row in p["plot"]["data"]))
    assert "running" in p["status"] and "tokens/s" in p["status"] and "ETA" in p["status"]
    assert p["sample"], "the latest sample text is shown"
    message, status = client.predict(api_name="/train_stop")
    assert message.startswith("stop requested")
    p = wait_for(client, lambda p: "stopped" in p["status"])
    assert "run1" in p["status"] and "checkpoint picker" in p["status"]
    # the new checkpoint is offered by the story picker and generates
    other = Client(app.url, verbose=False)
    story_picker = progress(other)["story_picker"]
    assert [c[0] for c in story_picker["choices"]].count("run1") == 1
    text, note, _ = story(client, "run1", max_new=5)
    assert note.startswith("done")
    assert client.predict(api_name="/train_stop")[0].startswith("⚠️ no training job is running")


@pytest.mark.parametrize("name, data, changes, expected", [
    ("bad1", None, {"story_n_layer": 0}, "Layers must be a whole number from 1 to 64 or 'auto'"),
    ("bad2", None, {"story_lr": "-1"}, "Learning rate must be a number from 1e-08 to 10 or 'auto'"),
    ("bad3", None, {"story_lr": "fast"}, "Learning rate must be a number"),
    ("bad4", None, {"story_max_iters": str(10**12)}, "Max steps must be between"),
    ("bad5", None, {"story_dropout": 5}, "Dropout must be between"),
    ("bad6", None, {"story_n_embd": 30}, "must split into"),
    ("bad7", None, {"story_max_iters": ""}, "say how long to train"),
    ("../escape", None, {}, "run name"),
    ("a/b", None, {}, "run name"),
    ("bad8", ["/etc/passwd"], {}, "'.../passwd' is not one of the data sources"),  # no server path is shown
    ("bad9", ["data/../../../etc"], {}, "is not one of the data sources"),
    ("bad10", [], {}, "pick or upload training data first"),
    ("bad11", [5], {}, "data must be a list of the Data picker's names"),
    ("bad12", None, {"story_n_layer": 10**400}, "Layers must be a whole number from 1 to 64 or 'auto' (got"),
    ("bad13", None, {"story_n_layer": "deep"}, "Layers must be a whole number from 1 to 64 or 'auto' (got 'deep')"),
])
def test_train_bad_input_gives_a_message(app, client, name, data, changes, expected):
    values = TINY_TRAIN | changes
    message, _, _ = client.predict(kind="story", name=name, data=[WIZARD] if data is None else data, **values,
                                   api_name="/train_start")
    assert message.startswith("⚠️") and expected in message
    assert not (app.ckpts / name).exists()


def test_upload_accepts_books_and_chats_and_refuses_bad_files(app, client, tmp_path):
    good = tmp_path / "my book.TXT"
    good.write_text("Once upon a time. " * 100)
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"text": "### Human: hi### Assistant: hello"}\n')
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    malformed = tmp_path / "broken.jsonl"
    malformed.write_text('{"text": "### Human: hi### Assistant: hello"}\n{not json\n')
    message, data, box, key = client.predict(files=[handle_file(p) for p in (good, chats, binary, malformed)],
                                             selected=[], api_name="/train_upload")
    assert message.startswith("uploaded 2 file(s)")
    assert "blob.txt" in message and "binary" in message and "broken.jsonl" in message and "invalid JSON" in message
    assert "/tmp" not in message and "gradio" not in message, "messages name the user's file, not a server path"
    uploads = app.work / "uploads" / key  # this browser's own folder (no key sent: a new one)
    assert sorted(p.name for p in uploads.iterdir()) == ["chats.jsonl", "my_book.txt"]
    assert data["value"] == ["uploads/my_book.txt", "uploads/chats.jsonl"], "the upload reply holds names, not paths"
    assert not any("/" in c[1] and c[1].startswith("/") for c in data["choices"])
    assert box is None, "the upload box is emptied, so a rejected file does not linger"


def test_lr_finder_fills_in_the_suggested_rate(app, client):
    lr_find = dict(data=[WIZARD], story_n_layer=2, story_n_head=2, story_n_embd=32, story_block_size=32,
                   story_batch_size=16, api_name="/lr_find")
    message, lr, plot = client.predict(lr_steps=20, **lr_find)
    assert message.startswith("suggested learning rate"), message
    assert float(lr) > 0 and f"{float(lr):.2e}" in message
    assert plot["visible"] is True and plot["value"].startswith('<img src="data:image/png;base64,'), plot
    assert str(app.work) not in plot["value"] and "gradio" not in plot["value"], "the picture, not a server path"
    assert client.predict(lr_steps=3, **lr_find)[0].startswith("⚠️ LR finder steps must be between 10 and 2000")


@pytest.mark.parametrize("changes, expected", [
    ({"qlora_base": "/etc"}, "/etc is not one of the base models"),
    ({"qlora_max_steps": 0}, "Max steps must be a whole number from 1 to 1e+07 or 'auto'"),
    ({"qlora_lr": "fast"}, "qlora_lr: must be a number (got 'fast')"),  # a number box: refused before Gradio's check
])
def test_qlora_form_checks_its_base_and_settings(app, client, changes, expected):
    from gradio_client.exceptions import ValidationError

    try:
        message, _, _ = client.predict(kind="qlora", name="q-bad", data=["data/chats.jsonl"], **changes,
                                       api_name="/train_start")
    except ValidationError as e:
        message = "⚠️ " + str(e)
    assert message.startswith("⚠️") and expected in message
    assert not (app.ckpts / "q-bad").exists()
