"""QLoRA training on CUDA: peak GPU memory and tokens/s for Phi-2 at seq 512, batch 4.

    python benchmarks/bench_qlora_cuda.py                      # microsoft/phi-2 (hub or cache)
    python benchmarks/bench_qlora_cuda.py --base /path/to/phi-2

The setup is training/train_qlora.py's: NF4 + double quantization, LoRA r=16 on
q,k,v,dense,fc1,fc2, gradient checkpointing, paged 8-bit AdamW. Target: peak <= 5 GB.
Without the real weights (offline), a full-size Phi-2 with random weights is saved to a temp dir
and loaded the same way: memory and speed do not depend on the weight values.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def random_checkpoint(config_path, tokenizer_path, folder):
    """Save a full-size PhiForCausalLM with random weights (bf16) + tokenizer to `folder`."""
    import json

    import torch
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    config = json.loads(Path(config_path).read_text())
    for key in ("auto_map", "_name_or_path", "architectures", "transformers_version", "torch_dtype"):
        config.pop(key, None)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = PhiForCausalLM(PhiConfig(**config))
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
    return folder


def main():
    import torch

    from llmb.assistant.config import TrainConfig
    from llmb.assistant.loading import load_base_model
    from llmb.assistant.train import add_lora, make_optimizer
    from llmb.errors import UserError
    from llmb.settings import resolve_by_device

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="microsoft/phi-2")
    p.add_argument("--config", default=str(REPO.parent / "shared" / "data" / "phi-2-tokenizer" / "config.json"),
                   help="config.json for the random-weights fallback")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU here (this benchmark measures QLoRA training on a GPU)")
        return 0
    device = "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model = load_base_model(args.base, "4bit", device)
            source = args.base
        except UserError as e:
            print(f"{e}\n-> using a full-size Phi-2 with random weights built from {args.config}")
            base = random_checkpoint(args.config, Path(args.config).parent, tmp)
            model = load_base_model(base, "4bit", device)
            source = "random-weight Phi-2"
        weights_gb = torch.cuda.memory_allocated() / 1e9
        cfg = TrainConfig()
        resolve_by_device(cfg, "cuda")  # the GPU recipe: gradient checkpointing on
        model = add_lora(model, cfg)
        model.train()
        optimizer = make_optimizer(model, cfg.lr, device)
        vocab = model.config.vocab_size
        torch.cuda.reset_peak_memory_stats()
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            ids = torch.randint(0, min(vocab, 50256), (args.batch_size, args.seq_len), device=device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    tokens = args.steps * args.batch_size * args.seq_len
    peak = torch.cuda.max_memory_allocated() / 1e9
    reserved = torch.cuda.max_memory_reserved() / 1e9
    print(f"model: {source}; GPU: {torch.cuda.get_device_name()}; compute dtype "
          f"{'bf16' if torch.cuda.is_bf16_supported() else 'fp32'}")
    print(f"seq {args.seq_len}, batch {args.batch_size}, gradient checkpointing, paged 8-bit AdamW, LoRA r={cfg.lora_r}")
    print(f"4-bit weights: {weights_gb:.2f} GB; peak allocated: {peak:.2f} GB (reserved {reserved:.2f} GB); "
          f"target <= 5 GB: {'ok' if peak <= 5 else 'MISSED'}")
    print(f"speed: {tokens / seconds:.0f} tokens/s ({seconds / args.steps:.2f} s/step over {args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
