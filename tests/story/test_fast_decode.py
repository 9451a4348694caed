import logging

import pytest
import torch

import llmb.story.fast_decode as fast_decode
from llmb.story.fast_decode import decode_next, decoder_for
from tests.story.test_model import tiny


def forward_one_by_one(model, seq, prompt_len):
    """The reference: GPT.forward over the prompt with a KV cache, then over each new token with it."""
    cache = model.new_cache()
    logits = [model(seq[:, :prompt_len], cache=cache)[0][0, -1]]
    logits += [model(seq[:, t:t + 1], cache=cache)[0][0, -1] for t in range(prompt_len, seq.size(1))]
    return torch.stack(logits)


def decode_all(model, seq, prompt_len):
    """Logits for seq[prompt_len - 1:] the way sampling gets them: a forward over the prompt, then decode_next."""
    cache = model.new_cache()
    logits = [model(seq[:, :prompt_len], cache=cache)[0][0, -1]]
    logits += [decode_next(model, int(t), cache) for t in seq[0, prompt_len:]]
    return torch.stack(logits)


def test_compiled_decoder_matches_full_recompute_past_block_size():
    for bias in (False, True):
        model = tiny(block_size=8, bias=bias)
        seq = torch.randint(0, 23, (1, 40))
        full, _ = model(seq)
        torch.testing.assert_close(decode_all(model, seq, 11), full[0, 10:], rtol=1e-10, atol=1e-10)
        assert isinstance(decoder_for(model), torch.jit.ScriptModule)  # the fast path is the one taken
        assert set(model.state_dict()) == set(tiny(block_size=8, bias=bias).state_dict())  # never saved


def test_decoder_follows_weight_updates_and_swapped_layers():
    from llmb.quantize import quantize_linears_int8

    model = tiny(block_size=8, dtype=torch.float32)
    seq = torch.randint(0, 23, (1, 20))
    decode_all(model, seq, 3)  # builds the decoder
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight.mul_(3)  # as an optimizer step does, in place
    torch.testing.assert_close(decode_all(model, seq, 3), model(seq)[0][0, 2:])
    quantize_linears_int8(model)  # new layers: the decoder is rebuilt on them
    with torch.inference_mode():  # int8 activations are scaled per call: compare with forward token by token
        cache = model.new_cache()
        int8_forward = [model(seq[:, :3], cache=cache)[0][0, -1]]
        int8_forward += [model(seq[:, t:t + 1], cache=cache)[0][0, -1] for t in range(3, 20)]
        torch.testing.assert_close(decode_all(model, seq, 3), torch.stack(int8_forward), rtol=1e-5, atol=1e-5)
    assert isinstance(decoder_for(model), torch.jit.ScriptModule)


def test_threads_decoding_at_once_share_one_compiled_decoder():
    from concurrent.futures import ThreadPoolExecutor

    model = tiny(block_size=8)
    seqs = [torch.randint(0, 23, (1, 30)) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:  # as the app's story lane does: the first calls race to build it
        results = list(pool.map(lambda seq: decode_all(model, seq, 5), seqs))
    for seq, got in zip(seqs, results):
        torch.testing.assert_close(got, model(seq)[0][0, 4:], rtol=1e-10, atol=1e-10)
    assert isinstance(decoder_for(model), torch.jit.ScriptModule)


@pytest.mark.parametrize("scripted", [True, False])
def test_the_decoder_gives_the_cached_forwards_logits_compiled_or_not(monkeypatch, scripted):
    if not scripted:  # the fallback: the same Decoder, run from Python
        monkeypatch.setattr(fast_decode, "compiled", lambda decoder: decoder)
    for bias in (False, True):
        model = tiny(block_size=8, bias=bias)
        seq = torch.randint(0, 23, (1, 30))
        torch.testing.assert_close(decode_all(model, seq, 3), forward_one_by_one(model, seq, 3), rtol=0, atol=1e-12)
        assert isinstance(decoder_for(model), torch.jit.ScriptModule) is scripted


def test_a_decoder_torchscript_cannot_compile_runs_from_python_and_says_so(monkeypatch, caplog):
    def fails(module):
        raise RuntimeError("Unknown builtin op: aten::something\nlong TorchScript trace")

    monkeypatch.setattr(fast_decode.torch.jit, "script", fails)
    model = tiny(block_size=8)
    seq = torch.randint(0, 23, (1, 20))
    with caplog.at_level(logging.WARNING, logger="llmb.story.fast_decode"):
        got = decode_all(model, seq, 3)
        decode_all(model, seq, 3)  # built once: one warning
    torch.testing.assert_close(got, model(seq)[0][0, 2:], rtol=1e-10, atol=1e-10)
    assert not isinstance(decoder_for(model), torch.jit.ScriptModule)
    assert [r.getMessage() for r in caplog.records] == [
        "TorchScript could not compile the story decoder (RuntimeError: Unknown builtin op: aten::something); "
        "sampling runs it from Python: the same text, slower"]
