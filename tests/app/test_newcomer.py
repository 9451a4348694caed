"""What the page preselects and says, without a browser: each kind of run's own defaults, the QLoRA base
a machine can train, uploads replacing an untouched preselection, toasts in plain text."""

import json
import shutil

import gradio as gr
import pytest

from llmb.__main__ import build_parser
from llmb.app import config as app_config
from llmb.app.chat_tab import describe
from llmb.app.common import Context, plain
from llmb.app.config import train_base
from llmb.app.train_tab import add_uploads, switch_kind
from llmb.assistant.cli import suited_sampling
from llmb.assistant.gguf import SMALL_NAME

GUANACO_TRAIN = "guanaco/guanaco-llama2-1k_train.jsonl"  # the shipped chat file with one unusable row


@pytest.fixture
def config(tmp_path, repo_data):
    data = tmp_path / "data"
    (data / "guanaco").mkdir(parents=True)
    shutil.copy(repo_data / "books" / "oz" / "01_the_wonderful_wizard_of_oz.txt", data / "wizard.txt")
    shutil.copy(repo_data / GUANACO_TRAIN, data / GUANACO_TRAIN)
    return app_config.parse_args(["--checkpoints", str(tmp_path / "ckpts"), "--data-dir", str(data),
                                  "--work-dir", str(tmp_path / "work"), "--story-ckpt", str(tmp_path / "none")])


def small_assistant(config):
    folder = config.checkpoints / SMALL_NAME  # as get-small-assistant leaves it, weights aside
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"")


def test_each_kind_keeps_its_own_data_and_an_adapter_skips_the_known_bad_rows(config):
    ctx = Context(config)
    assert app_config.default_data(config, "story") == ["data/wizard.txt"]
    *_, data, name, base, skip, kept, note = switch_kind(ctx, "qlora", ["data/wizard.txt"], {})
    assert data == [f"data/{GUANACO_TRAIN}"] and "qlora-" in name["placeholder"]
    assert skip is True and f"data/{GUANACO_TRAIN}:900: empty assistant turn" in note
    *_, data, name, base, skip, kept, _ = switch_kind(ctx, "story", ["data/wizard.txt", f"data/{GUANACO_TRAIN}"],
                                                      kept)
    assert data == ["data/wizard.txt"] and "story-" in name["placeholder"]
    assert skip == gr.skip(), "the adapter's defaults are set once, not over the user's"
    assert switch_kind(ctx, "qlora", data, kept)[3] == ["data/wizard.txt", f"data/{GUANACO_TRAIN}"]


