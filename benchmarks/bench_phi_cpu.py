"""CPU decoding speed and memory of full-size Phi-2 (random weights) in fp32, bf16, NF4 and int8,
each loaded from a saved folder through the loader the user's command uses.

    python benchmarks/bench_phi_cpu.py --new-tokens 32 --variants int8 fp32

A random Phi-2 (the real config, N(0, 0.02) weights) is saved once in bf16 safetensors (5.6 GB,
reused from --folder). Each variant then runs in its own subprocess, so its memory is its own,
loading included:
    fp32, int8, nf4   llmb.assistant.engine.ChatEngine: what `python -m llmb chat --base FOLDER`
                      (with --cpu-int8 or --quant 4bit) loads
    bf16              llmb.assistant.loading.load_base_model with dtype bf16
Memory: max RSS (ru_maxrss: includes file pages of the mmap'd safetensors) and peak RssAnon
(anonymous memory only, what the process itself holds; sampled every 20 ms from /proc/self/status).
The weights are random: the speed and memory are those of the real model, the text is noise.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = ["fp32", "bf16", "nf4", "int8"]
PROMPT = "Can you explain what a large language model is, in two sentences?"


def save_random_phi(config_path, folder, layers=None):
    """A PhiForCausalLM with random weights saved in bf16 to `folder` (with the Phi-2 tokenizer), built
    without an fp32 copy. `layers` shrinks it (for a quick check of this script)."""
    import torch
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    config = json.loads(Path(config_path).read_text())
    for key in ("auto_map", "_name_or_path", "architectures", "transformers_version", "torch_dtype"):
        config.pop(key, None)
    config |= {"num_hidden_layers": layers} if layers else {}
    torch.set_default_dtype(torch.bfloat16)  # parameters are born in bf16, on the meta device (no memory) ...
    try:
        with torch.device("meta"):
            model = PhiForCausalLM(PhiConfig(**config))
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu")  # ... then get uninitialised memory, filled here
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # its buffers were on meta
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_() if name.endswith("bias") else p.fill_(1.0) if "layernorm" in name else p.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(Path(config_path).parent).save_pretrained(folder)


def rss_anon_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class PeakAnon:
    """Samples RssAnon every 20 ms on a thread; `.peak` in KiB."""

    def __init__(self):
        self.peak, self.done = rss_anon_kib(), threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, rss_anon_kib())


def load(variant, folder):
    """The model and tokenizer, loaded the way the user's command loads them."""
    import torch

    from llmb.assistant.engine import ChatEngine
    from llmb.assistant.loading import load_base_model, load_chat_tokenizer

    if variant == "bf16":
        return load_base_model(folder, "none", "cpu", torch.bfloat16).eval(), load_chat_tokenizer(folder)
    engine = ChatEngine(folder, device="cpu", quant="4bit" if variant == "nf4" else "none",
                        precision="int8" if variant == "int8" else "fp32")
    return engine.model, engine.tokenizer


def measure(variant, folder, new_tokens, threads=None):
    """Runs in the child: load, generate greedily, report times and memory as one JSON line."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    anon = PeakAnon()
    t0 = time.perf_counter()
    model, tokenizer = load(variant, folder)
    load_s, load_anon = time.perf_counter() - t0, anon.peak
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    clock = Clock()
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, stopping_criteria=StoppingCriteriaList([clock]),
                       pad_token_id=tokenizer.eos_token_id)
    decode_s = clock.times[-1] - clock.times[0]
    anon.done.set()
    print(json.dumps({
        "variant": variant, "threads": torch.get_num_threads(), "load_s": load_s, "prompt_tokens": ids.shape[1],
        "new_tokens": len(clock.times), "ttft_s": clock.times[0] - start,
        "decode_tok_s": (len(clock.times) - 1) / decode_s if decode_s > 0 else float("nan"),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "peak_anon_gib": max(anon.peak, rss_anon_kib()) / 2**20, "load_anon_gib": load_anon / 2**20,
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["int8", "fp32", "bf16", "nf4"], choices=VARIANTS)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--nf4-tokens", type=int, default=8, help="NF4 is slow on CPU: fewer tokens")
    p.add_argument("--config", default=str(REPO.parent / "shared" / "data" / "phi-2-tokenizer" / "config.json"),
                   help="Phi-2 config.json beside its tokenizer (default: ../shared/data/phi-2-tokenizer/config.json)")
    p.add_argument("--folder", default=str(Path.home() / ".cache" / "llmb" / "bench-phi2-random"),
                   help="where the random Phi-2 is saved once and loaded from")
    p.add_argument("--layers", type=int, help="fewer layers than Phi-2's 32 (a quick check of the script)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice). On a busy machine, "
                   "1 thread is often faster: int8 kernels stall when their threads wait for a shared core")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return measure(args.child, args.folder, args.new_tokens, args.threads)
    if not Path(args.config).is_file():
        raise SystemExit(f"no Phi-2 config at {args.config}; pass --config PATH")
    if not (Path(args.folder) / "config.json").is_file():
        print(f"saving a random Phi-2 to {args.folder} (once) ...", flush=True)
        save_random_phi(args.config, args.folder, args.layers)

    print(f"{'variant':8} {'load s':>7} {'TTFT s':>7} {'decode tok/s':>13} {'max RSS GiB':>12} {'peak anon GiB':>14}"
          "  (new tokens, threads)")
    results = []
    for variant in args.variants:
        n = args.nf4_tokens if variant == "nf4" else args.new_tokens
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--new-tokens", str(n), "--folder",
                               args.folder] + (["--threads", str(args.threads)] if args.threads else []),
                              capture_output=True, text=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{variant:8} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        r = json.loads(lines[-1])
        results.append(r)
        print(f"{variant:8} {r['load_s']:7.1f} {r['ttft_s']:7.2f} {r['decode_tok_s']:13.2f} {r['peak_rss_gib']:12.2f}"
              f" {r['peak_anon_gib']:14.2f}  ({r['new_tokens']}, {r['threads']})", flush=True)
    by = {r["variant"]: r for r in results}
    if "int8" in by and "fp32" in by:
        print(f"int8 vs fp32: {by['int8']['decode_tok_s'] / by['fp32']['decode_tok_s']:.1f}x decode speed, "
              f"{by['int8']['peak_anon_gib'] / by['fp32']['peak_anon_gib']:.2f}x peak anonymous memory")


if __name__ == "__main__":
    main()
