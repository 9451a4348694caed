import json
import re

import pytest
from transformers import AutoTokenizer

from llmb.assistant.data import (
    IGNORE,
    Turn,
    encode_example,
    load_chat_data,
    load_conversations,
    parse_guanaco,
    parse_llama2,
    split_eval,
)
from llmb.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(repo_data):
    return AutoTokenizer.from_pretrained(repo_data / "phi-2-tokenizer")


@pytest.fixture(scope="module")
def guanaco_rows(repo_data):
    path = repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def render_guanaco(turns):
    return "".join(f"### {'Human' if t.role == 'user' else 'Assistant'}: {t.content}" for t in turns)


def test_guanaco_file_parses_to_alternating_turns(repo_data, guanaco_rows):
    convs, evals, bad = load_conversations(repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl")
    assert len(convs) == len(guanaco_rows) == 518 and evals is None and bad == []
    for text, turns in zip(guanaco_rows, convs):
        roles = [t.role for t in turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert roles.count("assistant") == text.count("### Assistant:")
    # rows that end with an answer render back to the same text (whitespace around markers aside)
    squash = lambda s: re.sub(r"\s*(### (?:Human|Assistant):)\s*", r"\1 ", s).strip()  # noqa: E731
    complete = [(t, c) for t, c in zip(guanaco_rows, convs) if t.count("### Human:") == t.count("### Assistant:")]
    assert len(complete) > 300
    assert all(squash(render_guanaco(c)) == squash(t) for t, c in complete)


def test_guanaco_trailing_question_is_dropped():
    turns = parse_guanaco("### Human: a?### Assistant: b.### Human: c?")
    assert turns == [Turn("user", "a?"), Turn("assistant", "b."), Turn("user", "c?")]  # parse keeps it ...
    convs, _ = load_chat_data_rows([{"text": "### Human: a?### Assistant: b.### Human: c?"}])
    assert convs[0] == [Turn("user", "a?"), Turn("assistant", "b.")]  # ... the loader drops it


def load_chat_data_rows(rows, tmp_path=None):
    from llmb.assistant.data import rows_to_conversations

    return rows_to_conversations(list(enumerate(rows, 1)), "rows")


def test_llama2_parquet_and_jsonl_agree_and_keep_multiturn(repo_data):
    a, _, bad_a = load_conversations(repo_data / "guanaco" / "guanaco-llama2-1k_train.parquet")
    b, _, bad_b = load_conversations(repo_data / "guanaco" / "guanaco-llama2-1k_train.jsonl")
    assert a == b and len(a) == 999
    g = repo_data / "guanaco"
    assert bad_a == [f"{g / 'guanaco-llama2-1k_train.parquet'} row 900: empty assistant turn"]
    assert bad_b == [f"{g / 'guanaco-llama2-1k_train.jsonl'}:900: empty assistant turn"]
    assert sum(1 for c in a if sum(t.role == "user" for t in c) > 1) >= 350  # README: 353 multi-turn rows
    assert all(not any(s in t.content for s in ("[INST]", "[/INST]", "</s>", "<s>")) for c in a for t in c)


def test_llama2_system_and_multiturn():
    text = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST] Ciao. </s>"
    assert parse_llama2(text) == [Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello."),
                                  Turn("user", "Bye"), Turn("assistant", "Ciao.")]


def test_openai_messages_match_guanaco(tmp_path, guanaco_rows):
    convs = [parse_guanaco(t) for t in guanaco_rows[:20]]
    convs = [c for c in convs if c[-1].role == "assistant"]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n"
                            for turns in convs), encoding="utf-8")
    got, _, bad = load_conversations(path)
    assert got == convs and bad == []
    as_json = tmp_path / "chat.json"
    as_json.write_text(json.dumps([{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]}]), encoding="utf-8")
    assert load_conversations(as_json)[0] == [[Turn("system", "S"), Turn("user", "q"), Turn("assistant", "a")]]


def test_bad_rows_are_listed_with_line_numbers(tmp_path, capsys):
    good = json.dumps({"text": "### Human: hi### Assistant: hello"})
    lines = [good, "{not json", json.dumps({"text": "### Human: only a question"}), json.dumps({"text": ""}), good]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_chat_data(path, eval_split=0.5)
    msg = str(e.value)
    assert msg.startswith("3 bad rows") and "--skip-bad-rows" in msg
    assert f"{path}:2: invalid JSON" in msg and f"{path}:3: no assistant turn" in msg and f"{path}:4: empty text" in msg
    train, evals = load_chat_data(path, eval_split=0.5, skip_bad_rows=True)
    assert len(train) + len(evals) == 2
    assert "skipped 3 bad rows" in capsys.readouterr().out


