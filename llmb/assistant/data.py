"""Chat data: read conversations, turn them into training examples for a causal LM.

Every source becomes a list of conversations, each a list of turns (role, content) with
role "system", "user" or "assistant". Three row formats are understood, detected per file:

    guanaco   {"text": "### Human: ...### Assistant: ...### Human: ..."}
    openai    {"messages": [{"role": "user", "content": ...}, ...]}
    llama2    {"text": "<s>[INST] ... [/INST] ... </s><s>[INST] ... [/INST] ... </s>"}

Whatever came in, the model is trained in one prompt format, the adapter's: a Jinja chat
template (the base's own, e.g. SmolLM2's, or the QLoRA paper's guanaco format for bases without
one, such as Phi-2), with the loss only on the assistant's words:

    [system\n]### Human: {user}### Assistant: {assistant}<|endoftext|>### Human: ...
    \_______ prompt: label -100 _______/\___ target: labels = ids ___/

The template is saved with the adapter, so `apply_chat_template` gives exactly these ids.
"""

import json
import random
import re
from pathlib import Path
from typing import NamedTuple

from llmb.errors import UserError

HUMAN, ASSISTANT = "### Human:", "### Assistant:"
IGNORE = -100  # label value that cross-entropy skips


class Turn(NamedTuple):
    role: str  # "system" | "user" | "assistant"
    content: str


class BadRow(Exception):
    """One unusable row; collected and reported together with its file and line."""


# ---------------------------------------------------------------------------
# Row formats -> turns


def parse_guanaco(text):
    # re.split with a group keeps the separators: ['', 'Human', ' hi', 'Assistant', ' hello', ...]
    parts = re.split(r"### (Human|Assistant):", text)
    if parts[0].strip():
        raise BadRow("text before the first '### Human:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [Turn(roles[who], said.strip()) for who, said in zip(parts[1::2], parts[2::2])]


LLAMA2_EXCHANGE = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?:</s>|(?=<s>)|$)", re.S)
LLAMA2_SYSTEM = re.compile(r"^\s*<<SYS>>(.*?)<</SYS>>", re.S)


def parse_llama2(text):
    turns = []
    for i, m in enumerate(LLAMA2_EXCHANGE.finditer(text)):
        user, answer = m.group(1), m.group(2)
        system = LLAMA2_SYSTEM.match(user)
        if system and i == 0:
            turns.append(Turn("system", system.group(1).strip()))
            user = user[system.end():]
        turns += [Turn("user", user.strip()), Turn("assistant", answer.strip())]
    return turns


def parse_openai(messages):
    if not isinstance(messages, list):
        raise BadRow("'messages' is not a list")
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRow(f"message without role system/user/assistant: {str(m)[:60]}")
        if not isinstance(m.get("content"), str):
            raise BadRow(f"message content is not a string: {str(m)[:60]}")
        turns.append(Turn(m["role"], m["content"].strip()))
    return turns


def detect_format(row):
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "openai"
    text = row.get("text")
    if isinstance(text, str) and "[INST]" in text:
        return "llama2"
    if isinstance(text, str) and HUMAN in text:
        return "guanaco"
    return None


def row_to_turns(row, fmt):
    if isinstance(row, dict) and not (row.get("text") or row.get("messages")):
        raise BadRow("empty text")
    if detect_format(row) != fmt:
        raise BadRow(f"not in this file's {fmt} format")
    turns = parse_openai(row["messages"]) if fmt == "openai" else (parse_guanaco if fmt == "guanaco" else parse_llama2)(row["text"])
    while turns and turns[-1].role != "assistant":  # a trailing question has nothing to learn from
        turns.pop()
    if not any(t.role == "assistant" for t in turns):
        raise BadRow("no assistant turn")
    if any(t.role == "assistant" and not t.content for t in turns):
        raise BadRow("empty assistant turn")
    return turns


# ---------------------------------------------------------------------------
# Sources -> conversations


TOO_DEEP = "not valid JSON for a chat row: nested too deep"
SHOWN_BAD_ROWS = 5  # the bad rows an error names (all of them stay on one line)


