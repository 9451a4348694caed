import pytest
import torch
import torch.nn.functional as F

import llmb.quantize
from llmb.errors import UserError
from llmb.quantize import is_int8, quantize_linears_int8, wants_int8
from llmb.story.model import GPT, GPTConfig
from llmb.story.sample import generate_ids


def test_int8_linears_keep_the_predictions():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=64)).eval()
    copy = GPT(model.config)
    copy.load_state_dict(model.state_dict())
    int8 = quantize_linears_int8(copy).eval()
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == 2 * 4 + 1  # 4 per block + lm_head

    x = torch.randint(0, 50, (4, 32))
    with torch.no_grad():
        ref, q = model(x)[0], int8(x)[0]
    kl = F.kl_div(q.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean") / 32
    assert kl < 1e-3  # nats per token
    assert (ref.argmax(-1) == q.argmax(-1)).float().mean() > 0.95
    assert 0 < (ref - q).abs().mean() / ref.std() < 0.05  # changed, but only a little
    # and it samples through the same generate, KV cache and all
    assert len(list(generate_ids(int8, [1, 2, 3], 40, temperature=0))) == 40


def test_the_direct_int8_forward_gives_exactly_the_stock_forward():
    from torch.ao.nn.quantized.dynamic import Linear as StockInt8Linear

    torch.manual_seed(0)
    model = quantize_linears_int8(GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=64)))
    x = torch.randn(3, 5, 64)
    for layer in (model.h[0].attn.c_attn, model.h[0].mlp.c_fc):
        assert torch.equal(layer(x), StockInt8Linear.forward(layer, x))


def test_without_torch_ao_the_model_stays_fp32_with_one_note(monkeypatch, capsys):
    from torch.ao.nn.quantized.dynamic import Linear as StockInt8Linear

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=64)).eval()
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ref = model(x)[0]

    def removed(*args, **kwargs):
        raise RuntimeError("quantized engine gone")

    monkeypatch.setattr(StockInt8Linear, "from_float", classmethod(removed))  # the API raises
    assert quantize_linears_int8(model) is model and not is_int8(model)
    monkeypatch.setattr(llmb.quantize, "direct_int8_linear", lambda: None)  # the API is missing
    assert quantize_linears_int8(model) is model and not is_int8(model)
    assert not wants_int8("auto", "cpu")  # auto then asks for fp32 and prints nothing
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "RuntimeError: quantized engine gone" in err[0] and "ImportError" in err[1]
    assert all(e.startswith("note: no int8 layers in this PyTorch") and e.endswith("the model stays fp32") for e in err)
    with torch.no_grad():
        assert torch.equal(model(x)[0], ref)


def test_precision_choice():
    assert wants_int8("auto", "cpu") and wants_int8("int8", "cpu")
    assert not wants_int8("auto", "cpu", auto=False) and wants_int8("int8", "cpu", auto=False)  # the assistant
    assert not wants_int8("fp32", "cpu") and not wants_int8("auto", "cuda")
    for precision, device, message in [("bf16", "cpu", "unknown precision 'bf16'"), ("int8", "cuda", "for the CPU")]:
        with pytest.raises(UserError, match=message):
            wants_int8(precision, device)
