"""Sampling speed at the 10.65M config (6 layers, 6 heads, 384 wide, block 256, 65 characters):
1000 new characters through the one `generate`, with the KV cache (fp32 weights, and the
--cpu-int8 option), and with full recompute.

Reference on the 2-core dev machine: nanoGPT's generate (no KV cache) about 18 tokens/s.
Target with the cache: >= 350 tokens/s.

    python benchmarks/bench_sampling.py [--tokens 1000] [--skip-recompute]
"""

import argparse
import time

import torch
from common import REPO  # noqa: F401  (puts the repo on sys.path)

from llmb.quantize import quantize_linears_int8
from llmb.story.model import GPT, GPTConfig
from llmb.story.sample import generate
from llmb.story.tokenizer import CharTokenizer

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=1000)
p.add_argument("--skip-recompute", action="store_true", help="only time the cached paths")
args = p.parse_args()

config = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)
torch.manual_seed(0)
model = GPT(config).eval()
int8_model = quantize_linears_int8(GPT(config)).eval()
tokenizer = CharTokenizer([chr(32 + i) for i in range(64)] + ["\n"])
print(f"model: {model.num_params() / 1e6:.2f}M parameters, {torch.get_num_threads()} threads")


def tokens_per_sec(m, use_cache):
    start = time.perf_counter()
    n = sum(1 for _ in generate(m, tokenizer, "\n", args.tokens, temperature=1.0, seed=0, use_cache=use_cache))
    return n / (time.perf_counter() - start)


cached = tokens_per_sec(model, True)
print(f"KV cache, fp32:       {cached:8.1f} tokens/s  ({args.tokens} tokens)")
print(f"KV cache, --cpu-int8: {tokens_per_sec(int8_model, True):8.1f} tokens/s  (target >= 350)")
if not args.skip_recompute:
    full = tokens_per_sec(model, False)
    print(f"full recompute, fp32: {full:8.1f} tokens/s  -> the cache is {cached / full:.1f}x faster")
