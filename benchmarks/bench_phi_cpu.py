"""CPU decoding speed and memory of full-size Phi-2 (random weights) in fp32, bf16, NF4 and int8.

    python benchmarks/bench_phi_cpu.py --new-tokens 32 --variants int8 fp32

Each variant runs in its own subprocess, so its peak RSS (ru_maxrss) is its own, loading included.
Weights are random: the speed and memory are those of the real model, the text is noise.
The int8 variant is `--cpu-int8` of `python -m llmb chat` (llmb.chat.quantize_linears_int8),
starting as the real load does, from bf16 weights.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = ["fp32", "bf16", "nf4", "int8"]
PROMPT = "### Human: Can you explain what a large language model is, in two sentences?### Assistant:"


def random_phi(config_path, dtype):
    """PhiForCausalLM with random N(0, 0.02) weights in `dtype`, built without an fp32 copy."""
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    config = json.loads(Path(config_path).read_text())
    for key in ("auto_map", "_name_or_path", "architectures", "transformers_version", "torch_dtype"):
        config.pop(key, None)
    torch.set_default_dtype(dtype)  # parameters are born in `dtype`, on the meta device (no memory) ...
    try:
        with torch.device("meta"):
            model = PhiForCausalLM(PhiConfig(**config))
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu")  # ... then get uninitialised memory, filled below
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # its buffers were on meta
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def to_nf4(model):
    """Swap each Linear for a bitsandbytes NF4 Linear4bit (double quantization), as --quant 4bit loads."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    for name in names:
        parent, _, child = name.rpartition(".")
        parent = model.get_submodule(parent)
        old = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(old.weight.data.float(), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4")._quantize("cpu")
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.float(), requires_grad=False)
        setattr(parent, child, new)
        del old
    return model.float()


def build(variant, config_path):
    import torch

    if variant == "fp32":
        return random_phi(config_path, torch.float32)
    if variant == "bf16":
        return random_phi(config_path, torch.bfloat16)
    if variant == "nf4":
        return to_nf4(random_phi(config_path, torch.bfloat16))
    if variant == "int8":
        from llmb.assistant.engine import quantize_linears_int8

        return quantize_linears_int8(random_phi(config_path, torch.bfloat16))
    raise SystemExit(f"unknown variant {variant}; choose from {VARIANTS}")


def measure(variant, config_path, tokenizer_path, new_tokens, threads=None):
    """Runs in the child: build, generate greedily, report times and peak RSS as one JSON line."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    t0 = time.perf_counter()
    model = build(variant, config_path)
    load_s = time.perf_counter() - t0
    ids = AutoTokenizer.from_pretrained(tokenizer_path)(PROMPT, return_tensors="pt")["input_ids"]
    clock = Clock()
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=50256)
    decode_s = clock.times[-1] - clock.times[0]
    print(json.dumps({
        "variant": variant, "threads": torch.get_num_threads(), "load_s": load_s, "prompt_tokens": ids.shape[1],
        "new_tokens": len(clock.times), "ttft_s": clock.times[0] - start,
        "decode_tok_s": (len(clock.times) - 1) / decode_s if decode_s > 0 else float("nan"),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["int8", "fp32", "bf16", "nf4"], choices=VARIANTS)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--nf4-tokens", type=int, default=8, help="NF4 is slow on CPU: fewer tokens")
    p.add_argument("--config", default=str(REPO.parent / "shared" / "data" / "phi-2-tokenizer" / "config.json"),
                   help="Phi-2 config.json (default: ../shared/data/phi-2-tokenizer/config.json)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the config's folder)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice). On a busy machine, "
                   "1 thread is often faster: int8 kernels stall when their threads wait for a shared core")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    tokenizer = args.tokenizer or str(Path(args.config).parent)
    if args.child:
        return measure(args.child, args.config, tokenizer, args.new_tokens, args.threads)
    if not Path(args.config).is_file():
        raise SystemExit(f"no Phi-2 config at {args.config}; pass --config PATH")

    print(f"{'variant':8} {'load s':>7} {'TTFT s':>7} {'decode tok/s':>13} {'peak RSS GiB':>13}  (new tokens, threads)")
    results = []
    for variant in args.variants:
        n = args.nf4_tokens if variant == "nf4" else args.new_tokens
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--new-tokens", str(n),
                               "--config", args.config, "--tokenizer", tokenizer]
                              + (["--threads", str(args.threads)] if args.threads else []),
                              capture_output=True, text=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{variant:8} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        r = json.loads(lines[-1])
        results.append(r)
        print(f"{variant:8} {r['load_s']:7.1f} {r['ttft_s']:7.2f} {r['decode_tok_s']:13.2f} {r['peak_rss_gib']:13.2f}"
              f"  ({r['new_tokens']}, {r['threads']})", flush=True)
    by = {r["variant"]: r for r in results}
    if "int8" in by and "fp32" in by:
        print(f"int8 vs fp32: {by['int8']['decode_tok_s'] / by['fp32']['decode_tok_s']:.1f}x decode speed, "
              f"{by['int8']['peak_rss_gib'] / by['fp32']['peak_rss_gib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
