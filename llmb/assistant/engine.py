"""Chat with a base model, optionally with a LoRA adapter on top: the engine behind `chat` and the app.

    engine = ChatEngine("microsoft/phi-2", adapter="checkpoints/phi2-guanaco")
    answer = engine.stream(history=[("Hi", "Hello! How can I help?")], message="Tell me a joke")
    for piece in answer:
        print(piece, end="", flush=True)
    print(answer.stats)  # this answer's figures: tokens, time, why it stopped

The prompt is the adapter's format (the chat template saved with it, llmb.assistant.data); the
base alone uses its own chat template, or the guanaco format when it has none. In the guanaco
format the model does not know where its answer ends, so it would happily go on writing
"### Human: ..." for the user: generation stops at such role markers and they never reach the caller.
"""

import threading
import time
from contextlib import nullcontext

from llmb.assistant.config import DEFAULT_BASE, ChatSampling
from llmb.assistant.data import ASSISTANT, HUMAN, Turn, encode_exchanges, fit_exchanges, is_guanaco
from llmb.assistant.loading import load_adapter, load_base_model, load_chat_tokenizer
from llmb.device import resolve_device
from llmb.errors import UserError
from llmb.quantize import is_int8, quantize_linears_int8, wants_int8
from llmb.settings import check

STOP_MARKERS = (HUMAN, ASSISTANT, "<|endoftext|>")
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def message_text(content):
    """A message's content as text: Gradio's content parts ([{"type": "text", "text": ...}]) joined by
    spaces; anything else is returned as it is (the caller checks it)."""
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def history_to_turns(history):
    """Chat history as turns. Accepts (user, assistant) pairs or {"role", "content"} dicts (Gradio style)."""
    turns = []
    for item in history or []:
        if isinstance(item, dict):
            role, content = item.get("role"), message_text(item.get("content"))
            if role not in ("system", "user", "assistant"):
                raise UserError(f"history message with unknown role {role!r}; use system, user or assistant")
            turns.append(Turn(role, str(content or "").strip()))
        else:
            user, assistant = item
            turns.append(Turn("user", str(user or "").strip()))
            if assistant is not None:
                turns.append(Turn("assistant", str(assistant).strip()))
    return turns