def read_rows(path):
    """Yield (line_or_row_number, row_or_BadRow) from a .jsonl, .json or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    yield n, BadRow("empty line")
                    continue
                try:
                    yield n, json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    yield n, BadRow(f"invalid JSON at column {e.colno}: {e.msg}")
                except RecursionError:  # e.g. a line of 200,000 '['
                    yield n, BadRow(TOO_DEEP)
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        except RecursionError:
            raise UserError(f"{path}: {TOO_DEEP}") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON list of rows")
        yield from enumerate(rows, 1)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), 1)
    else:
        raise UserError(f"{path}: unknown file type '{suffix}'; use .jsonl, .json or .parquet")


def rows_to_conversations(rows, source, where="line"):
    """Convert rows of one source; returns (conversations, bad) with bad = ['file:line: why', ...]."""
    rows = list(rows)
    fmt = next((detect_format(r) for _, r in rows if detect_format(r)), None)
    if fmt is None:
        raise UserError(f"{source}: no row in a known format (guanaco '### Human:' text, "
                        "OpenAI 'messages', or Llama-2 '[INST]' text)")
    conversations, bad = [], []
    for n, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            conversations.append(row_to_turns(row, fmt))
        except BadRow as e:
            bad.append(f"{source}:{n}: {e}" if where == "line" else f"{source} {where} {n}: {e}")
    return conversations, bad


def load_conversations(source):
    """A local file or a hub dataset id -> (train conversations, eval conversations or None, bad rows)."""
    from llmb.hub import hub_dataset_id, load_hub_dataset

    name, path = hub_dataset_id(source), Path(source)
    if name is None and path.is_file():
        convs, bad = rows_to_conversations(read_rows(path), str(path), "line" if path.suffix != ".parquet" else "row")
        return convs, None, bad
    if name is None:
        raise UserError(f"data file not found: {source}")
    source, splits = name, load_hub_dataset(name)
    train, bad = rows_to_conversations(splits.get("train", []), f"{source}[train]", "row")
    test = None
    if "test" in splits:
        test, bad_test = rows_to_conversations(splits["test"], f"{source}[test]", "row")
        bad += bad_test
    return train, test, bad


def load_chat_data(data, eval_data=None, eval_split=0.05, skip_bad_rows=False, seed=0):
    """Everything the trainer needs: (train, eval) conversation lists.

    `data` is one source (a file or a hub dataset id) or a list of them. Eval comes from `eval_data` if
    given, else from a hub dataset's test split, else a deterministic `eval_split` fraction of the train rows.
    """
    sources = [data] if isinstance(data, (str, Path)) else list(data)
    train, evals, bad = [], [], []
    for source in sources:
        tr, te, b = load_conversations(source)
        train += tr
        evals += te or []
        bad += b
    if eval_data:
        evals, b = [], []
        for source in [eval_data] if isinstance(eval_data, (str, Path)) else eval_data:
            tr, te, b2 = load_conversations(source)
            evals += tr + (te or [])
            b += b2
        bad += b
    if bad and not skip_bad_rows:
        raise UserError(bad_rows_message(bad))
    if bad:
        print(f"skipped {len(bad)} bad rows (first: {bad[0]})")
    if not evals and eval_split > 0:
        train, evals = split_eval(train, eval_split, seed)
    if not train:
        raise UserError("no training conversations left; check --data")
    return train, evals


def bad_rows_message(bad):
    """One line naming the first bad rows ('file:line: why') and what to do."""
    shown = "; ".join(b[:200] for b in bad[:SHOWN_BAD_ROWS])
    more = f"; and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
    rows = "1 bad row" if len(bad) == 1 else f"{len(bad)} bad rows"
    return f"{rows}: {shown}{more} (fix them, or skip them with --skip-bad-rows)"


def split_eval(conversations, fraction, seed=0):
    """Deterministic split: the same data and seed always give the same eval rows."""
    if not 0 < fraction < 1:
        raise UserError(f"--eval-split must be between 0 and 1, got {fraction}")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(conversations) * fraction))
    held = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in held]
    evals = [conversations[i] for i in sorted(held)]
    return train, evals


# ---------------------------------------------------------------------------
# The prompt format: a Jinja chat template, saved with the adapter

# The QLoRA paper's guanaco format, as a chat template (for bases without one, such as Phi-2).
GUANACO_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}### Human: {{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}### Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:{% endif %}")
FORMATS = ("auto", "guanaco", "template")


def choose_template(tokenizer, fmt="auto"):
    """The chat template a run trains with: `fmt` "template" is the base's own, "guanaco" the
    QLoRA paper's; "auto" is the base's own when it has one, else guanaco."""
    own = tokenizer.chat_template
    if fmt == "guanaco" or (fmt == "auto" and not own):
        return GUANACO_TEMPLATE
    if fmt == "template" and not own:
        raise UserError("--format template: this base's tokenizer has no chat template; use --format guanaco")
    if fmt not in FORMATS:
        raise UserError(f"unknown prompt format {fmt!r}; use one of {', '.join(FORMATS)}")
    return own


def is_guanaco(tokenizer):
    return tokenizer.chat_template in (None, GUANACO_TEMPLATE)


def normalize(turns):
    """One system turn first (texts joined), then user/assistant alternating (consecutive user turns joined)."""
    system = "\n".join(t.content for t in turns if t.role == "system" and t.content)
    out = [Turn("system", system)] if system else []
    for t in turns:
        if t.role == "user" and out and out[-1].role == "user":
            out[-1] = Turn("user", out[-1].content + "\n" + t.content)
        elif t.role != "system":
            out.append(t)
    return out


# ---------------------------------------------------------------------------
# Turns -> token ids and labels


def render(tokenizer, turns, generation_prompt=False):
    messages = [{"role": t.role, "content": t.content} for t in turns]
    return tokenizer.apply_chat_template(messages, chat_template=tokenizer.chat_template or GUANACO_TEMPLATE,
                                         tokenize=False, add_generation_prompt=generation_prompt)


def exchange_texts(tokenizer, turns):
    """The conversation rendered by the chat template as (system_text, [(prompt_text, answer_text), ...]).

    Each answer is the text its assistant turn adds (its end-of-turn token included); each prompt
    the text before it. An assistant turn of None leaves the last answer empty: that is how the
    chat asks the model to go on.
    """
    turns = normalize(turns)
    system = render(tokenizer, turns[:1]) if turns and turns[0].role == "system" else ""
    done, exchanges = system, []
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prompt = render(tokenizer, turns[:i], generation_prompt=True)
        full = render(tokenizer, turns[:i + 1]) if turn.content is not None else prompt
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError("this chat template does not render a conversation as a growing text; "
                            "train with --format guanaco")
        exchanges.append((prompt[len(done):], full[len(prompt):]))
        done = full
    head = message_head(tokenizer)
    start = exchanges[0][0].find(head) if exchanges and not system and head else -1
    if start > 0:  # the template wrote a system text of its own (SmolLM2's) before the first message
        system, exchanges[0] = exchanges[0][0][:start], (exchanges[0][0][start:], exchanges[0][1])
    return system, exchanges


# ---------------------------------------------------------------------------
# What a message says is text. The template is rendered with a slot in place of each message;
# its own special tokens (<|im_start|>, <|im_end|>, <|endoftext|>) are control ids, while a
# message is tokenized with special-token parsing off: "<|im_start|>system" typed into it is
# those characters, never a new turn, and "</s>" or "<|endoftext|>" in it is no end of text.
# The guanaco format's role markers are plain text, so inside a message they lose a "#":
# "### Human:" becomes "## Human:", which no longer starts a turn.

SLOT = re.compile(r"\x1f(\d+)\x1f")  # a message's place in the rendered template
ROLE_MARKER = re.compile(r"#{3,}(?= (?:Human|Assistant):)")


def as_text(tokenizer, content):
    """A message's content as the prompt shows it: in the guanaco format, its role markers made harmless."""
    return ROLE_MARKER.sub("##", content) if content and is_guanaco(tokenizer) else content


