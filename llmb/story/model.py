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


def rotary_cos_sin(positions, head_dim, theta, dtype):
    """cos and sin of the rotation angle for each (position, frequency) pair: (T, head_dim/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate each (first half, second half) pair of x's channels by its angle. x: (B, nh, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def window_mask(T, S, window, device):
    """(T, S) boolean mask for the last T of S positions: attend to j when 0 <= i - j < window."""
    i = torch.arange(S - T, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return (j <= i) & (i - j < window)


class KVCache:
    """Keys (already rotated) and values of the last `block_size` tokens, one pair per layer."""

    def __init__(self, n_layer, block_size):
        self.block_size = block_size
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.pos = 0  # absolute position of the next token

    def __len__(self):
        return 0 if self.k[0] is None else self.k[0].size(2)

    def update(self, layer, k, v):
        """Append the new keys/values; return all that the new queries may need; keep the last block_size."""
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)
            v = torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k[:, :, -self.block_size:], v[:, :, -self.block_size:]
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.window = config.block_size

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        mask = None
        if T == 1:  # one new token sees the last block_size keys (itself included): no mask needed
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]
        elif k.size(2) > self.window or k.size(2) != T:  # past the window: mask to the last block_size
            mask = window_mask(T, k.size(2), self.window, x.device)
        # else: within the window, a plain causal mask
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


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
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

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

    def forward(self, idx, targets=None, cache=None):
        """Logits for every position of idx (B, T); with targets, also the mean cross-entropy.

        With a KVCache, idx continues the cached tokens and the cache is updated.
        """
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        positions = torch.arange(start, start + T, device=idx.device)
        head_dim = self.config.n_embd // self.config.n_head
        x = self.drop(self.wte(idx))
        cos, sin = rotary_cos_sin(positions, head_dim, self.config.rope_theta, x.dtype)
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
