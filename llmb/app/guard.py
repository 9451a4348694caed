"""The one check of what an API call sends, in front of Gradio's own processing.

Gradio validates and converts each input (`preprocess`) before a handler runs, and answers a value it
cannot take with an unnamed error and a traceback in the log: a chat history that is a string, a job
kind that is not one of the choices, "nan" for a number box, too few values. `CallCheck` reads every call
(`/gradio_api/queue/join`, `/call/NAME`, `/call/v2/NAME`, `/run/NAME`, `/api/NAME`) first and refuses one
whose values do not have the shape its inputs take, with Gradio's own validation answer (HTTP 422, one
message per parameter: the page shows it, `gradio_client` raises it) and one line in the log.

Only the shape is checked here (a list of messages, one of the choices, a number); what the values mean
(ranges, names, lengths of text) the handlers check, as for the page.
"""

import json
import math
import re
from pathlib import Path

import gradio as gr

from llmb.errors import clip

CALL = re.compile(r"/gradio_api/(?:queue/join|(?:call/v2|call|run|api)/(?P<api>[^/]+))/?$")
MAX_BODY = 4 * 1024 * 1024  # a call's JSON; a history within its limits is far smaller


def shape_problem(block, value, max_turns):
    """Why Gradio could not take `value` for the input `block`, or None."""
    if value is None or block.stateful:
        return None
    if isinstance(block, gr.Chatbot):
        return history_problem(block, value, max_turns)
    if isinstance(block, gr.Radio):
        allowed = [choice[1] for choice in block.choices]
        return None if value in allowed else f"must be one of {', '.join(map(str, allowed))} (got {clip(value)!r})"
    if isinstance(block, gr.Number):
        return number_problem(value)
    if isinstance(block, gr.Slider) and isinstance(value, (int, float)):  # text: the handler names the setting
        return number_problem(value)
    if isinstance(block, gr.Checkbox):
        return None if isinstance(value, bool) else f"must be true or false (got {clip(value)!r})"
    if isinstance(block, gr.Textbox):  # Gradio would turn {"a": 1} into the text "{'a': 1}"
        return None if is_text(value) else f"must be text (got {type(value).__name__})"
    if isinstance(block, gr.File):
        return files_problem(value)
    return None  # pickers and sliders take any value; the handler checks it


def is_text(value):
    """Text, or a number (an API client may send a seed or a learning rate as one): what a text box takes."""
    return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def files_problem(value):
    """An upload input: files this app's upload route received (in Gradio's upload folder), never a server path
    an API client names (Gradio refuses those too, but with an empty error and a traceback in the log)."""
    files = value if isinstance(value, list) else [value]
    if not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
        return "must be an uploaded file ({'path': ..., 'meta': {'_type': 'gradio.FileData'}}) or a list of them"
    if not all(uploaded(f["path"]) for f in files):
        return ("must be a file uploaded to this app (POST it to /gradio_api/upload first, as gradio_client's "
                "handle_file does), not a path on the server")
    return None


def uploaded(path):
    """Is `path` inside Gradio's upload folder (where its upload route keeps what it receives)?"""
    from gradio.utils import get_upload_folder

    try:
        return Path(path).resolve().is_relative_to(Path(get_upload_folder()).resolve())
    except (OSError, TypeError, ValueError):
        return False


