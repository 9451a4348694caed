"""The app through its HTTP API (gradio_client), launched once as `python app.py` in a subprocess.

Story: a tiny story checkpoint. Assistant: the tiny random Phi with the real Phi-2 tokenizer
(tests/conftest.py) and a LoRA adapter trained on it. Training: a tiny story run.
"""

import threading
import time

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.app.app_server import TINY_TRAIN, app_folders, launch_app, stop_app, stop_training

SAMPLING = dict(temperature=0.7, top_p=0.9, top_k=50, penalty=1.1, max_new=12, seed=1)


@pytest.fixture(scope="module")
def app(tmp_path_factory, shared_data, tiny_phi, tiny_phi_adapter):
    root = tmp_path_factory.mktemp("app")
    ckpts, data, work = app_folders(root, shared_data, adapter=tiny_phi_adapter)
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
    return client.predict(str(ckpt), prompt, max_new, temperature, top_k, top_p, str(seed), api_name="/story")


def chat(client, message, history=(), base_history=(), system="", compare=False, **sampling):
    s = SAMPLING | sampling
    return client.predict(message, list(history), list(base_history), system, compare, s["temperature"], s["top_p"],
                          s["top_k"], s["penalty"], s["max_new"], str(s["seed"]), api_name="/chat")


def text_of(message):
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


# ---------------------------------------------------------------------------------- start-up

def test_starts_without_loading_models(app, client):
    # how fast it answers is measured by benchmarks/bench_app_startup.py, not asserted here
    assert "Loading weights" not in app.log_text()  # the assistant has not been loaded yet
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/story", "/story_stop", "/chat", "/chat_regenerate", "/chat_stop", "/chat_clear", "/train_start",
                 "/train_stop", "/train_progress", "/lr_find", "/train_upload"):
        assert name in endpoints


# -------------------------------------------------------------------------------------- story

def test_story_streams_a_continuation(app, client):
    job = client.submit(str(app.ckpts / "tiny-story"), "Dorothy", 200, 0.8, 0, 1.0, "3", api_name="/story")
    updates = [out for out in job]
    final = job.result()
    assert len(updates) > 5, "the continuation should arrive in pieces"
    assert final[0].startswith("Dorothy") and len(final[0]) == len("Dorothy") + 200
    assert "done: 200 new characters" in final[1]
    assert "loaded on cpu" in final[2]
    assert story(client, app.ckpts / "tiny-story", seed=3, max_new=200)[0] == final[0], "same seed, same text"