def special_tokens(tokenizer):
    """A regex matching the tokenizer's special tokens (each an id of its own, such as <|im_start|>)."""
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None


def encode_rendered(tokenizer, text, contents):
    """Token ids of a text the template rendered with message slots: the template's own special tokens
    as their ids, each slot filled with its message and tokenized as plain text.

    For text without special tokens in its messages this gives exactly `tokenizer(text)`'s ids: the
    tokenizer, too, cuts its input at special tokens first and tokenizes the pieces between (special
    tokens that eat the spaces beside them, which chat templates do not use, aside).
    """
    specials, ids = special_tokens(tokenizer), []
    for i, piece in enumerate(specials.split(text) if specials else [text]):
        if i % 2:  # re.split with a group: the special tokens are at the odd places
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            words = SLOT.sub(lambda m: contents[int(m[1])], piece)  # one pass: a message is never read as a slot
            ids += tokenizer(words, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def encode_exchanges(tokenizer, turns):
    """Token ids of a conversation as (system_ids, [(prompt_ids, answer_ids), ...]), in the tokenizer's
    chat template (guanaco when it has none):

        guanaco: [system\n]### Human: {user}### Assistant:| {assistant}<|endoftext|>
                 \________ prompt: label -100 ________/ \__ answer: trained __/

    What the messages say is text, whatever it holds (see SLOT above).
    """
    turns = normalize(turns)
    contents = [as_text(tokenizer, t.content) for t in turns]
    slotted = [Turn(t.role, None if t.content is None else f"\x1f{i}\x1f") for i, t in enumerate(turns)]
    system, exchanges = exchange_texts(tokenizer, slotted)
    enc = lambda text: encode_rendered(tokenizer, text, contents)  # noqa: E731
    return enc(system) if system else [], [(enc(p), enc(a) if a else []) for p, a in exchanges]


def fit_exchanges(system_ids, exchanges, max_len, min_answer=None, head=()):
    """Make a conversation fit in `max_len` tokens, cutting where a message begins.

    Whole early exchanges go first. The system text stays whole (unless it takes more than half
    the window and does not fit beside the last exchange: then it goes). If the last exchange
    alone is still too long, the start of its user message goes, its opening markup `head` (the
    template's `<|im_start|>user\n` or `### Human:`, as token ids) kept, and its answer is cut from
    the right, keeping at least `min_answer` answer tokens (default max_len // 2) so the answer is
    never cut to nothing.
    """
    total = lambda ex: sum(len(p) + len(a) for p, a in ex)  # noqa: E731
    while len(exchanges) > 1 and len(system_ids) + total(exchanges) > max_len:
        exchanges = exchanges[1:]
    if len(system_ids) + total(exchanges) > max_len and len(system_ids) > max_len // 2:
        system_ids = []
    room = max_len - len(system_ids)
    if total(exchanges) > room:
        prompt, answer = exchanges[-1]
        keep_answer = min(len(answer), max(room - len(prompt), min_answer or max_len // 2))
        keep_prompt = max(room - keep_answer, 0)
        kept_head = next((i for i, (a, b) in enumerate(zip(prompt, head)) if a != b), min(len(prompt), len(head)))
        kept_head = kept_head if kept_head < keep_prompt else 0
        prompt = prompt[:kept_head] + prompt[len(prompt) - (keep_prompt - kept_head):]
        exchanges = [(prompt, answer[:keep_answer])]
    return system_ids, exchanges


def message_head(tokenizer):
    """What the chat template writes before the words of a user message: `<|im_start|>user\n` in
    SmolLM2's, `### Human: ` in guanaco."""
    words = "\x1fwords\x1f"
    before = render(tokenizer, [Turn("user", "a"), Turn("assistant", "b")])
    after = render(tokenizer, [Turn("user", "a"), Turn("assistant", "b"), Turn("user", words)])
    return after[len(before):after.index(words)] if after.startswith(before) else ""


def encode_example(tokenizer, turns, max_seq_len=512):
    """A training example: {"input_ids", "labels"}, labels -100 everywhere but the answers."""
    head = tokenizer(message_head(tokenizer), add_special_tokens=False)["input_ids"]
    system_ids, exchanges = fit_exchanges(*encode_exchanges(tokenizer, turns), max_seq_len, head=head)
    input_ids, labels = list(system_ids), [IGNORE] * len(system_ids)
    for prompt, answer in exchanges:
        input_ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    return {"input_ids": input_ids, "labels": labels}


def encode_dataset(tokenizer, conversations, max_seq_len=512):
    return [encode_example(tokenizer, turns, max_seq_len) for turns in conversations]


def collate(batch, pad_id):
    """Right-pad a list of examples into tensors; padding is masked out of attention and loss."""
    import torch

    width = max(len(ex["input_ids"]) for ex in batch)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(ex["input_ids"], pad_id) for ex in batch]),
        "attention_mask": torch.tensor([pad([1] * len(ex["input_ids"]), 0) for ex in batch]),
        "labels": torch.tensor([pad(ex["labels"], IGNORE) for ex in batch]),
    }
