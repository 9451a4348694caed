"""Training the story model: data, optimizer, schedule, evaluation, checkpoints.

One loop serves a laptop CPU, a GPU (mixed precision) and several processes under
`accelerate launch` / `torchrun` (DDP via accelerate). It stops after --max-iters steps or
a wall-clock budget --max-time, saves atomically at every eval, and a SIGINT/SIGTERM
makes it save and exit cleanly.
"""

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmb.device import resolve_device
from llmb.errors import UserError
from llmb.fileio import write_json
from llmb.folders import is_story_checkpoint
from llmb.runlog import MetricsLog, StopSignal, trim_metrics
from llmb.settings import check
from llmb.story.checkpoint import STATE, load_checkpoint, load_train_state, save_checkpoint, save_train_state
from llmb.story.config import TrainConfig
from llmb.story.corpus import load_corpus
from llmb.story.model import GPT, GPTConfig
from llmb.story.sample import generate
from llmb.story.tokenizer import build_tokenizer

LN2 = math.log(2)


# ---------------------------------------------------------------------------------------- data

@dataclass
class Data:
    tokenizer: object
    train: torch.Tensor
    val: torch.Tensor
    val_chars_per_token: float  # to turn nats/token into bits/character
    report: str


def prepare_data(cfg, tokenizer=None):
    """Read the corpus, build (or reuse) the tokenizer, encode the train and val splits."""
    corpus = load_corpus(cfg.data)
    train_text, val_text = corpus.split(cfg.val_fraction)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer, train_text + val_text, cfg.vocab_size)
    train = torch.tensor(tokenizer.encode(train_text, drop_unknown=True), dtype=torch.long)
    val = torch.tensor(tokenizer.encode(val_text, drop_unknown=True), dtype=torch.long)
    for name, ids in (("training", train), ("validation", val)):
        if len(ids) <= cfg.block_size:
            raise UserError(
                f"the {name} split has {len(ids)} tokens, fewer than one block ({cfg.block_size} + 1); "
                "give more text or a smaller --block-size"
            )
    report = corpus.report() + f"\n  tokens: {len(train):,} train, {len(val):,} val ({tokenizer.kind}, vocab {tokenizer.vocab_size})"
    for warning in corpus.warnings:
        report += f"\n  warning: {warning}"
    return Data(tokenizer, train, val, len(val_text) / len(val), report)


def get_batch(data, block_size, batch_size, generator, device):
    """batch_size random windows of block_size tokens, and the same shifted by one (the targets)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, data, block_size, batch_size, max_batches=None):
    """Mean loss (nats/token) over non-overlapping windows spread evenly across `data`.

    Deterministic: the same windows every call. With max_batches, only that many batches of
    windows are used, still spread over the whole split (so every book is covered).
    """
    n_windows = (len(data) - 1) // block_size
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    starts = torch.linspace(0, len(data) - 1 - block_size, n_windows).long()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        s = starts[i:i + batch_size]
        x = torch.stack([data[j:j + block_size] for j in s]).to(device)
        y = torch.stack([data[j + 1:j + 1 + block_size] for j in s]).to(device)
        _, loss = model(x, y)
        total += loss.item() * len(s)
        count += len(s)
    model.train(was_training)
    return total / count


def bits_per_char(loss, chars_per_token):
    return loss / chars_per_token / LN2


# ------------------------------------------------------------------------------------ schedule

def make_scheduler(optimizer, schedule, lr, total_steps, pct_start=0.25):
    """onecycle: OneCycleLR (warm up to lr, anneal, beta1 cycles 0.95 -> 0.85 -> 0.95);
    cosine: linear warmup then cosine decay to lr/10; constant: lr throughout."""
    total_steps = max(2, total_steps)
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=pct_start,
            cycle_momentum=True, base_momentum=0.85, max_momentum=0.95, div_factor=25, final_div_factor=1e3,
        )
    if schedule == "cosine":
        warmup = max(1, int(0.05 * total_steps))

        def factor(step):
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise UserError(f"unknown schedule {schedule!r}; use onecycle, cosine or constant")


# ----------------------------------------------------------------------------------- the model

def make_accelerator(device):
    from accelerate import Accelerator

    use_cuda = resolve_device(device) == "cuda"
    precision = "no"
    if use_cuda:
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Accelerator(cpu=not use_cuda, mixed_precision=precision)


def model_config(cfg, vocab_size):
    return GPTConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)


# ----------------------------------------------------------------------------------- LR finder

def find_lr(cfg, data=None, num_iters=200, start_lr=1e-5, end_lr=1.0, out_dir=None, log=print):
    """Run the LR range test on a fresh model; write lr_find.json/png to out_dir; return the suggestion."""
    from llmb.story.lr_finder import lr_sweep, save_lr_find, suggest_lr

    check(cfg)
    data = data or prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, data.tokenizer.vocab_size))
    model.train()
    optimizer = model.configure_optimizer(start_lr, cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)

    def train_step(lr):
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(data.train, cfg.block_size, cfg.batch_size, generator, "cpu")
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        return loss.item()

    bar = _progress(num_iters, "lr-find", cfg.progress)
    lrs, losses = lr_sweep(train_step, start_lr, end_lr, num_iters,
                           progress=lambda i, lr, loss: (bar.update(1), bar.set_postfix(lr=f"{lr:.1e}", loss=f"{loss:.3f}")))
    bar.close()
    suggestion = suggest_lr(lrs, losses)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_lr_find(out_dir, lrs, losses, suggestion)
    log(f"lr-find: swept {lrs[0]:.1e} .. {lrs[-1]:.1e} over {len(lrs)} batches; suggested lr {suggestion:.2e}")
    return suggestion


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, unit="it")


# -------------------------------------------------------------------------------------- train

def plan_steps(step, step_time, eval_cost, time_left, eval_interval):
    """The step to end at so that the steps, an eval every eval_interval steps and one at the end
    fit in time_left (with 3% to spare): how --max-time sets the one-cycle length."""
    return step + max(2, int((time_left - eval_cost) / (step_time + eval_cost / eval_interval) * 0.97))


def agree(accelerator, value):
    """The largest of every process's value, so all processes of a DDP run take the same decision."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([float(value)], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return type(value)(t.item())


