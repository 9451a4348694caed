"""Chat with a base model, optionally with a LoRA adapter on top: the engine behind `chat` and the app.

    engine = ChatEngine("microsoft/phi-2", adapter="checkpoints/phi2-guanaco")
    for piece in engine.stream(history=[("Hi", "Hello! How can I help?")], message="Tell me a joke"):
        print(piece, end="", flush=True)

The prompt is the guanaco format the adapter was trained on (llmb.chat_data). The model does
not know where its answer ends, so it would happily go on writing "### Human: ..." for the
user: generation stops at such role markers and they never reach the caller.
"""

import threading
import time
from contextlib import nullcontext

from llmb.assistant.config import DEFAULT_BASE
from llmb.assistant.data import ASSISTANT, HUMAN, Turn, encode_exchanges, fit_exchanges
from llmb.assistant.loading import load_adapter, load_base_model, load_tokenizer
from llmb.device import resolve_device
from llmb.errors import UserError
from llmb.quantize import quantize_linears_int8

STOP_MARKERS = (HUMAN, ASSISTANT, "<|endoftext|>")


def history_to_turns(history):
    """Chat history as turns. Accepts (user, assistant) pairs or {"role", "content"} dicts (Gradio style)."""
    turns = []
    for item in history or []:
        if isinstance(item, dict):
            role, content = item.get("role"), item.get("content")
            if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
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
    """A StoppingCriteria checked after every new token: stops when `stop` or `cancel` is set."""

    def __init__(self, prompt_len, *events):
        self.prompt_len, self.events, self.new_tokens = prompt_len, [e for e in events if e is not None], 0
        self.fired = None  # the event that stopped generation

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.new_tokens = input_ids.shape[1] - self.prompt_len
        self.fired = next((e for e in self.events if e.is_set()), None)
        return torch.full((input_ids.shape[0],), self.fired is not None, dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """Loads a base model (+ optional LoRA adapter) once; `stream()` answers one message at a time.

    One generation runs at a time (a lock): the adapter on/off switch changes the shared model.
    """

    def __init__(self, base=DEFAULT_BASE, adapter=None, quant="none", device="auto", cpu_int8=False):
        import torch

        self.device = resolve_device(device)
        if cpu_int8 and (self.device != "cpu" or quant != "none"):
            raise UserError("--cpu-int8 is a CPU option for an unquantized base: use it with --device cpu --quant none")
        self.base, self.adapter = base, adapter
        self.tokenizer = load_tokenizer(base)
        # int8 starts from bf16 so the full model never sits in memory in fp32
        dtype = torch.bfloat16 if cpu_int8 else None
        model = load_base_model(base, quant, self.device, dtype)
        if adapter:
            model = load_adapter(model, adapter)
        if cpu_int8:
            model = quantize_linears_int8(model)
        self.model = model.eval()
        self.context_len = model.config.max_position_embeddings
        self.lock = threading.Lock()
        self.last_stats = {}

    @property
    def has_adapter(self):
        return self.adapter is not None

    def prompt_ids(self, history, message, system=None, max_new_tokens=256):
        """Token ids of the prompt, and how many old exchanges were dropped to fit the context.

        The context holds the prompt and the answer: `context_len - max_new_tokens` for the
        prompt. Oldest exchanges go first; the current message is never cut: if it alone is too
        long, UserError says by how much.
        """
        turns = [Turn("system", system)] if system else []
        turns += history_to_turns(history) + [Turn("user", message.strip()), Turn("assistant", None)]
        system_ids, exchanges = encode_exchanges(self.tokenizer, turns)
        budget = self.context_len - max_new_tokens
        if len(exchanges[-1][0]) > budget:
            raise UserError(f"the message is {len(exchanges[-1][0])} tokens but only {budget} fit "
                            f"({self.context_len} context - {max_new_tokens} new tokens); shorten it or lower max new tokens")
        kept_system, kept = fit_exchanges(system_ids, exchanges, budget)
        ids = kept_system + [t for prompt, answer in kept for t in prompt + answer]
        return ids, len(exchanges) - len(kept)

    def stream(self, history, message, system=None, temperature=0.7, top_p=0.9, top_k=50,
               repetition_penalty=1.1, max_new_tokens=256, seed=None, use_adapter=True, cancel=None):
        """Yield the answer to `message` piece by piece. Setting `cancel` (a threading.Event) stops it.

        Afterwards `last_stats` holds prompt_tokens, new_tokens, dropped_turns, stopped_by
        ("eos" | "marker" | "cancel" | "length"), seconds and tokens_per_sec.
        """
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        if not message or not message.strip():
            raise UserError("empty message")
        if use_adapter is False and not self.has_adapter:
            use_adapter = True  # there is no adapter to switch off: the base answers either way
        ids, dropped = self.prompt_ids(history, message, system, max_new_tokens)
        input_ids = torch.tensor([ids], device=self.model.device)
        stop = threading.Event()  # set here when a marker appears or the caller walks away
        watch = StopWatch(len(ids), stop, cancel)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        gen_kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                          max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                          stopping_criteria=StoppingCriteriaList([watch]),
                          pad_token_id=self.tokenizer.eos_token_id, eos_token_id=self.tokenizer.eos_token_id, **sampling)
        adapter_off = self.model.disable_adapter if (self.has_adapter and not use_adapter) else nullcontext
        errors = []

        def generate():
            try:
                with torch.no_grad(), adapter_off():
                    self.model.generate(**gen_kwargs)
            except Exception as e:  # surfaced to the caller below
                errors.append(e)
                streamer.end()

        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            t0, first, stopped_by = time.time(), None, None
            thread = threading.Thread(target=generate, daemon=True)
            thread.start()
            try:
                held, started = "", False
                for piece in streamer:
                    held += piece
                    cut = min((i for i in (held.find(m) for m in STOP_MARKERS) if i >= 0), default=-1)
                    show = held[:cut] if cut >= 0 else held[:len(held) - partial_marker_len(held)]
                    held = held[len(show):]
                    if not started:
                        show = show.lstrip()
                    if show:
                        started, first = True, first or time.time()
                        yield show
                    if cut >= 0:
                        stopped_by = "marker"
                        stop.set()
                        break
                # a partial marker still held at the end is dropped: it was the model starting a role line
            finally:
                stop.set()
                thread.join()
                if errors:
                    raise errors[0]
                seconds = time.time() - t0
                if stopped_by is None:
                    stopped_by = "cancel" if cancel is not None and watch.fired is cancel else \
                        "length" if watch.new_tokens >= max_new_tokens else "eos"
                self.last_stats = {
                    "prompt_tokens": len(ids), "new_tokens": watch.new_tokens, "dropped_turns": dropped,
                    "stopped_by": stopped_by, "seconds": seconds,
                    "time_to_first_token": (first - t0) if first else None,
                    "tokens_per_sec": watch.new_tokens / seconds if seconds > 0 else 0.0,
                    "adapter": bool(self.has_adapter and use_adapter),
                }

    def reply(self, history, message, **kwargs):
        """The whole answer as one string."""
        return "".join(self.stream(history, message, **kwargs))