def test_story_stop_stops_generation(app, client):
    job = client.submit(str(app.ckpts / "tiny-story"), "Once", 2000, 0.8, 0, 1.0, "", api_name="/story")
    deadline = time.time() + 30
    while len(job.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    client.predict(api_name="/story_stop")
    text, note, _ = job.result(timeout=30)
    assert note.startswith("stopped")
    assert len(text) < len("Once") + 2000


def test_story_reports_unknown_characters(app, client):
    text, note, _ = story(client, app.ckpts / "tiny-story", prompt="Dorothy ✨ ☃", max_new=5)
    assert "never saw" in note and "✨" in note and "☃" in note
    assert len(text) == len("Dorothy ✨ ☃") + 5


@pytest.mark.parametrize("prompt, kwargs, message", [
    ("x" * 100_000, {}, "limit is 20,000"),
    ("Dorothy", {"ckpt": "/etc"}, "not one of the story checkpoints"),
    ("Dorothy", {"ckpt": "../../etc"}, "not one of the story checkpoints"),
    ("Dorothy", {"top_k": 2.5}, "top-k must be a whole number"),
])
def test_story_bad_input_gives_a_message(app, client, prompt, kwargs, message):
    ckpt = kwargs.pop("ckpt", app.ckpts / "tiny-story")
    text, note, _ = story(client, ckpt, prompt=prompt, **kwargs)
    assert message in note and note.startswith("⚠️")


@pytest.mark.parametrize("kwargs", [{"max_new": 0}, {"max_new": -5}, {"max_new": 10**9}, {"temperature": -1}])
def test_story_out_of_range_numbers_are_refused_with_a_message(app, client, kwargs):
    with pytest.raises(AppError, match="(less|greater) than (minimum|maximum) value"):
        story(client, app.ckpts / "tiny-story", **kwargs)
    assert story(client, app.ckpts / "tiny-story", max_new=3)[1].startswith("done"), "the app keeps serving"


def test_empty_story_prompt_starts_from_a_blank_line(app, client):
    text, note, _ = story(client, app.ckpts / "tiny-story", prompt="", max_new=10)
    assert len(text) == 10 and "empty prompt" in note


# --------------------------------------------------------------------------------------- chat

def test_chat_answers_with_the_adapter_and_compares_with_the_base(app, client):
    history, base, box, status, model_status, saved = chat(client, "Hello, who are you?", compare=True)
    assert [m["role"] for m in history] == ["user", "assistant"] and text_of(history[1])
    assert [m["role"] for m in base] == ["user", "assistant"] and text_of(base[1])
    assert "tokens/s" in status and box == ""
    assert "adapter `tiny-adapter`" in model_status and "loaded on cpu" in model_status
    assert saved == {"chat": [{"role": m["role"], "content": text_of(m)} for m in history],
                     "base": [{"role": m["role"], "content": text_of(m)} for m in base]}
    history2, base2, *_ = chat(client, "Tell me more.", history, base, system="Be brief.", compare=True)
    assert [m["role"] for m in history2] == ["user", "assistant"] * 2
    assert text_of(history2[2]) == "Tell me more." and len(base2) == 4


def test_chat_regenerate_replaces_the_last_answer_and_clear_empties(app, client):
    history, base, *_ = chat(client, "Name a colour.", seed=1)
    s = SAMPLING | {"seed": 2}
    again = client.predict(history, base, "", False, s["temperature"], s["top_p"], s["top_k"], s["penalty"],
                           s["max_new"], str(s["seed"]), api_name="/chat_regenerate")
    assert len(again[0]) == 2 and text_of(again[0][0]) == "Name a colour."
    assert text_of(again[0][1]) != text_of(history[1])
    cleared = client.predict(api_name="/chat_clear")
    assert cleared[0] == [] and cleared[1] == [] and cleared[3] == {"chat": [], "base": []}


def test_chat_stop_sets_the_cancel_event(app, client):
    s = SAMPLING | {"max_new": 1000}
    job = client.submit("Write a long story.", [], [], "", False, s["temperature"], s["top_p"], s["top_k"],
                        s["penalty"], s["max_new"], "", api_name="/chat")
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
])
def test_chat_bad_input_gives_a_message(app, client, message, sampling, expected):
    history, base, box, status, *_ = chat(client, message, **sampling)
    assert expected in status and status.startswith("⚠️")


def test_eight_clients_at_once_get_their_own_answers(app):
    """4 story + 4 chat clients together: all answered, and no chat sees another's message."""
    results, errors = {}, []

    def story_user(i):
        try:
            results[f"story{i}"] = story(Client(app.url, verbose=False), app.ckpts / "tiny-story", prompt=f"Oz {i}",
                                         max_new=60, seed=i)
        except Exception as e:  # collected and reported below
            errors.append(e)

    def chat_user(i):
        try:
            c = Client(app.url, verbose=False)
            first = chat(c, f"My name is user{i}.", seed=i, max_new=6)
            results[f"chat{i}"] = chat(c, "What is my name?", first[0], seed=i, max_new=6)
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
    status, command, plot, sample, log, story_picker, adapter_picker, chat_status = \
        client.predict(api_name="/train_progress")
    return dict(status=status, command=command, plot=plot, sample=sample, log=log, story_picker=story_picker)


def wait_for(client, condition, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = progress(client)
        if condition(p):
            return p
        time.sleep(0.5)
    pytest.fail(f"timed out; last progress: {p['status']}\n{p['log']}")


def test_train_start_refuse_second_stop_and_find_the_checkpoint(app, client):
    data = [str(app.data / "books" / "wizard.txt")]
    message, command, status = client.predict("story", "run1", data, *TINY_TRAIN, api_name="/train_start")
    assert message == "started `run1`"
    assert command.startswith("python training/train_char.py --data ") and "--max-iters 100000" in command
    refused = client.predict("story", "run2", data, *TINY_TRAIN, api_name="/train_start")[0]
    assert "already running (run1" in refused

    p = wait_for(client, lambda p: any(row[2] == "val" for row in p["plot"]["data"]))
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
    text, note, _ = story(client, app.ckpts / "run1", max_new=5)
    assert note.startswith("done")
    assert client.predict(api_name="/train_stop")[0].startswith("⚠️ no training job is running")


TRAIN_FIELDS = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout", "lr", "max_iters", "max_time",
                "eval_interval"]


@pytest.mark.parametrize("name, data, changes, expected", [
    ("bad1", None, {"n_layer": 0}, "n layer must be between 1 and 64"),
    ("bad2", None, {"lr": "-1"}, "lr must be between"),
    ("bad3", None, {"lr": "fast"}, "lr must be a number"),
    ("bad4", None, {"max_iters": 10**12}, "max iters must be between"),
    ("bad5", None, {"dropout": 5}, "dropout must be between"),
    ("../escape", None, {}, "run name"),
    ("a/b", None, {}, "run name"),
    ("bad6", ["/etc/passwd"], {}, "outside the allowed data folders"),
    ("bad7", ["{data}/../../../etc"], {}, "outside the allowed data folders"),
    ("bad8", [], {}, "pick or upload training data first"),
])
def test_train_bad_input_gives_a_message(app, client, name, data, changes, expected):
    values = list(TINY_TRAIN)
    for field, value in changes.items():
        values[TRAIN_FIELDS.index(field)] = value
    data = [str(app.data / "books" / "wizard.txt")] if data is None else [d.format(data=app.data) for d in data]
    message, _, _ = client.predict("story", name, data, *values, api_name="/train_start")
    assert message.startswith("⚠️") and expected in message
    assert not (app.ckpts / name).exists()


def test_upload_accepts_books_and_chats_and_refuses_bad_files(app, client, tmp_path):
    good = tmp_path / "my book.txt"
    good.write_text("Once upon a time. " * 100)
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"text": "### Human: hi### Assistant: hello"}\n')
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    malformed = tmp_path / "broken.jsonl"
    malformed.write_text('{"text": "### Human: hi### Assistant: hello"}\n{not json\n')
    message, data = client.predict([handle_file(p) for p in (good, chats, binary, malformed)], [],
                                   api_name="/train_upload")
    assert message.startswith("uploaded 2 file(s)")
    assert "binary" in message and "broken.jsonl" in message and "invalid JSON" in message
    uploads = app.work / "uploads"
    assert sorted(p.name for p in uploads.iterdir()) == ["chats.jsonl", "my_book.txt"]
    assert data["value"] == [str(uploads / "my_book.txt"), str(uploads / "chats.jsonl")]
    assert [str(uploads / "my_book.txt")] in [[c[1]] for c in data["choices"]]


def test_lr_finder_fills_in_the_suggested_rate(app, client):
    data = [str(app.data / "books" / "wizard.txt")]
    message, lr, plot = client.predict(data, 20, 2, 2, 32, 32, 16, 0.0, api_name="/lr_find")
    assert message.startswith("suggested learning rate"), message
    assert float(lr) > 0 and f"{float(lr):.2e}" in message
    assert plot["visible"] is True and plot["value"].endswith(".png"), plot  # the plot is shown
    assert client.predict(data, 3, 2, 2, 32, 32, 16, 0.0, api_name="/lr_find")[0].startswith("⚠️")
