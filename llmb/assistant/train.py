"""QLoRA fine-tuning of a causal LM (Phi-2 by default) on chat data.

QLoRA (Dettmers et al. 2023): freeze the base model in 4-bit NormalFloat (NF4) with double
quantization, and train only small low-rank adapters (LoRA, Hu et al. 2021) on top:

    h = W0 x + (alpha / r) * B A x        W0 frozen (4-bit), A: r x d_in, B: d_out x r trained

The loop is plain PyTorch driven by accelerate, so `python training/train_qlora.py` runs on
one device and `accelerate launch training/train_qlora.py` on several GPUs.
"""

import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from llmb.assistant.config import TrainConfig
from llmb.assistant.data import collate, encode_dataset, load_chat_data
from llmb.assistant.loading import load_base_model, load_tokenizer
from llmb.device import resolve_device
from llmb.fileio import save_dir_atomically, write_json
from llmb.runlog import MetricsLog, StopSignal, trim_metrics


def add_lora(model, cfg):
    """Freeze the base, add trainable LoRA adapters; gradient checkpointing trades compute for memory."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    ckpt_kwargs = {"use_reentrant": False}
    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(model, cfg.gradient_checkpointing, ckpt_kwargs)
    elif cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
    model.config.use_cache = False  # the KV cache is for generation only
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def make_optimizer(model, lr, device):
    """Paged 8-bit AdamW on CUDA (optimizer state in 8 bits, paged to CPU on memory spikes), AdamW on CPU."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if str(device).startswith("cuda"):
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


# ---------------------------------------------------------------------------
# Data


def micro_batches(accelerator, examples, batch_size, pad_id, seed, skip=0):
    """Endless stream of batches, reshuffled each epoch with seed+epoch; `skip` resumes mid-run."""
    import torch
    from torch.utils.data import DataLoader

    epoch = 0
    while True:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        loader = accelerator.prepare_data_loader(DataLoader(
            [examples[i] for i in order], batch_size=batch_size, collate_fn=lambda b: collate(b, pad_id)))
        if skip >= len(loader):
            skip -= len(loader)
            epoch += 1
            continue
        if skip:
            loader, skip = accelerator.skip_first_batches(loader, skip), 0
        yield from loader
        epoch += 1


def eval_loader(accelerator, examples, batch_size, pad_id):
    from torch.utils.data import DataLoader

    return accelerator.prepare_data_loader(DataLoader(examples, batch_size=batch_size,
                                                      collate_fn=lambda b: collate(b, pad_id)))


# ---------------------------------------------------------------------------
# Evaluation, checkpoints, signals