def test_the_small_assistant_is_the_qlora_base_without_a_gpu(config, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(app_config, "REPO", tmp_path / "repo")  # the repo's own checkpoints may hold the small one
    assert train_base(config, has_gpu=lambda: False) == "microsoft/phi-2", "not there: the configured base"
    small_assistant(config)
    assert train_base(config, has_gpu=lambda: False) == SMALL_NAME
    assert train_base(config, has_gpu=lambda: True) == SMALL_NAME, "a GPU, but the hub cannot be reached"
    config.base = str(config.checkpoints / SMALL_NAME)
    assert train_base(config, has_gpu=lambda: False) == SMALL_NAME


def test_an_upload_replaces_an_untouched_preselection_and_is_added_to_a_changed_one(config, tmp_path):
    ctx = Context(config)
    book = tmp_path / "mine.txt"
    book.write_text("A story of my own. " * 100)
    message, picker, _, key = add_uploads(ctx, [str(book)], ["data/wizard.txt"], None)
    assert picker["value"] == ["uploads/mine.txt"] and "instead of the preselected data/wizard.txt" in message
    book.write_text("Another story of my own. " * 100)
    message, picker, _, _ = add_uploads(ctx, [str(book)], [f"data/{GUANACO_TRAIN}"], key)
    assert picker["value"] == [f"data/{GUANACO_TRAIN}", "uploads/mine.txt"] and "added" in message


def test_labels_say_what_is_picked_and_toasts_show_no_markdown(config):
    intro, label = describe(Context(config), "microsoft/phi-2", "")
    assert "no adapter" in intro and "no adapter" in label and "with the adapter" not in label
    assert plain("`microsoft/phi-2` is not downloaded; run `python -m llmb get-small-assistant`") == \
        "'microsoft/phi-2' is not downloaded; run 'python -m llmb get-small-assistant'"


def test_a_book_uploaded_for_an_adapter_keeps_the_chats_and_says_why(config, tmp_path):
    ctx = Context(config)
    book = tmp_path / "mybook.txt"
    book.write_text("A story of my own. " * 100)
    preselected = app_config.default_data(config, "qlora")
    message, picker, _, _ = add_uploads(ctx, [str(book)], preselected, None, kind="qlora")
    assert picker["value"] == [*preselected, "uploads/mybook.txt"], "the chats stay picked"
    assert "uploads/mybook.txt is story data (a .txt book): an adapter trains on .jsonl chats" in message


def test_what_the_user_types_while_an_answer_streams_stays_in_the_box(config, monkeypatch):
    """The box is emptied once, when the message is sent: an answer's later pieces must not wipe a follow-up
    typed meanwhile (a newcomer's second question vanished)."""
    import threading

    from llmb.app import chat_tab

    def answer(engine, history, text, system, settings, flag, use_adapter):
        asked = history + [{"role": "user", "content": text}]
        for piece in ("Par", "Paris", "Paris."):
            yield asked + [{"role": "assistant", "content": piece}]
        yield {"new_tokens": 3, "tokens_per_sec": 10.0, "dropped_turns": 0}

    ctx = Context(config)
    monkeypatch.setattr(chat_tab, "answer", answer)
    monkeypatch.setattr(chat_tab, "known_path", lambda value, choices, what: value)
    monkeypatch.setattr(ctx.assistant, "loaded", lambda base, adapter: True)
    monkeypatch.setattr(ctx.assistant, "engine", lambda base, adapter: type("E", (), {"has_adapter": False})())
    monkeypatch.setattr(chat_tab, "model_status", lambda ctx, base, adapter, viewer=None: "loaded")
    values = dict(history=[], base_history=[], message="Capital of France?", system="", base="b", adapter="",
                  compare=False, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=16,
                  seed=None)
    boxes = [out[2] for out in chat_tab.conversation(ctx, values, threading.Event())]
    assert boxes[0] == "" and all(box == gr.skip() for box in boxes[1:]), boxes


def test_the_sampling_sliders_start_where_the_command_lines_do(config):
    """One default per sampling setting: the Story and Assistant tabs' sliders start at `llmb sample`'s and
    `llmb chat`'s defaults (the Story tab once started at 400 new characters, the command line at 500)."""
    from llmb.app.page import build

    demo = build(config)
    sliders = {c.elem_id: c.value for c in demo.blocks.values() if isinstance(c, gr.Slider) and c.elem_id}
    sample = build_parser().parse_args(["sample", "--ckpt", "x"])
    chat = suited_sampling(build_parser().parse_args(["chat"]))  # Phi-2 from the hub: the defaults
    assert sliders["story-max-new"] == float(sample.max_new_tokens) == 500
    assert sliders["chat-max-new"] == float(chat.max_new_tokens)
    assert (sliders["chat-temperature"], sliders["chat-top-p"], sliders["chat-top-k"]) == \
        (chat.temperature, chat.top_p, chat.top_k) == (0.7, 0.9, 50)


def test_a_small_base_starts_greedy_in_the_page_as_in_llmb_chat(config, tiny_phi):
    """A model under 1B parameters with no sampling of its own answers greedily, in the page as in `llmb chat`
    (SmolLM2-135M at temperature 0.7 named "Mon-Pélée" France's capital); a browser's own setting for that
    base wins, another base's does not carry over."""
    from llmb.app.chat_tab import suited_sampling as page_sampling
    from llmb.app.page import build

    base = shutil.copytree(tiny_phi, config.checkpoints / "tiny-base")
    config.base = str(base)
    demo = build(config)
    sliders = {c.elem_id: c.value for c in demo.blocks.values() if isinstance(c, gr.Slider) and c.elem_id}
    chat = suited_sampling(build_parser().parse_args(["chat", "--base", str(base)]))
    assert sliders["chat-temperature"] == chat.temperature == 0.0
    ctx = Context(config)
    assert page_sampling(ctx, "tiny-base", {"base": "tiny-base", "temperature": 0.3}) == [0.3, 0.9, 50]
    assert page_sampling(ctx, "tiny-base", {"base": "microsoft/phi-2", "temperature": 1.5}) == [0.0, 0.9, 50]
    assert page_sampling(ctx, "microsoft/phi-2", None) == [0.7, 0.9, 50]


@pytest.mark.slow  # installs nothing (the package is there) but imports the GGUF: about 30 s
def test_the_page_gets_the_small_assistant_without_a_terminal_or_a_restart(config, tmp_path, monkeypatch):
    """Where Phi-2 cannot load, the page offers a button; it runs get-small-assistant's code, and Base offers and
    picks the new model at once (a reload offers it too: the choices are read again on page load)."""
    from llmb.app.chat_tab import get_small, pickers

    monkeypatch.setattr(app_config, "REPO", tmp_path)  # not the repository's own checkpoints either
    ctx = Context(config)
    with gr.Blocks():
        assert pickers(ctx)["get_small"].visible and SMALL_NAME not in app_config.base_choices(config)
        base, button, status = get_small(ctx)
        assert base["value"] == SMALL_NAME and SMALL_NAME in base["choices"] and button["visible"] is False
        assert "installed" in status and (config.checkpoints / SMALL_NAME / "model.safetensors").is_file()
        assert not pickers(ctx)["get_small"].visible
