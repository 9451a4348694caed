"""A decoder-only transformer (GPT), written from scratch.

The lineage is the build-GPT lecture and nanoGPT: token embedding, a stack of pre-norm
blocks (causal self-attention + MLP), a final LayerNorm and a linear head tied to the
embedding. Positions are encoded with rotary embeddings (RoPE, Su et al. 2021), so attention
scores depend only on the distance between tokens.

Text longer than `block_size` is handled with sliding-window attention (as in Longformer and
Mistral): every token attends to itself and the block_size - 1 tokens before it, in every
layer. Training windows are block_size long, so training sees exactly this attention; at
generation time a KV cache that keeps the last block_size keys gives the same logits as
recomputing the whole text, at any length.

Speed notes. Generating one token is a handful of small matrix-vector products per layer, so
on a CPU the fixed cost of each tensor operation matters as much as the arithmetic: the KV
cache is preallocated (no copy of the cache per token), the RoPE tables are computed once and
sliced, and q and k are rotated together in one go (three operations, backward included).
Sampling goes faster still with llmb.story.fast_decode: the same computation for one token,
compiled, and int8 weights; `forward(cache=...)` stays the reference it is checked against.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 128  # longest context the model attends to
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers
    rope_theta: float = 10000.0

    def to_dict(self):
        return asdict(self)


def rotary_cos_sin(length, head_dim, theta, device, dtype):
    """cos and sin of the rotation angle for each (position, frequency) pair: (length, head_dim/2).

    The angles are computed in float64 and only then cast: in float32, position 100,000 times a
    frequency is already off by about 0.004 radians.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate each (first half, second half) pair of x's channels by its angle.

    With cos = (cos, cos) and sin = (-sin, sin) over the two halves, the rotated pair
    (x1 cos - x2 sin, x2 cos + x1 sin) is x * cos + (x2, x1) * sin: three operations.
    x: (B, T, ..., head_dim); cos, sin: (T, 1, ..., head_dim), broadcast over the other dims.
    """
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


def window_mask(T, S, window, device):
    """(T, S) boolean mask for the last T of S positions: attend to j when 0 <= i - j < window."""
    i = torch.arange(S - T, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return (j <= i) & (i - j < window)


class KVCache:
    """Keys (already rotated) and values of the last `block_size` tokens, one pair per layer.

    Each layer's buffers are allocated once and used as a ring: the token at position p lives in
    slot p % block_size, so sliding past block_size overwrites the oldest token instead of
    copying the cache. A single new token may attend to the slots in any order (softmax
    attention is a weighted sum, and RoPE has already put the positions into the keys).
    """

    def __init__(self, n_layer, block_size):
        self.block_size = block_size
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.pos = 0  # absolute position of the next token

    def __len__(self):
        return min(self.pos, self.block_size)

    def update(self, layer, k, v):
        """Store the new (B, nh, T, hd) keys/values; return the keys/values the new queries attend to.

        One new token: the filled slots, as they lie. Several: the cached tokens oldest first, then
        the new ones (the caller masks them to the window).
        """
        S, pos, T = self.block_size, self.pos, k.size(2)
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(k.size(0), k.size(1), S, k.size(3))
            self.v[layer] = v.new_empty(self.k[layer].shape)
        ring_k, ring_v = self.k[layer], self.v[layer]
        if T == 1:
            ring_k[:, :, pos % S] = k[:, :, 0]
            ring_v[:, :, pos % S] = v[:, :, 0]
            n = min(pos + 1, S)
            return ring_k[:, :, :n], ring_v[:, :, :n]
        order = torch.arange(pos - len(self), pos, device=k.device) % S  # cached slots, oldest first
        all_k = torch.cat((ring_k[:, :, order], k), dim=2)
        all_v = torch.cat((ring_v[:, :, order], v), dim=2)
        keep = min(T, S)  # only the last block_size new tokens stay
        slots = torch.arange(pos + T - keep, pos + T, device=k.device) % S
        ring_k[:, :, slots] = k[:, :, -keep:]
        ring_v[:, :, slots] = v[:, :, -keep:]
        return all_k, all_v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.window = config.block_size

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        qk = apply_rotary(qkv[:, :, :2], cos, sin)  # q and k rotated together: (B, T, 2, nh, hd)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hd)
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        mask = None
        if T > 1 and (k.size(2) > self.window or k.size(2) != T):  # past the window, or after cached tokens
            mask = window_mask(T, k.size(2), self.window, x.device)
        # else: plain causal attention; one new token needs no mask (the cache holds exactly its window)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        # exact GELU: on CPUs PyTorch's tanh approximation is 2-4x slower, and the two differ by < 0.001
        return F.dropout(self.c_proj(F.gelu(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cos, sin, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self._rope = None  # (cos, sin) tables, grown on demand (see rope)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def receptive_field(self):
        """Tokens that can influence the next logits: each layer reaches block_size - 1 further back."""
        return self.config.n_layer * (self.config.block_size - 1) + 1

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def rope(self, start, T, like):
        """cos and sin for positions start .. start+T-1, shaped (T, 1, 1, head_dim) to broadcast
        over (B, T, q/k, heads, head_dim). The tables are built once (and again, twice as long,
        when a generation runs past them), not at every step."""
        cos, sin = self._rope or (like.new_empty(0), None)
        if len(cos) < start + T or cos.dtype != like.dtype or cos.device != like.device:
            length = max(2 * (start + T), self.config.block_size)
            head_dim = self.config.n_embd // self.config.n_head
            with torch.inference_mode(False), torch.no_grad():  # tables made while sampling serve training too
                cos, sin = rotary_cos_sin(length, head_dim, self.config.rope_theta, like.device, like.dtype)
                cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # see apply_rotary
            self._rope = cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        return cos[start:start + T], sin[start:start + T]

    def forward(self, idx, targets=None, cache=None):
        """Logits for every position of idx (B, T); with targets, also the mean cross-entropy.

        With a KVCache, idx continues the cached tokens and the cache is updated.
        """
        T = idx.size(1)
        x = F.dropout(self.wte(idx), self.config.dropout, self.training)
        cos, sin = self.rope(cache.pos if cache is not None else 0, T, x)
        for i, block in enumerate(self.h):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def new_cache(self):
        return KVCache(self.config.n_layer, self.config.block_size)

    def configure_optimizer(self, lr, weight_decay=0.1, betas=(0.9, 0.95)):
        """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        device_type = next(self.parameters()).device.type
        fused = device_type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