def partial_marker_len(text, markers=STOP_MARKERS):
    """Length of the longest tail of `text` that could be the start of a marker (to hold back)."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


class StopWatch:
    """A StoppingCriteria checked after every new token: stops when `stop` or `cancel` is set, or
    when the new text ends a stop marker (checked here, on the generating thread, so generation
    ends at the marker's last token however late the reader sees it).
    """

    def __init__(self, prompt_len, *events, markers=(), tokenizer=None):
        self.prompt_len, self.events, self.new_tokens = prompt_len, [e for e in events if e is not None], 0
        self.markers, self.tokenizer = markers, tokenizer
        self.tail = max(map(len, markers), default=0)  # tokens that can hold a marker: each has >= 1 character
        self.fired = None  # what stopped generation: one of the events, or "marker"

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.new_tokens = input_ids.shape[1] - self.prompt_len
        self.fired = next((e for e in self.events if e.is_set()), None)
        if self.fired is None and self.markers:
            new = input_ids[0, max(self.prompt_len, input_ids.shape[1] - self.tail):]
            tail = self.tokenizer.decode(new, skip_special_tokens=True)  # as the reader sees it: eos ends by itself
            self.fired = "marker" if any(m in tail for m in self.markers) else None
        return torch.full((input_ids.shape[0],), self.fired is not None, dtype=torch.bool, device=input_ids.device)


class Answer:
    """One streamed answer: iterate it for the text pieces; afterwards `stats` holds its figures.

    stats: prompt_tokens, new_tokens, dropped_turns, stopped_by ("eos" | "marker" | "cancel" |
    "length"), seconds, time_to_first_token, tokens_per_sec, adapter. Closing it early (or
    leaving the loop) stops generation.
    """

    def __init__(self, pieces, stats):
        self._pieces, self.stats = pieces, stats

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._pieces)

    def close(self):
        self._pieces.close()


class ChatEngine:
    """Loads a base model (+ optional LoRA adapter) once; `stream()` answers one message at a time.

    One generation runs at a time (a lock): the adapter on/off switch changes the shared model.
    """

    def __init__(self, base=DEFAULT_BASE, adapter=None, quant="none", device="auto", precision="auto"):
        """precision: auto (fp32 on a CPU, the GPU's bf16 or fp32), fp32 (full precision: bf16 on a GPU that has
        it) or int8 (CPU only: int8 linear layers, faster decoding but changed answers; see llmb.quantize)."""
        import torch

        self.device = "cpu" if precision == "int8" and device == "auto" else resolve_device(device)
        if precision == "int8" and quant != "none":
            raise UserError("--precision int8 is for an unquantized base: leave --quant at none")
        int8 = wants_int8(precision, self.device, auto=False) and quant == "none"
        self.base, self.adapter = base, adapter
        self.tokenizer = load_chat_tokenizer(base, adapter)  # the adapter's prompt format, else the base's
        self.markers = STOP_MARKERS if is_guanaco(self.tokenizer) else ()
        # int8 starts from bf16 so the full model never sits in memory in fp32
        model = load_base_model(base, quant, self.device, torch.bfloat16 if int8 else None)
        if adapter:
            model = load_adapter(model, adapter)
        if int8:
            model = quantize_linears_int8(model)  # stays fp32 where this PyTorch has no int8 layers
        self.model = model.eval()
        dtype = str(model.dtype).removeprefix("torch.")
        self.precision = "int8" if is_int8(model) else quant if quant != "none" else DTYPE_NAMES.get(dtype, dtype)
        self.context_len = model.config.max_position_embeddings
        ends = model.generation_config.eos_token_id
        self.eos_ids = sorted({self.tokenizer.eos_token_id, *(ends if isinstance(ends, list) else [ends] if ends else [])})
        self.lock = threading.Lock()

    @property
    def has_adapter(self):
        return self.adapter is not None

    def describe(self):
        """Where the model runs and in which precision, for status lines: 'cpu, int8 linear layers'."""
        return f"{self.device}, {'int8 linear layers' if self.precision == 'int8' else self.precision}"

    def prompt_ids(self, history, message, system=None, max_new_tokens=256):
        """Token ids of the prompt, and how many old exchanges were dropped to fit the context.

        The context holds the prompt and the answer: `context_len - max_new_tokens` for the
        prompt. Oldest exchanges go first; the current message is never cut: if it alone is too
        long, UserError says by how much.
        """
        if max_new_tokens >= self.context_len:
            raise UserError(f"max new tokens is {max_new_tokens} but this model's context holds "
                            f"{self.context_len} tokens in all; use fewer than {self.context_len}")
        turns = [Turn("system", system)] if system else []
        turns += history_to_turns(history) + [Turn("user", message.strip()), Turn("assistant", None)]
        system_ids, exchanges = encode_exchanges(self.tokenizer, turns)
        budget = self.context_len - max_new_tokens
        if len(exchanges[-1][0]) > budget:
            raise UserError(f"the message is {len(exchanges[-1][0])} tokens but only {budget} fit "
                            f"({self.context_len} context - {max_new_tokens} new tokens); shorten it or lower max new tokens")
        if len(system_ids) + len(exchanges[-1][0]) > budget:
            system_ids = []  # the message is never cut: a system text that does not fit beside it goes
        kept_system, kept = fit_exchanges(system_ids, exchanges, budget)
        ids = kept_system + [t for prompt, answer in kept for t in prompt + answer]
        return ids, len(exchanges) - len(kept)

    def stream(self, history, message, system=None, temperature=ChatSampling.temperature, top_p=ChatSampling.top_p,
               top_k=ChatSampling.top_k, repetition_penalty=ChatSampling.repetition_penalty,
               max_new_tokens=ChatSampling.max_new_tokens, seed=None, use_adapter=True, cancel=None):
        """The answer to `message` as an Answer (iterate it for pieces). Setting `cancel` (a threading.Event) stops it."""
        if not message or not message.strip():
            raise UserError("empty message")
        check(ChatSampling(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed))
        use_adapter = bool(self.has_adapter and use_adapter)  # no adapter: the base answers either way
        ids, dropped = self.prompt_ids(history, message, system, max_new_tokens)
        stats = {"prompt_tokens": len(ids), "dropped_turns": dropped, "adapter": use_adapter}
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        sampling |= dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        return Answer(self._pieces(ids, sampling, seed, use_adapter, cancel, stats), stats)

    def _generate_in_thread(self, ids, sampling, use_adapter, watch, streamer, errors):
        """Start model.generate on a thread that feeds `streamer`; errors are kept for the reader."""
        import torch
        from transformers import StoppingCriteriaList

        input_ids = torch.tensor([ids], device=self.model.device)
        adapter_off = self.model.disable_adapter if (self.has_adapter and not use_adapter) else nullcontext

        def generate():
            try:
                with torch.no_grad(), adapter_off():
                    self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        streamer=streamer, stopping_criteria=StoppingCriteriaList([watch]),
                                        pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids,
                                        **sampling)
            except Exception as e:  # surfaced to the caller
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        return thread

    def _pieces(self, ids, sampling, seed, use_adapter, cancel, stats):
        """Yield the answer's text as it comes, holding back what could be the start of a stop marker."""
        import torch
        from transformers import TextIteratorStreamer

        stop = threading.Event()  # set here when a marker appears or the caller walks away
        watch = StopWatch(len(ids), stop, cancel, markers=self.markers, tokenizer=self.tokenizer)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)
        errors, held, started, first, stopped_by = [], "", False, None, None
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            t0 = time.time()
            thread = self._generate_in_thread(ids, sampling, use_adapter, watch, streamer, errors)
            try:
                for piece in streamer:
                    held += piece
                    cut = min((i for i in (held.find(m) for m in self.markers) if i >= 0), default=-1)
                    show = held[:cut] if cut >= 0 else held[:len(held) - partial_marker_len(held, self.markers)]
                    held = held[len(show):]
                    show = show if started else show.lstrip()
                    if show:
                        started, first = True, first or time.time()
                        yield show
                    if cut >= 0:
                        stopped_by = "marker"
                        break
            except GeneratorExit:  # the caller left the loop or closed the answer
                stopped_by = "cancel"
                raise
            finally:
                stop.set()
                thread.join()
                stats |= self._finish(watch, cancel, stopped_by, sampling["max_new_tokens"], t0, first)
            if errors:
                raise errors[0]
            if stats["stopped_by"] == "eos" and held.strip():
                yield held if started else held.lstrip()  # the model ended here: "I like C#" keeps its "#"

    @staticmethod
    def _finish(watch, cancel, stopped_by, max_new_tokens, t0, first):
        seconds = time.time() - t0
        if stopped_by is None:  # the reader did not stop it: ask the StopWatch
            if cancel is not None and watch.fired is cancel:
                stopped_by = "cancel"
            elif watch.fired == "marker":
                stopped_by = "marker"
            else:
                stopped_by = "length" if watch.new_tokens >= max_new_tokens else "eos"
        return {"new_tokens": watch.new_tokens, "stopped_by": stopped_by, "seconds": seconds,
                "time_to_first_token": (first - t0) if first else None,
                "tokens_per_sec": watch.new_tokens / seconds if seconds > 0 else 0.0}

    def reply(self, history, message, **kwargs):
        """The whole answer as one string."""
        return "".join(self.stream(history, message, **kwargs))