def evaluate(model, loader, accelerator):
    """Mean cross-entropy per answer token over the whole eval set (exp of it = perplexity)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    sums = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]  # token t predicts token t+1
            sums[0] += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=-100, reduction="sum").double()
            sums[1] += (targets != -100).sum()
    model.train()
    sums = accelerator.reduce(sums, "sum")
    return (sums[0] / sums[1].clamp(min=1)).item()


def checkpoints(out):
    return sorted(Path(out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out, step, model, tokenizer, optimizer, scheduler):
    import torch

    def write(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "training_state.pt")

    target = Path(out) / f"checkpoint-{step}"
    save_dir_atomically(target, write)
    for old in checkpoints(out):  # keep only the newest
        if old != target:
            shutil.rmtree(old)


def load_checkpoint(ckpt, model, optimizer, scheduler):
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    state = torch.load(ckpt / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]


def save_adapter(out, model, tokenizer):
    """The out dir itself is a PEFT adapter dir: written beside, then moved in file by file."""
    tmp = Path(out) / ".tmp-adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, Path(out) / f.name)
    tmp.rmdir()


# ---------------------------------------------------------------------------
# Training


def train(cfg: TrainConfig):
    """Fine-tune cfg.base with LoRA on cfg.data; returns the summary dict (also in out/summary.json)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import get_constant_schedule_with_warmup

    device = resolve_device(cfg.device)
    accelerator = Accelerator(cpu=device == "cpu")
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(cfg.base)
    train_convs, eval_convs = load_chat_data(cfg.data, cfg.eval_data, cfg.eval_split, cfg.skip_bad_rows, cfg.seed)
    train_set = encode_dataset(tokenizer, train_convs, cfg.max_seq_len)
    eval_set = encode_dataset(tokenizer, eval_convs[:cfg.max_eval_examples], cfg.max_seq_len)

    model = add_lora(load_base_model(cfg.base, cfg.quant, accelerator.device), cfg)
    optimizer = make_optimizer(model, cfg.lr, accelerator.device)
    scheduler = get_constant_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.max_steps))
    start_step = 0
    if cfg.resume:
        found = checkpoints(out)
        if found:
            start_step = load_checkpoint(found[-1], model, optimizer, scheduler)
            print(f"resuming from {found[-1]} (step {start_step})")
        else:
            print(f"no checkpoint in {out}; starting from step 0")
    model, optimizer = accelerator.prepare(model, optimizer)
    if main:
        model.print_trainable_parameters()
        print(f"{len(train_set)} train / {len(eval_set)} eval conversations, device {accelerator.device}, quant {cfg.quant}")
        write_json(out / "training_args.json", asdict(cfg))
        if start_step:
            trim_metrics(out / "metrics.jsonl", start_step)
    log = MetricsLog(out / "metrics.jsonl", truncate=start_step == 0) if main else None

    batches = micro_batches(accelerator, train_set, cfg.batch_size, tokenizer.pad_token_id, cfg.seed,
                            skip=start_step * cfg.grad_accum)
    evals = eval_loader(accelerator, eval_set, cfg.batch_size, tokenizer.pad_token_id) if eval_set else None
    unwrapped = accelerator.unwrap_model(model)
    step, t0, losses, tokens, t_log = start_step, time.time(), [], 0, time.time()
    val_loss = train_loss = None
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not main, desc="train")
    with StopSignal() as stop:
        while step < cfg.max_steps and not stop.name:
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                sync = micro == cfg.grad_accum - 1  # all-reduce gradients only on the last micro-batch
                with nullcontext() if sync else accelerator.no_sync(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss / cfg.grad_accum)
                losses.append(loss.item())
                tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            last = step == cfg.max_steps or stop.name
            evaluated = evals is not None and (step % cfg.eval_steps == 0 or last)
            if evaluated:
                val_loss = evaluate(model, evals, accelerator)
            if main and (step % cfg.log_steps == 0 or evaluated or last):
                train_loss = sum(losses) / len(losses)
                record = {"step": step, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                          "tokens_per_sec": tokens / (time.time() - t_log), "elapsed_s": time.time() - t0}
                if evaluated:
                    record |= {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
                log.log(**record)
                bar.set_postfix(loss=f"{train_loss:.3f}", **({"val": f"{val_loss:.3f}"} if evaluated else {}))
                losses, tokens, t_log = [], 0, time.time()
            if step % cfg.save_steps == 0 or last:
                accelerator.wait_for_everyone()
                if main:
                    save_checkpoint(out, step, unwrapped, tokenizer, optimizer, scheduler)
    bar.close()

    summary = None
    if main:
        save_adapter(out, unwrapped, tokenizer)
        log.close()
        summary = {
            "base": cfg.base, "data": [str(d) for d in cfg.data], "quant": cfg.quant, "steps": step,
            "max_steps": cfg.max_steps, "final_train_loss": train_loss, "final_val_loss": val_loss,
            "final_val_ppl": math.exp(min(val_loss, 50)) if val_loss is not None else None,
            "train_time_s": time.time() - t0, "stopped_by": stop.name,
            "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": cfg.lora_targets},
        }
        write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary


