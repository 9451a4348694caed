"""The assistant on a real trained model: SmolLM2-135M-Instruct (conftest's small_assistant)."""

import pytest
import torch

from llmb.assistant.data import Turn, encode_example
from llmb.assistant.engine import ChatEngine
from llmb.assistant.loading import load_chat_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_engine(small_assistant):
    return ChatEngine(str(small_assistant), device="cpu")


def test_base_answers_a_factual_question_greedily(base_engine):
    answer = base_engine.stream([], "What is the capital of France?", temperature=0, max_new_tokens=30)
    text = "".join(answer)
    assert "Paris" in text and answer.stats["stopped_by"] == "eos"
    assert base_engine.markers == ()  # its own chat template: it ends its turn with <|im_end|>


def test_own_chat_template_gives_the_training_ids(small_assistant, small_adapter):
    adapter, _ = small_adapter
    tokenizer = load_chat_tokenizer(str(small_assistant), str(adapter))
    turns = [Turn("user", "Hi!"), Turn("assistant", "Hello, how can I help?"), Turn("user", "Name a colour."),
             Turn("assistant", "Blue.")]
    ids = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], return_dict=False)
    assert ids == encode_example(tokenizer, turns, 10_000)["input_ids"]


def test_short_fine_tune_lowers_held_out_loss(small_assistant, small_adapter):
    from llmb.assistant.train import chat_eval

    adapter, held_out = small_adapter
    before = chat_eval(str(small_assistant), [str(held_out)], max_seq_len=96)
    after = chat_eval(str(small_assistant), [str(held_out)], adapter=str(adapter), max_seq_len=96)
    print(f"held-out loss before {before['loss']:.4f}, after {after['loss']:.4f} ({before['tokens']} tokens)")
    assert before["rows"] == after["rows"] == 8 and before["tokens"] == after["tokens"] > 200
    assert after["loss"] < before["loss"] - 0.01


def test_fine_tuned_answer_keeps_the_format_and_stops_by_itself(small_assistant, small_adapter):
    adapter, _ = small_adapter
    engine = ChatEngine(str(small_assistant), adapter=str(adapter), device="cpu")
    answer = engine.stream([], "What is the capital of France?", temperature=0, max_new_tokens=60)
    text = "".join(answer)
    print(f"fine-tuned answer: {text!r}")
    assert answer.stats["stopped_by"] == "eos" and answer.stats["adapter"] is True
    assert text.strip() and not any(m in text for m in ("### Human", "<|im_start|>", "<|im_end|>", "user\n"))


def test_merge_gives_the_same_logits_as_base_plus_adapter(small_assistant, small_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmb.assistant.loading import load_base_model
    from llmb.assistant.merge import merge

    adapter, _ = small_adapter
    ids = torch.randint(0, 49000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = PeftModel.from_pretrained(load_base_model(str(small_assistant), "none", "cpu"), adapter).eval()
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        merge(str(small_assistant), str(adapter), tmp_path / "merged", dtype="float32")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
    change = (adapted - base).abs().max()
    assert change > 1e-2  # the adapter changes the model ...
    # ... and the merged weights do the same, to fp32 rounding (summed in another order: ~1e-4 on AVX-512)
    assert (merged - adapted).abs().max() < 0.01 * change