def train(cfg, log=print):
    """Train a story model as `cfg` says; returns (model, summary), the summary also in summary.json."""
    check(cfg)
    cfg.check_length()
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.device)
    main = accelerator.is_main_process
    say = log if main else (lambda *a, **k: None)

    resumed = None
    if cfg.resume:
        if not (is_story_checkpoint(out) and (out / STATE).is_file()):
            raise UserError(f"--resume: no checkpoint with training state in {out}; start a run without --resume")
        model, tokenizer, meta = load_checkpoint(out)
        resumed = load_train_state(out)
        if resumed["total_steps"] is not None and resumed["step"] >= resumed["total_steps"]:
            raise UserError(f"the run in {out} already finished ({resumed['step']} steps); start a new one in another --out")
        data = prepare_data(cfg, tokenizer)
        say(f"resuming from step {resumed['step']} in {out}")
    else:
        if is_story_checkpoint(out) and main:
            say(f"note: {out} already holds a checkpoint; it will be overwritten (use --resume to continue it)")
        data = prepare_data(cfg)
        torch.manual_seed(cfg.seed)
        model = GPT(model_config(cfg, data.tokenizer.vocab_size))
    say("corpus:\n" + data.report)

    if cfg.lr == "auto":
        lr = resumed["lr"] if resumed else find_lr(cfg, data, out_dir=out if main else None, log=say)
        say(f"--lr auto: using lr {lr:.2e}")
    else:
        lr = cfg.lr
    say(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config}")

    if main:
        out.mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(out)
    meta = {"tokenizer": data.tokenizer.kind, "train": {**asdict(cfg), "lr": lr}}

    optimizer = model.configure_optimizer(lr, cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    device = accelerator.device
    generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    tokens_per_step = cfg.batch_size * cfg.block_size * accelerator.num_processes

    step, elapsed_before, total_steps, scheduler, schedule_steps = 0, 0.0, cfg.max_iters, None, None
    if resumed:
        step, elapsed_before, total_steps = resumed["step"], resumed["elapsed_s"], resumed["total_steps"]
        generator.set_state(resumed["generator"][min(accelerator.process_index, len(resumed["generator"]) - 1)])
        if resumed["scheduler"] is not None:
            schedule_steps = resumed["schedule_steps"]
            scheduler = make_scheduler(optimizer, cfg.schedule, lr, schedule_steps, cfg.pct_start)
            scheduler.load_state_dict(resumed["scheduler"])
        # after the scheduler: creating one resets the optimizer's lr and betas
        optimizer.load_state_dict(resumed["optimizer"])
    if scheduler is None and cfg.max_time is None:
        total_steps = total_steps or cfg.max_iters
        schedule_steps = total_steps - step
        scheduler = make_scheduler(optimizer, cfg.schedule, lr, schedule_steps, cfg.pct_start)
    # else: --max-time; the schedule is planned once the throughput is measured (see below)

    if resumed and main:
        trim_metrics(out / "metrics.jsonl", step)  # a killed run may have logged past its last checkpoint
    metrics = MetricsLog(out / "metrics.jsonl", truncate=not resumed) if main else None
    bar = _progress(total_steps, "train", cfg.progress and main)
    bar.update(step)
    best_val = math.inf
    last = {"val_loss": None, "val_bpc": None}

    def run_eval():
        val_loss = evaluate(raw_model, data.val, cfg.block_size, cfg.batch_size, cfg.eval_iters)
        val_bpc = bits_per_char(val_loss, data.val_chars_per_token)
        sample = "".join(generate(raw_model, data.tokenizer, "\n", cfg.sample_chars, temperature=0.8, seed=cfg.seed))
        raw_model.train()
        return val_loss, val_bpc, sample

    def checkpoint():
        # every process's data sampler state, so a resumed DDP run draws what it would have drawn
        generators = [generator.get_state()]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            generators = gather_object(generators)
        if not main:
            return
        save_checkpoint(out, raw_model, {**meta, "step": step, "val_loss": last["val_loss"], "val_bpc": last["val_bpc"]})
        save_train_state(out, {
            "step": step, "total_steps": total_steps, "lr": lr, "elapsed_s": elapsed,
            "optimizer": optimizer.state_dict(), "schedule_steps": schedule_steps,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "generator": generators,
        })

    model.train()
    start = time.perf_counter()
    elapsed = elapsed_before
    t_log, step_log, first_step = start, step, step
    stopped_by = None
    calib_from = None  # (time, step) where throughput measurement for --max-time starts
    with StopSignal() as stop:
        while True:
            x, y = get_batch(data.train, cfg.block_size, cfg.batch_size, generator, device)
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            bar.update(1)
            now = time.perf_counter()
            elapsed = elapsed_before + now - start

            if scheduler is None and step - first_step >= 3:  # --max-time: measure, then plan the schedule
                if calib_from is None:  # the first steps are slow (allocations, warm-up): start here
                    calib_from = (now, step)
                elif agree(accelerator, int(now - calib_from[0] > 2.0 or step - calib_from[1] >= 50)):
                    step_time = (now - calib_from[0]) / (step - calib_from[1])
                    t0 = time.perf_counter()
                    last["val_loss"], last["val_bpc"], _ = run_eval()
                    eval_cost = time.perf_counter() - t0
                    time_left = cfg.max_time - (time.perf_counter() - start)
                    total_steps = agree(accelerator, plan_steps(step, step_time, eval_cost, time_left, cfg.eval_interval))
                    if cfg.max_iters is not None:
                        total_steps = min(total_steps, cfg.max_iters)
                    schedule_steps = total_steps - step
                    scheduler = make_scheduler(optimizer, cfg.schedule, lr, schedule_steps, cfg.pct_start)
                    bar.total = total_steps
                    bar.refresh()
                    say(f"--max-time {cfg.max_time:g}s: {step_time * 1e3:.1f} ms/step -> planned {total_steps} steps")
                    t_log = time.perf_counter()

            done = total_steps is not None and step >= total_steps
            out_of_time = cfg.max_time is not None and now - start >= cfg.max_time and not done
            stopped_by = [None, "time", "signal"][agree(accelerator, 2 if stop.name else int(out_of_time))]

            if step % cfg.log_interval == 0 or done or stopped_by:
                loss_value = loss.item()
                record = {"step": step, "train_loss": round(loss_value, 4),
                          "lr": optimizer.param_groups[0]["lr"],
                          "tokens_per_sec": round((step - step_log) * tokens_per_step / max(now - t_log, 1e-9), 1),
                          "elapsed_s": round(elapsed, 2)}
                if total_steps:
                    record["total_steps"] = total_steps
                t_log, step_log = now, step
                if step % cfg.eval_interval == 0 or done or stopped_by:
                    last["val_loss"], last["val_bpc"], sample = run_eval()
                    best_val = min(best_val, last["val_loss"])
                    record.update(val_loss=round(last["val_loss"], 4), val_bpc=round(last["val_bpc"], 4), sample=sample)
                    checkpoint()
                    if main:
                        bar.write(f"step {step}: train {loss_value:.4f}  val {last['val_loss']:.4f} nats/token, "
                                  f"{last['val_bpc']:.4f} bpc  | {sample[:70]!r}")
                    t_log = time.perf_counter()  # evals are not counted as training throughput
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                if metrics:
                    metrics.log(**record)
            if done or stopped_by:
                break
    bar.close()

    summary = {"steps": step, "total_steps": total_steps, "stopped_by": stopped_by or "done",
               "final_val_loss": last["val_loss"], "final_val_bpc": last["val_bpc"],
               "best_val_loss": best_val if best_val < math.inf else None,
               "elapsed_s": round(elapsed, 2), "tokens_seen": step * tokens_per_step, "lr": lr,
               "params": raw_model.num_params(), "tokenizer": data.tokenizer.kind}
    if main:
        metrics.close()
        write_json(out / "summary.json", summary)
        say(f"saved {out} (step {step}, val {last['val_loss']:.4f} nats/token, {last['val_bpc']:.4f} bpc)"
            + (" after a stop request" if stopped_by == "signal" else ""))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return raw_model, summary


def evaluate_checkpoint(ckpt, data_paths, val_fraction=0.1, batch_size=32, device="cpu"):
    """val_loss (nats/token) and val_bpc of a checkpoint on the validation split of data_paths."""
    model, tokenizer, meta = load_checkpoint(ckpt, device)
    cfg = TrainConfig(data=list(data_paths), block_size=model.config.block_size, val_fraction=val_fraction)
    data = prepare_data(cfg, tokenizer)
    loss = evaluate(model, data.val, model.config.block_size, batch_size)
    return {"val_loss": round(loss, 4), "val_bpc": round(bits_per_char(loss, data.val_chars_per_token), 4),
            "val_tokens": len(data.val), "step": meta.get("step")}

