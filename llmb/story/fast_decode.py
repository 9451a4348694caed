"""Fast sampling of the story model: a compiled decoder for each new token, and int8 weights on a CPU.

`GPT.forward(cache=...)` is the one reference for the logits of a token after the cached ones;
everything here computes the same logits faster (tests/story/test_fast_decode.py compares them).

Decoding a token runs a few hundred tiny tensor operations. Called from Python, each costs
microseconds of interpreter and dispatch overhead, which is most of a story token's time on a CPU;
`Decoder` is the same computation for one token, compiled by TorchScript so that its operations
are called from C++. Decoding also reads every weight once per token, so on a CPU int8 weights
(a quarter of fp32's bytes; llmb.quantize, shared with the assistant) make it faster again.
Figures for both: docs/results.md.

Both rest on APIs PyTorch has deprecated (TorchScript; torch.ao's dynamic quantization). Where
TorchScript is missing or fails, the Decoder runs from Python (the same logits, only slower), and
a warning in the log says so.
"""

import logging
import threading
import warnings
import weakref
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmb.story.model import apply_rotary

log = logging.getLogger(__name__)
_COMPILING = threading.Lock()
_DECODERS = weakref.WeakKeyDictionary()  # model -> (the layers its Decoder was built on, the Decoder)


class DecodeBlock(nn.Module):
    """Block.forward for one new token (batch 1) with a KV cache, written for TorchScript.

    It holds the Block's own layers (fp32 nn.Linear or int8), so the weights are shared, not copied.
    x: (1, n_embd); k_cache, v_cache: this layer's (1, nh, block_size, hd) ring (see KVCache);
    the new token goes to `slot`, and attends to the first n slots.
    """

    def __init__(self, block):
        super().__init__()
        self.ln_1, self.c_attn, self.attn_proj = block.ln_1, block.attn.c_attn, block.attn.c_proj
        self.ln_2, self.c_fc, self.mlp_proj = block.ln_2, block.mlp.c_fc, block.mlp.c_proj
        self.n_head = block.attn.n_head

    def forward(self, x, k_cache, v_cache, cos, sin, slot: int, n: int):
        C = x.size(-1)
        hd = C // self.n_head
        qkv = self.c_attn(self.ln_1(x)).view(3, self.n_head, 1, hd)
        qk = apply_rotary(qkv[:2], cos, sin)
        k_cache[0, :, slot] = qk[1, :, 0]
        v_cache[0, :, slot] = qkv[2, :, 0]
        y = F.scaled_dot_product_attention(qk[:1], k_cache[:, :, :n], v_cache[:, :, :n])
        x = x + self.attn_proj(y.view(1, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class Decoder(nn.Module):
    """GPT.forward for one new token with a KVCache: the inner loop of sampling."""

    def __init__(self, model):
        super().__init__()
        self.wte, self.ln_f, self.lm_head = model.wte, model.ln_f, model.lm_head
        self.h = nn.ModuleList(DecodeBlock(block) for block in model.h)

    def forward(self, idx, k: List[torch.Tensor], v: List[torch.Tensor], cos, sin, slot: int, n: int):
        x = self.wte(idx)
        for i, block in enumerate(self.h):
            x = block(x, k[i], v[i], cos, sin, slot, n)
        return self.lm_head(self.ln_f(x))


def decoder_for(model):
    """The Decoder of the model's current layers, compiled once (again if layers were swapped, e.g. for int8).

    Kept beside the model, not in it: not a submodule, never saved with the weights.
    """
    layers = tuple((id(m), type(m)) for m in model.modules())
    with _COMPILING:  # the app samples in several threads; compile once, not concurrently
        built = _DECODERS.get(model)
        if built is None or built[0] != layers:
            built = _DECODERS[model] = (layers, compiled(Decoder(model)))
        return built[1]


def compiled(decoder):
    """The decoder compiled by TorchScript; where that fails, the decoder itself, and a warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice
            return torch.jit.script(decoder)
    except Exception as e:  # TorchScript is deprecated: any version may fail to compile, in any way
        log.warning("TorchScript could not compile the story decoder (%s: %s); sampling runs it from Python: "
                    "the same text, slower", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return decoder


def decode_next(model, token, cache, decoder=None):
    """Logits (vocab_size,) for one token (an int) after the cached ones, updating the cache:
    model(tensor([[token]]), cache=cache)[0][0, -1], through the compiled Decoder (pass
    `decoder=decoder_for(model)` when decoding many tokens: finding it costs a walk over the layers)."""
    S, pos = cache.block_size, cache.pos
    like = cache.k[0]  # the cache is filled by a forward over the prompt first
    cos, sin = model.rope(pos, 1, like)
    decoder = decoder_for(model) if decoder is None else decoder
    logits = decoder(torch.tensor([token], device=like.device), cache.k, cache.v, cos.view(-1), sin.view(-1),
                     pos % S, min(pos + 1, S))
    cache.pos += 1
    return logits[0]


def fast_to_sample(model, int8):
    """The model ready to sample fast: int8 linear layers if asked (on a CPU; llmb.quantize.wants_int8 says
    when), and its Decoder compiled now, with the loading."""
    if int8:
        from llmb.quantize import quantize_linears_int8

        model = quantize_linears_int8(model).eval()
    decoder_for(model)
    return model