def number_problem(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number (got {clip(value)!r})"
    try:
        return None if math.isfinite(float(value)) else f"must be a finite number (got {value})"
    except OverflowError:
        return f"must be a number of at most 308 digits (got one of {len(str(abs(value)))})"


def history_problem(block, history, max_turns):
    """A chat history: a list of at most `max_turns` {"role", "content"} messages in Gradio's format."""
    if not isinstance(history, list):
        return f"must be a list of messages (got {type(history).__name__})"
    if len(history) > max_turns:
        return f"has {len(history):,} messages; the limit is {max_turns:,} (press Clear, or send fewer)"
    good = all(isinstance(m, dict) and m.get("role") in ("user", "assistant") for m in history)
    try:
        good = good and block.data_model.model_validate(history, context={"validate_meta": True}) is not None
    except ValueError:  # pydantic's ValidationError
        good = False
    return None if good else ("must hold {'role': 'user' or 'assistant', 'content': [{'type': 'text', 'text': "
                              "...}]} messages (the format the chat returns)")


def call_problems(fn, data, max_turns):
    """[(parameter name, why)] for the values `data` (a list, or a dict by name for /call/v2) sent to `fn`."""
    names = [parameter_name(fn, i) for i in range(len(fn.inputs))]
    if isinstance(data, dict):
        unknown = [k for k in data if k not in names]
        if unknown:
            return [(unknown[0], f"is not a parameter of this endpoint; it takes {', '.join(names)}")]
        pairs = [(fn.inputs[names.index(k)], k, v) for k, v in data.items()]
    elif isinstance(data, list):
        inputs = [(b, n) for b, n in zip(fn.inputs, names)]
        if len(data) != len(inputs):  # an API client may leave out the inputs the API skips (state)
            inputs = [(b, n) for b, n in inputs if not b.skip_api]
        if len(data) != len(inputs):
            return [("data", f"takes {len(inputs)} values ({', '.join(n for _, n in inputs)}); got {len(data)}")]
        pairs = [(b, n, v) for (b, n), v in zip(inputs, data)]
    else:
        return [("data", f"must be a list of values (got {type(data).__name__})")]
    found = [(name, shape_problem(block, value, max_turns)) for block, name, value in pairs]
    return [(name, why) for name, why in found if why]


def parameter_name(fn, index):
    names = getattr(fn, "input_parameter_names", None) or []
    if index < len(names) and names[index]:
        return names[index]
    return getattr(fn.inputs[index], "label", None) or f"parameter_{index}"


def find_fn(demo, body, api):
    index = body.get("fn_index") if isinstance(body, dict) else None
    if isinstance(index, int) and not isinstance(index, bool):
        return demo.fns.get(index)
    return next((fn for fn in demo.fns.values() if api and fn.api_name == api), None)


def refusal(problems, status=422):
    """Gradio's validation answer: the page marks the inputs, gradio_client raises a ValidationError."""
    detail = [{"__type__": "validate", "is_valid": False, "parameter_name": name, "message": why}
              for name, why in problems]
    return status, json.dumps({"detail": detail, "error": "; ".join(f"{n}: {w}" for n, w in problems)}).encode()


class CallCheck:
    """ASGI middleware: refuses a call whose values Gradio could not take, before Gradio sees it."""

    def __init__(self, app, demo, max_turns):
        self.app, self.demo, self.max_turns = app, demo, max_turns

    async def __call__(self, scope, receive, send):
        match = CALL.search(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False) and message["type"] == "http.request"
            if len(body) > MAX_BODY:
                return await answer(send, *refusal([("data", f"the call is over {MAX_BODY // 2**20} MB")], 413))
        fn, problems = self.problems(body, match["api"], v2="/call/v2/" in scope["path"])
        if fn is None and match["api"] and not problems:  # Gradio answered it with a 500 and a traceback
            name = match["api"][:60]
            print(f"llmb: refused a call to /{name}: no such endpoint", flush=True)
            return await answer(send, *refusal([("api_name", f"no endpoint named {name!r}; the app's endpoints "
                                                             "are listed at /?view=api")], 404))
        if problems:
            print(f"llmb: refused a call to /{getattr(fn, 'api_name', None) or match['api'] or 'the queue'}: "
                  + "; ".join(f"{n} {w}" for n, w in problems)[:300], flush=True)
            return await answer(send, *refusal(problems))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def problems(self, raw, api, v2):
        """(the endpoint, [(parameter, why)]) for a call's JSON body."""
        try:
            body = json.loads(raw)
        except ValueError:
            return None, [("data", "the call's body must be JSON")]
        fn = find_fn(self.demo, body, api)
        if fn is None:
            return None, []  # an unknown endpoint (refused by the caller), or the queue's own calls
        data = body if v2 else body.get("data") if isinstance(body, dict) else None
        if v2 and isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "oauth_token"}
        return fn, call_problems(fn, data, self.max_turns)


async def answer(send, status, text):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(text))]})
    await send({"type": "http.response.body", "body": text})
