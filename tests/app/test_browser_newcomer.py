"""A newcomer's first look, in Chromium: every label says what is picked, each kind of training keeps its
own data and defaults, the Assistant keeps its picks over a reload, and a button that started a stream
cannot start a second one while it runs.

One app for the module (tests/app/test_browser.py's fixtures): a tiny story model, the tiny Phi as the
base with no adapter, a data folder with one book and one chat file.
"""

import json

import pytest

from tests.app.test_browser import app, browser, open_tab, page, shot, wait_for_text  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def picked(page, selector):
    """The values a multiselect picker shows (its tokens)."""
    return page.locator(f"{selector} .token span").all_inner_texts()


def pick(page, selector, option):
    page.locator(f"{selector} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_qlora_keeps_its_own_data_and_defaults_and_refuses_an_unreachable_base(page, app):  # noqa: F811
    open_tab(page, "Train")
    assert picked(page, "#train-data") == ["data/books/wizard.txt"]
    shot(page, "train-first-look")
    page.get_by_label("QLoRA adapter for the assistant").check()
    page.wait_for_function("document.querySelector('#train-name textarea').placeholder.includes('qlora-')")
    assert picked(page, "#train-data") == ["data/chats.jsonl"], "a chat file, no .txt book"
    assert page.locator("#train-qlora-skip-bad-rows input").is_visible()
    shot(page, "train-qlora")

    pick(page, "#train-qlora-base", "microsoft/phi-2")  # the hub cannot be reached in the tests
    page.locator("#train-start").click()
    wait_for_text(page, "#train-message", "cannot be reached")
    said = page.locator("#train-message").inner_text()  # the small assistant: to install, or installed already
    assert "Get the small assistant" in said or "pick the local model smollm2-135m-instruct" in said, said
    assert "No training job yet" in page.locator("#train-status").inner_text(), "refused before a job starts"

    page.get_by_label("Story model (from scratch)").check()
    page.wait_for_function("document.querySelector('#train-name textarea').placeholder.includes('story-')")
    assert picked(page, "#train-data") == ["data/books/wizard.txt"], "the story's own selection is back"


def test_labels_follow_the_picks_and_a_stale_warning_goes(page, app):  # noqa: F811
    shot(page, "story-first-look")
    story_intro = page.locator("#story-intro").inner_text()
    assert "01_the_wonderful_wizard_of_oz.txt" in story_intro, story_intro  # from the checkpoint's summary.json
    assert "Oz books" not in story_intro and "/" not in story_intro, "the data by file name, no server path"

    open_tab(page, "Assistant")
    shot(page, "assistant-first-look")
    assert "with the adapter" not in page.locator("#chatbot").inner_text(), "the adapter is none"
    assert "with a LoRA adapter" not in page.locator("#chat-intro").inner_text()
    assert "no adapter" in page.locator("#chat-intro").inner_text()

    pick(page, "#chat-base", "microsoft/phi-2")
    page.locator("#chat-message textarea").fill("Hello")
    page.locator("#chat-send").click()
    wait_for_text(page, "#chat-status", "cannot be reached")
    toast = page.locator(".toast-body").first.inner_text()
    assert "cannot be reached" in toast and "`" not in toast, f"a toast is plain text: {toast!r}"
    pick(page, "#chat-base", app.base_name)
    page.wait_for_function("!(document.querySelector('#chat-status').innerText || '').includes('cannot be reached')")


def test_an_upload_replaces_the_untouched_preselection_else_is_added(page, tmp_path):  # noqa: F811
    open_tab(page, "Train")
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    for book in (first, second):
        book.write_text(f"The story of {book.stem}. " * 200)
    page.locator("#train-upload input[type=file]").set_input_files(str(first))
    page.wait_for_function("[...document.querySelectorAll('#train-data .token span')].some("
                           "s => s.innerText.includes('first.txt'))")
    assert picked(page, "#train-data") == ["uploads/first.txt"], "the upload replaces the untouched preselection"
    wait_for_text(page, "#train-message", "instead of")
    page.locator("#train-upload input[type=file]").set_input_files(str(second))
    wait_for_text(page, "#train-message", "added")
    assert picked(page, "#train-data") == ["uploads/first.txt", "uploads/second.txt"], "the user's pick stays"


def test_base_adapter_and_compare_survive_a_reload(page):  # noqa: F811
    open_tab(page, "Assistant")
    kept = "localStorage.getItem('llmb-chat-picks')"  # encrypted: that it changed is all a test can see
    for change in (lambda: page.locator("#chat-compare input").check(),
                   lambda: pick(page, "#chat-base", "microsoft/phi-2")):
        before = page.evaluate(kept)
        change()
        page.wait_for_function(f"{kept} !== {json.dumps(before)}")  # kept before the reload
    page.reload()
    page.wait_for_selector("#story-generate")
    open_tab(page, "Assistant")
    page.wait_for_function("document.querySelector('#chat-base input').value === 'microsoft/phi-2'")
    page.wait_for_function("document.querySelector('#chat-compare input').checked")
    page.locator("#chatbot-base").wait_for(state="visible", timeout=10_000)  # Compare shows the base model's chat


def test_generate_and_send_are_disabled_while_streaming(page):  # noqa: F811
    generate = "document.querySelector('#story-generate').disabled"
    page.locator("#story-max-new input[type=number]").fill("2000")
    page.locator("#story-max-new input[type=number]").press("Enter")
    page.locator("#story-generate").click()
    page.wait_for_function(generate, timeout=10_000)
    wait_for_text(page, "#story-note", "writing")
    page.locator("#story-stop").click()  # the tiny model may finish first: then it is "done"
    page.wait_for_function("/stopped|done/.test(document.querySelector('#story-note').innerText)")
    page.wait_for_function(f"!{generate}")

    open_tab(page, "Assistant")
    page.locator("#chat-message textarea").fill("Tell me a long story")
    page.locator("#chat-send").click()
    page.wait_for_function("document.querySelector('#chat-send').disabled && "
                           "document.querySelector('#chat-regenerate').disabled", timeout=10_000)
    wait_for_text(page, "#chat-status", "tokens/s")
    page.wait_for_function("!document.querySelector('#chat-send').disabled")