def test_real_bad_row_in_llama2_file(repo_data):
    path = repo_data / "guanaco" / "guanaco-llama2-1k_train.jsonl"
    with pytest.raises(UserError, match=re.escape(f"{path}:900: empty assistant turn")):
        load_chat_data(path)


def test_unknown_format_and_missing_file(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="no row in a known format"):
        load_chat_data(path)
    with pytest.raises(UserError, match="data file not found"):
        load_chat_data(tmp_path / "missing.jsonl")


def test_eval_split_is_deterministic(repo_data):
    convs, _, _ = load_conversations(repo_data / "guanaco" / "openassistant_best_replies_eval.jsonl")
    train1, eval1 = split_eval(convs, 0.1, seed=0)
    train2, eval2 = split_eval(convs, 0.1, seed=0)
    _, eval3 = split_eval(convs, 0.1, seed=1)
    assert (train1, eval1) == (train2, eval2) and eval1 != eval3
    assert len(eval1) == 52 and len(train1) + len(eval1) == len(convs)
    assert not any(c in train1 for c in eval1[:10])


def test_separate_eval_file(repo_data):
    g = repo_data / "guanaco"
    train, evals = load_chat_data(g / "guanaco-llama2-1k_train.parquet", eval_data=g / "openassistant_best_replies_eval.jsonl",
                                  skip_bad_rows=True)
    assert len(train) == 999 and len(evals) == 518


def label_runs(example):
    """Contiguous stretches of trained-on tokens."""
    runs, run = [], []
    for tok, lab in zip(example["input_ids"], example["labels"]):
        if lab != IGNORE:
            assert lab == tok
            run.append(tok)
        elif run:
            runs, run = runs + [run], []
    return runs + ([run] if run else [])


def test_labels_decode_back_to_the_assistant_text(tokenizer, guanaco_rows):
    multi = [c for c in map(parse_guanaco, guanaco_rows) if c[-1].role == "assistant" and len(c) >= 4][:15]
    assert len(multi) == 15
    for turns in multi:
        ex = encode_example(tokenizer, turns, max_seq_len=100_000)
        answers = [t.content for t in turns if t.role == "assistant"]
        decoded = [tokenizer.decode(run, clean_up_tokenization_spaces=False) for run in label_runs(ex)]
        assert decoded == [f" {a}<|endoftext|>" for a in answers]
        prompt = "".join(f"### Human: {u.content}### Assistant: {a.content}<|endoftext|>" for u, a in zip(turns[::2], turns[1::2]))
        assert tokenizer.decode(ex["input_ids"], clean_up_tokenization_spaces=False) == prompt


def test_truncation_drops_early_turns_first(tokenizer):
    long = "word " * 60
    turns = []
    for i in range(4):
        turns += [Turn("user", f"question {i} {long}"), Turn("assistant", f"answer {i} is short.")]
    full = encode_example(tokenizer, turns, max_seq_len=100_000)
    ex = encode_example(tokenizer, turns, max_seq_len=150)
    assert len(full["input_ids"]) > 150 >= len(ex["input_ids"])
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith("### Human: question") and "answer 3 is short.<|endoftext|>" in text
    assert "answer 0" not in text  # the oldest exchanges went, whole
    assert [tokenizer.decode(r) for r in label_runs(ex)][-1] == " answer 3 is short.<|endoftext|>"


def test_truncation_never_cuts_the_last_answer_to_nothing(tokenizer):
    turns = [Turn("user", "tell me " * 300), Turn("assistant", "sure " * 300)]
    ex = encode_example(tokenizer, turns, max_seq_len=128)
    assert len(ex["input_ids"]) == 128
    answer_tokens = sum(lab != IGNORE for lab in ex["labels"])
    assert answer_tokens == 64  # half the window goes to the answer
    assert tokenizer.decode(ex["input_ids"]).endswith("### Assistant: sure" + " sure" * 63)
    short = encode_example(tokenizer, [Turn("user", "tell me " * 300), Turn("assistant", "ok")], max_seq_len=128)
    assert len(short["input_ids"]) == 128 and tokenizer.decode(short["input_ids"]).endswith("### Assistant: ok<|endoftext|>")


