"""Where a training step's time goes, ours against nanoGPT's, at nanoGPT's CPU config (4 layers,
4 heads, 128 wide, block 64, batch 12, dropout 0): both models in one process, the same random
batches, steps alternating in blocks (A B A B), each op's own time from torch.profiler, grouped.

It answers what a throughput of 1.2x nanoGPT's tokens/s would take: the
matrix products are the same FLOPs in both, so the ratio is bounded by how small the rest of
our step can get. It prints the bound: ours with the rest taking no time at all.

The models and optimizers are the trainers' own (`llmb.story.model.GPT.configure_optimizer`,
nanoGPT's `configure_optimizers`), with gradient clipping at 1.0 as both trainers do; the data
loading, logging and scheduling around them are left out (bench_train_throughput.py measures the
whole command). The profiler adds a little to every op, most to the small ones.

--compile runs our model through torch.compile (nanoGPT stays as its CPU recipe runs it, eager):
it shows what fusing the small operations would buy. The fused kernels count as "everything else".

    python benchmarks/bench_train_breakdown.py [--steps 20] [--rounds 4] [--threads N] [--nanogpt DIR] [--compile]
"""

import importlib.util
import time
from collections import defaultdict
from pathlib import Path

from common import median, parse, peer_parser

GROUPS = [  # (group, substrings of aten op names), first match wins
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention (rest)", ("scaled_dot_product", "flash_attention")),
    ("GELU", ("gelu",)),
    ("LayerNorm", ("layer_norm",)),
    ("optimizer and clipping", ("adamw", "_foreach", "linalg_vector_norm", "clamp")),
    ("loss", ("log_softmax", "nll_loss")),
]


def group_of(name):
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "everything else (RoPE or position embedding, adds, copies, views)"


def main():
    p = peer_parser(__doc__, rounds=4)
    p.add_argument("--steps", type=int, default=20, help="steps per contender per round")
    p.add_argument("--compile", action="store_true", help="our model through torch.compile (needs a C++ compiler)")
    args = parse(p)

    import torch
    from torch.profiler import profile

    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(args.nanogpt) / "model.py")
    nano = importlib.util.module_from_spec(spec)  # nanoGPT's model.py
    spec.loader.exec_module(nano)

    from llmb.story.model import GPT, GPTConfig

    shape = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**shape, dropout=0.0))
    theirs = nano.GPT(nano.GPTConfig(**shape, dropout=0.0, bias=False))
    optimizer = ours.configure_optimizer(1e-3, 0.1)
    if args.compile:
        ours = torch.compile(ours)  # compiled on the first step, in the warm-up round
    contenders = {
        "llmb": (ours, optimizer),
        "nanoGPT": (theirs, theirs.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")),
    }
    data = torch.randint(0, 65, (200_000,))

    def step(model, optimizer, x, y):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def batch():
        ix = torch.randint(len(data) - 64, (12,))
        return torch.stack([data[i:i + 64] for i in ix]), torch.stack([data[i + 1:i + 65] for i in ix])

    def large_product_gflops():  # what this core's matrix products reach on a large, easy shape
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        a @ b
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        return 3 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9

    wall = defaultdict(list)  # name -> ms per step, one per round (unprofiled)
    gflops = defaultdict(list)  # name -> GFLOP/s of the step's matrix products, one per round
    parts = defaultdict(lambda: defaultdict(list))  # name -> group -> ms per step, one per round
    for r in range(args.rounds + 1):  # round 0 warms up
        batches = [batch() for _ in range(args.steps)]
        for name, (model, optimizer) in contenders.items():
            start = time.perf_counter()
            for x, y in batches:
                step(model, optimizer, x, y)
            ms = 1000 * (time.perf_counter() - start) / args.steps
            if r == 0 and args.compile and name == "llmb":
                print(f"  torch.compile: the warm-up round took {ms * args.steps / 1000:.1f} s", flush=True)
            with profile(with_flops=True) as prof:
                for x, y in batches:
                    step(model, optimizer, x, y)
            if r == 0:
                continue
            wall[name].append(ms)
            totals, flops = defaultdict(float), 0
            for event in prof.key_averages():
                if event.key.startswith("aten::"):
                    group = group_of(event.key)
                    totals[group] += event.self_cpu_time_total / 1000 / args.steps
                    flops += event.flops if group == "matrix products" else 0
            gflops[name].append(flops / args.steps / totals["matrix products"] / 1e6)
            for group in [g for g, _ in GROUPS] + [group_of("")]:
                parts[name][group].append(totals[group])
        if r:
            gflops["a 2048x2048 product"].append(large_product_gflops())
        print(f"  round {r}: " + ", ".join(f"{n} {wall[n][-1]:.1f} ms/step" for n in contenders) if r else
              "  warm-up round done", flush=True)

    compiled = "ours compiled, " if args.compile else ""
    print(f"\none training step, nanoGPT's CPU config, {args.steps} steps x {args.rounds} rounds, {compiled}"
          f"{torch.get_num_threads()} thread(s); ms per step (median over rounds):")
    print(f"  {'':66s} {'llmb':>8s} {'nanoGPT':>8s}")
    for group in parts["llmb"]:
        print(f"  {group:66s} {median(parts['llmb'][group]):8.2f} {median(parts['nanoGPT'][group]):8.2f}")
    profiled = {n: sum(median(v) for v in parts[n].values()) for n in contenders}
    print(f"  {'sum of op times (profiled)':66s} {profiled['llmb']:8.2f} {profiled['nanoGPT']:8.2f}")
    print(f"  {'wall time per step (not profiled)':66s} {median(wall['llmb']):8.2f} {median(wall['nanoGPT']):8.2f}")
    ratio = median([t / o for o, t in zip(wall["llmb"], wall["nanoGPT"])])
    ours_ms, nano_ms = median(wall["llmb"]), median(wall["nanoGPT"])
    # a compiled model's fused kernels are not aten ops: the rest is the wall time less the products
    matmul_ms = min(median(parts["llmb"]["matrix products"]), ours_ms)
    rest_ms = ours_ms - matmul_ms
    rest_allowed = max(0.0, nano_ms / 1.2 - matmul_ms)
    print(f"ours / nanoGPT speed (per-round wall ratio): {ratio:.2f}x; matrix products take {matmul_ms:.1f} "
          f"of our {ours_ms:.1f} ms")
    large = median(gflops["a 2048x2048 product"])
    print("matrix products, GFLOP/s: " + ", ".join(f"{n} {median(v):.0f}" for n, v in gflops.items())
          + f"; ours run at {100 * median(gflops['llmb']) / large:.0f}% of the large product's rate")
    print(f"if everything but the matrix products took no time, ours would be {nano_ms / matmul_ms:.2f}x nanoGPT; "
          f"1.2x needs the rest of our step to go from {rest_ms:.1f} to {rest_allowed:.1f} ms "
          f"({100 * rest_allowed / rest_ms:.0f}% of what it is now)")

if __name__ == "__main__":
    main()
