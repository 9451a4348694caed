"""What the tabs share (llmb.app.common): a handler's problems end in its outputs, and Gradio still sees the
handler's own parameters through the decorator."""

import inspect
import typing

import gradio as gr
import pytest

from llmb.app.common import shows_problems
from llmb.errors import UserError


def outputs(line, inputs, theirs):
    return {"line": line, "inputs": inputs, "theirs": theirs}


@shows_problems(outputs)
def stream(request: gr.Request, checkpoint, **settings):
    yield "first piece"
    if settings.get("bug"):
        raise RuntimeError("a bug")
    raise UserError("`top_k` must be a whole number")


@shows_problems(outputs, refuse=lambda error: f"refused: {error}")
def call(request: gr.Request, name=None):
    if name is None:
        raise ZeroDivisionError("a bug")
    raise UserError(f"{name} is taken")


@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request is a Python warning
def test_a_streams_problem_is_its_last_output(capsys):
    pieces = list(stream(None, "oz", top_k="x"))
    assert pieces == ["first piece", {"line": "⚠️ `top_k` must be a whole number", "theirs": True,
                                      "inputs": {"request": None, "checkpoint": "oz", "top_k": "x"}}]
    *_, bug = stream(None, checkpoint="oz", bug=True)
    assert bug["line"] == "⚠️ unexpected error (RuntimeError); the app keeps running" and bug["theirs"] is False
    assert "RuntimeError: a bug" in capsys.readouterr().err, "a bug's traceback goes to the log"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_functions_problem_is_its_output(capsys):
    assert call(None, name="run1") == {"line": "refused: run1 is taken", "theirs": True,
                                       "inputs": {"request": None, "name": "run1"}}
    assert call(None)["theirs"] is False and "ZeroDivisionError: a bug" in capsys.readouterr().err


def test_gradio_sees_the_handlers_own_parameters():
    assert inspect.isgeneratorfunction(stream) and not inspect.isgeneratorfunction(call), "a stream stays a stream"
    assert list(inspect.signature(stream).parameters) == ["request", "checkpoint", "settings"]
    assert typing.get_type_hints(call)["request"] is gr.Request, "Gradio passes the request by this annotation"