# a ChatML template that writes its own system text when the conversation has none, as SmolLM2's does
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
SMOL_TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}" + SMOL_SYSTEM +
                 "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_truncation_keeps_the_templates_system_text_whole(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", SMOL_TEMPLATE)
    one = [Turn("user", "Tell me about " + "the long history of things " * 40), Turn("assistant", "Sure. " * 100)]
    assert encode_example(tokenizer, one, 100_000)["input_ids"] == tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in one], return_dict=False)  # nothing cut: as the template
    ex = encode_example(tokenizer, one, max_seq_len=128)
    text = tokenizer.decode(ex["input_ids"])
    assert len(ex["input_ids"]) == 128 and sum(lab != IGNORE for lab in ex["labels"]) == 64
    # the system text whole, then the user message's opening: only the start of its words went
    assert text.startswith(SMOL_SYSTEM + "<|im_start|>user\n") and "Tell me" not in text
    assert "history of things <|im_end|>\n<|im_start|>assistant\nSure. Sure." in text

    many = []
    for i in range(4):
        many += [Turn("user", f"question {i} " + "word " * 60), Turn("assistant", f"answer {i} is short.")]
    text = tokenizer.decode(encode_example(tokenizer, many, max_seq_len=200)["input_ids"])
    assert text.startswith(SMOL_SYSTEM + "<|im_start|>user\nquestion 3 word")  # whole exchanges went
    assert text.endswith("answer 3 is short.<|im_end|>\n")


def test_system_text_is_prompt_not_target(tokenizer):
    ex = encode_example(tokenizer, [Turn("system", "Be kind."), Turn("user", "hi"), Turn("assistant", "hello")], 512)
    assert tokenizer.decode(ex["input_ids"]) == "Be kind.\n### Human: hi### Assistant: hello<|endoftext|>"
    assert [tokenizer.decode(r) for r in label_runs(ex)] == [" hello<|endoftext|>"]


def test_guanaco_chat_template_gives_the_training_ids(tokenizer, guanaco_rows):
    from llmb.assistant.data import GUANACO_TEMPLATE, choose_template

    assert choose_template(tokenizer) == GUANACO_TEMPLATE  # Phi-2 has no chat template of its own
    with pytest.raises(UserError, match="no chat template"):
        choose_template(tokenizer, "template")
    tokenizer.chat_template = GUANACO_TEMPLATE  # as saved with an adapter
    try:
        convs = [c for c in map(parse_guanaco, guanaco_rows[:40]) if c[-1].role == "assistant"]
        for turns in [[Turn("system", "Be kind.")] + convs[0]] + convs:
            ids = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], return_dict=False)
            assert ids == encode_example(tokenizer, turns, 100_000)["input_ids"]
    finally:
        tokenizer.chat_template = None


def test_invalid_json_row_names_the_column_not_the_newline(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "### Human: hi### Assistant: yo"}) + "\n" + '{"text": "### Human: hi\n',
                    encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_chat_data(path, eval_split=0)
    assert f"{path}:2: invalid JSON at column 10: Unterminated string" in str(e.value)
    assert "control character" not in str(e.value)


def test_a_line_nested_too_deep_is_a_bad_row_not_a_recursion_error(tmp_path):
    good = json.dumps({"text": "### Human: hi### Assistant: hello"})
    path = tmp_path / "deep.jsonl"
    path.write_text(good + "\n" + "[" * 200_000 + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"1 bad row: {path}:2: not valid JSON for a chat row: nested too "
                                                  "deep (fix them, or skip them with --skip-bad-rows)")):
        load_chat_data(path)
    assert len(load_chat_data(path, eval_split=0, skip_bad_rows=True)[0]) == 2
    whole = tmp_path / "deep.json"
    whole.write_text("[" * 200_000, encoding="utf-8")
    with pytest.raises(UserError, match="deep.json: not valid JSON for a chat row: nested too deep"):
        load_chat_data(whole)


def test_bad_rows_are_named_on_one_line(tmp_path):
    path = tmp_path / "many.jsonl"
    good = json.dumps({"text": "### Human: hi### Assistant: hello"})
    path.write_text("\n".join(["{not json"] * 8 + [good]) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_chat_data(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"8 bad rows: {path}:1: invalid JSON")
    assert f"{path}:5: invalid JSON" in msg and f"{path}:6:" not in msg and "; and 3 more" in msg
