import torch

from llmb.story.model import GPT, GPTConfig
from llmb.story.sample import filter_logits, generate, generate_ids
from llmb.story.tokenizer import CharTokenizer


def tiny_model(block_size=8, vocab=20):
    """A random model with large weights, so its greedy choice depends on the context."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=16)).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model


def test_greedy_with_cache_equals_full_recompute_past_block_size():
    model = tiny_model(block_size=8)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]  # longer than block_size already
    cached = list(generate_ids(model, prompt, 40, temperature=0, use_cache=True))
    full = list(generate_ids(model, prompt, 40, temperature=0, use_cache=False))
    assert cached == full
    assert len(set(cached)) > 1


def test_seeded_sampling_repeats_and_differs_by_seed():
    model = tiny_model()
    a = list(generate_ids(model, [1, 2], 30, temperature=1.0, seed=7))
    b = list(generate_ids(model, [1, 2], 30, temperature=1.0, seed=7))
    c = list(generate_ids(model, [1, 2], 30, temperature=1.0, seed=8))
    assert a == b and a != c


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [True, True, False, False, False]
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [True, True, True, False, False]  # 0.5 + 0.2 < 0.8, + 0.15 reaches it
    kept = torch.isfinite(filter_logits(logits, top_p=0.01))
    assert kept.tolist() == [True, False, False, False, False]
    for _ in range(20):
        assert next(generate_ids(tiny_model(vocab=5), [0], 1, temperature=1.0, top_k=1)) == \
            next(generate_ids(tiny_model(vocab=5), [0], 1, temperature=0))


def test_generate_streams_text_and_survives_unknown_characters():
    tok = CharTokenizer(list("abcdefghij klmnopqrst"))
    model = tiny_model(vocab=tok.vocab_size)
    pieces = list(generate(model, tok, "abc \u2603 xyz", max_new_tokens=25, seed=0))
    assert len(pieces) == 25 and all(len(p) == 1 for p in pieces)
    assert set("".join(pieces)) <= set(tok.chars)
    assert tok.unknown("abc \u2603 xyz") == ["\u2603", "x", "y", "z"]


def test_streamed_pieces_add_up_to_the_generated_text_across_lines():
    tok = CharTokenizer(list("ab\ncd e"))
    model = tiny_model(vocab=tok.vocab_size)
    ids = list(generate_ids(model, tok.encode("ab"), 300, temperature=1.0, seed=3))
    pieces = list(generate(model, tok, "ab", max_new_tokens=300, temperature=1.0, seed=3))
    assert "".join(pieces) == tok.decode(ids) and tok.decode(ids).count("\n") > 5


def test_should_stop_stops_at_once():
    model = tiny_model()
    produced = []
    for token in generate_ids(model, [1], 100, should_stop=lambda: len(produced) >= 5):
        produced.append(token)
    assert len(produced) == 5


def test_nonsense_settings_are_one_clear_error():
    import pytest

    from llmb.errors import UserError

    model = tiny_model()
    for bad, message in [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top-k"),
                         (dict(top_p=1.5), "top-p"), (dict(max_new_tokens=0), "max new tokens"),
                         (dict(temperature=float("nan")), "temperature")]:
        settings = {"max_new_tokens": 5, **bad}
        with pytest.raises(UserError, match=message):
            list(generate_ids(model, [1], **settings))


def test_streaming_a_byte_level_tokenizer_never_shows_half_a_character(repo_data, monkeypatch):
    import llmb.story.sample as sample
    from llmb.story.tokenizer import SubwordTokenizer

    tok = SubwordTokenizer.from_pretrained(str(repo_data / "phi-2-tokenizer"))
    ids = tok.encode("The wizard said,\n\n  \u201cSnow \u2603 falls on the caf\u00e9.\u201d\nEnd")
    monkeypatch.setattr(sample, "generate_ids", lambda *args, **kw: iter(ids))  # stands in for the model's choices
    pieces = list(sample.generate(None, tok, "x", len(ids)))
    assert "".join(pieces) == tok.decode(ids) and not any("\ufffd" in p for p in pieces)
    monkeypatch.setattr(sample, "generate_ids", lambda *args, **kw: iter(ids[:7]))  # stops inside the quote mark's bytes
    assert "".join(sample.generate(None, tok, "x", 7)) == tok.decode(ids[:7])
