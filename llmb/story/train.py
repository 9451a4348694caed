"""Training the story model: data, optimizer, schedule, evaluation, checkpoints.

One loop serves a laptop CPU, a GPU (mixed precision) and several processes under
`accelerate launch` / `torchrun` (DDP via accelerate). It stops after --max-iters steps or
a wall-clock budget --max-time, saves at every eval, and a SIGINT/SIGTERM makes it save
and exit cleanly. A run goes through five phases, one function each:

    prepare          check the settings and --out, read the data, build or restore model and optimizer
    plan_schedule    the learning-rate schedule (under --max-time, once the throughput is measured)
    train_step       one optimizer step on one batch
    evaluate_and_save   val loss, bits per character, a sample, and a checkpoint
    finish           summary.json (the run contract of llmb.runlog), also when the run fails
"""

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmb.device import resolve_device
from llmb.errors import UserError
from llmb.folders import check_out_folder, check_writable, is_story_checkpoint
from llmb.runlog import MetricsLog, StopSignal, trim_metrics, write_summary
from llmb.settings import check, check_number
from llmb.story.checkpoint import STATE, load_checkpoint, load_train_state, save_checkpoint
from llmb.story.config import SAFE_ON_RESUME, TrainConfig, check_memory
from llmb.story.corpus import load_corpus
from llmb.story.model import GPT, GPTConfig
from llmb.story.sample import generate
from llmb.story.tokenizer import build_tokenizer

LN2 = math.log(2)
CALIBRATION_STEPS = 10**6  # --max-time: the provisional schedule's length, so calibration runs at its warm-up start
NEW_METRICS = ".metrics.new.jsonl"  # an --overwrite run logs here until its first checkpoint replaces the old run


# ---------------------------------------------------------------------------------------- data

@dataclass
class Data:
    tokenizer: object
    train: torch.Tensor
    val: torch.Tensor
    val_chars: int  # characters of the val split the tokens stand for (unencodable ones left out)
    unknown_chars: int  # characters of the val split the tokenizer cannot encode
    report: str
    train_unknown: int = 0  # training characters a saved tokenizer cannot encode (the text changed)

    @property
    def val_chars_per_token(self):  # to turn nats/token into bits/character
        return self.val_chars / len(self.val)


def prepare_data(cfg, tokenizer=None):
    """Read the corpus, build (or reuse) the tokenizer, encode the train and val splits.

    A trained subword vocabulary sees the training split only; the character vocabulary is every
    character of the corpus (so every val character counts in bits per character).
    """
    corpus = load_corpus(cfg.data)
    train_text, val_text = corpus.split(cfg.val_fraction)
    train_unknown = 0
    if tokenizer is None:
        text = train_text + val_text if cfg.tokenizer == "char" else train_text
        tokenizer = build_tokenizer(cfg.tokenizer, text, cfg.vocab_size)
    else:
        train_unknown = tokenizer.count_unknown(train_text)
    train = torch.tensor(tokenizer.encode(train_text, drop_unknown=True), dtype=torch.long)
    val = torch.tensor(tokenizer.encode(val_text, drop_unknown=True), dtype=torch.long)
    for name, ids in (("training", train), ("validation", val)):
        if len(ids) <= cfg.block_size:
            raise UserError(
                f"the {name} split has {len(ids)} tokens, fewer than one block ({cfg.block_size} + 1); "
                "give more text or a smaller --block-size"
            )
    unknown = tokenizer.count_unknown(val_text)
    report = corpus.report() + (f"\n  tokens: {len(train):,} train, {len(val):,} val "
                                f"({tokenizer.kind}, vocab {tokenizer.vocab_size})")
    for warning in corpus.warnings + data_warnings(tokenizer.lossless, unknown, len(val_text)):
        report += f"\n  warning: {warning}"
    return Data(tokenizer, train, val, len(val_text) - unknown, unknown, report, train_unknown)


def data_warnings(lossless, unknown, val_chars):
    """What makes bits per character partial (unencodable characters) or not comparable (a lossy tokenizer)."""
    notes = []
    if unknown:
        notes.append(f"{unknown:,} of {val_chars:,} validation characters cannot be encoded; "
                     "bits per character leave them out")
    if not lossless:
        notes.append("this tokenizer is lossy (it drops whitespace): its bits per character are not "
                     "comparable with a character or bpe model's")
    return notes


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


def bpc_label(tokenizer):
    return "bpc" if tokenizer.lossless else "bpc (lossy tokenizer)"


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


def advance(scheduler, steps):
    """Move a new scheduler `steps` steps along its curve (both schedules compute lr from the step)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        for _ in range(steps):
            scheduler.step()


def plan_steps(step, step_time, eval_cost, time_left, eval_interval):
    """The step to end at so that the steps, an eval every eval_interval steps and one at the end
    fit in time_left (with 3% to spare): how --max-time sets the one-cycle length."""
    return step + max(2, int((time_left - eval_cost) / (step_time + eval_cost / eval_interval) * 0.97))


def plan_schedule(run, total_steps):
    """The schedule from run.schedule_start to total_steps, moved on to the current step.

    Under --max-time the calibration steps ran at the warm-up's first lr (a provisional schedule
    too long to leave it); the planned schedule starts from there, so one-cycle never restarts.
    On resume the same call rebuilds the schedule where the run stopped (with a new --max-iters,
    the curve is stretched to end there).
    """
    run.total_steps = total_steps
    run.scheduler = make_scheduler(run.optimizer, run.cfg.schedule, run.lr, total_steps - run.schedule_start,
                                   run.cfg.pct_start)
    advance(run.scheduler, run.step - run.schedule_start)


def calibrate(run, now):
    """--max-time: after the first slow steps, time ~50 steps and an eval, then plan the schedule."""
    cfg = run.cfg
    if run.calib_from is None:
        run.calib_from = (now, run.step)  # the first steps are slow (allocations, warm-up): start here
        return
    if not agree(run.accelerator, int(now - run.calib_from[0] > 2.0 or run.step - run.calib_from[1] >= 50)):
        return
    step_time = (now - run.calib_from[0]) / (run.step - run.calib_from[1])
    t0 = time.perf_counter()
    run.last["val_loss"], run.last["val_bpc"], _ = run_eval(run, sample_chars=0)
    total = steps_in_time(run, step_time, eval_cost=time.perf_counter() - t0)
    run.schedule_start = run.step  # the planned schedule starts here, at the lr the calibration used
    adopt_plan(run, total, f"--max-time {cfg.max_time:g}s: {step_time * 1e3:.1f} ms/step -> planned {total} steps")
    run.t_log = time.perf_counter()


def steps_in_time(run, step_time, eval_cost):
    """--max-time: the step to end at, from the measured speed and the time left (every process agrees)."""
    time_left = run.cfg.max_time - (time.perf_counter() - run.start)
    total = agree(run.accelerator, plan_steps(run.step, step_time, eval_cost, time_left, run.cfg.eval_interval))
    return min(total, run.cfg.max_iters or total)


def adopt_plan(run, total, message):
    """Schedule the run to end at step `total` (from run.schedule_start) and remember when it was planned."""
    plan_schedule(run, total)
    run.bar.total = total
    run.bar.refresh()
    run.say(message)
    run.plan_from = (time.perf_counter(), run.step, run.eval_time)


def replan(run):
    """--max-time, at each eval: plan the rest again from the speed measured since the last plan.

    A machine's speed drifts (by a third within one run here), so a single plan can leave a fifth
    of the time unused, or run out of it before the anneal ends. The new schedule keeps the old one's
    progress (the share of the cycle done), so the lr goes on from where it is: still rising in the
    warm-up, still falling after it, and one-cycle never restarts.
    """
    t0, step0, eval0 = run.plan_from
    progress = (run.step - run.schedule_start) / (run.total_steps - run.schedule_start)
    if run.step - step0 < 10 or progress > 0.8:  # the last fifth runs as planned: its 3% margin is not too thin
        return
    step_time = (time.perf_counter() - t0 - (run.eval_time - eval0)) / (run.step - step0)
    total = steps_in_time(run, step_time, run.eval_cost)
    if abs(total - run.total_steps) < 0.02 * (run.total_steps - run.step):
        return
    run.schedule_start = total - round((total - run.step) / (1 - progress))  # same progress at this step
    adopt_plan(run, total, f"--max-time: {step_time * 1e3:.1f} ms/step since the last plan -> now {total} steps")


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


def agree(accelerator, value):
    """The largest of every process's value, so all processes of a DDP run take the same decision."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([float(value)], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return type(value)(t.item())


# ----------------------------------------------------------------------------------- LR finder

def find_lr(cfg, data=None, num_iters=200, start_lr=1e-5, end_lr=1.0, out_dir=None, log=print):
    """Run the LR range test on a fresh model; write lr_find.json/png to out_dir; return the suggestion."""
    from llmb.story.lr_finder import lr_sweep, save_lr_find, suggest_lr

    check(cfg)
    num_iters = check_number("--num-iters", num_iters, 10, 100_000, int)
    start_lr = check_number("--start-lr", start_lr, 1e-12, 10.0)
    end_lr = check_number("--end-lr", end_lr, start_lr * 10, 1e3)
    if out_dir is not None:
        check_writable(out_dir)
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
    try:
        suggestion = suggest_lr(lrs, losses)
    except ValueError:
        raise UserError(f"the loss diverged after {len(lrs)} batches, too few to suggest a rate; "
                        "lower --start-lr") from None
    if out_dir is not None:
        try:
            save_lr_find(Path(out_dir), lrs, losses, suggestion)
        except OSError as e:
            raise UserError(f"could not write the LR-finder files in {out_dir}: {e.strerror or e}") from None
    log(f"lr-find: swept {lrs[0]:.1e} .. {lrs[-1]:.1e} over {len(lrs)} batches; suggested lr {suggestion:.2e}")
    return suggestion


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, unit="it")


# -------------------------------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything the phases of one training run share."""

    cfg: TrainConfig
    out: Path
    accelerator: object
    say: object
    data: Data = None
    model: object = None  # what accelerate wraps (DDP); raw_model is the GPT itself
    raw_model: object = None
    optimizer: object = None
    scheduler: object = None
    lr: float = None  # the peak learning rate
    lr_used: float = None  # the learning rate of the last step
    generator: object = None
    metrics: MetricsLog = None
    bar: object = None
    replace: bool = False  # the folder holds another run's checkpoint; the first save replaces it
    saved: bool = False  # this run has saved a checkpoint
    saved_step: int = None  # the step of the checkpoint in out (resumable), this run's or the resumed one's
    step: int = 0
    total_steps: int = None
    schedule_start: int = 0
    elapsed_before: float = 0.0
    start: float = 0.0
    t_log: float = 0.0
    step_log: int = 0
    calib_from: tuple = None
    plan_from: tuple = None  # --max-time: (time, step, eval_time) when the schedule was last planned
    eval_time: float = 0.0  # seconds spent in evals and saves during this invocation
    eval_cost: float = 0.0  # seconds the last eval and save took
    last: dict = field(default_factory=lambda: {"train_loss": None, "val_loss": None, "val_bpc": None})
    best_val: float = math.inf

    @property
    def main(self):
        return self.accelerator.is_main_process

    @property
    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.start

    @property
    def tokens_per_step(self):
        return self.cfg.batch_size * self.cfg.block_size * self.accelerator.num_processes


def open_run(cfg, log):
    """Check the settings and --out; (Run, saved state or None). Nothing is written yet."""
    check(cfg)
    cfg.check_length()
    found = check_out_folder(cfg.out, "story", overwrite=cfg.overwrite, resume=cfg.resume)
    out = Path(cfg.out)
    accelerator = make_accelerator(cfg.device)
    say = log if accelerator.is_main_process else (lambda *a, **k: None)
    run = Run(cfg, out, accelerator, say)
    if not cfg.resume:
        run.replace = found is not None  # --overwrite: the first save replaces what is there
        return run, None
    if not (is_story_checkpoint(out) and (out / STATE).is_file()):
        raise UserError(f"--resume: no checkpoint with training state in {out}; start a run without --resume")
    state = load_train_state(out)
    run.saved_step = state["step"]
    return run, state


def check_resume(cfg, saved):
    """Refuse a --resume whose settings change the run itself (the model, the data, the optimizer)."""
    changed = []
    for name, old in saved.items():
        new = getattr(cfg, name, old)
        if name in SAFE_ON_RESUME or (name == "lr" and new == "auto"):
            continue
        if name == "data":
            new, old = [str(Path(p).resolve()) for p in new], [str(Path(p).resolve()) for p in old]
        if new != old:
            changed.append(f"--{name.replace('_', '-')} {old} -> {new}")
    if changed:
        raise UserError(f"--resume cannot change {', '.join(changed)}: they are part of the saved run; "
                        "drop them, or start a new run in another --out")


def prepare(cfg, log=print):
    """Phase 1: settings, data, model and optimizer, fresh or restored from --out for --resume."""
    run, state = open_run(cfg, log)
    if state is not None:
        model, tokenizer, meta = load_checkpoint(run.out)
        if not isinstance(meta.get("train"), dict) or "lr" not in meta["train"]:
            raise UserError(f"{run.out / 'config.json'} has no training settings to resume with; "
                            "start a new run with --overwrite")
        check_resume(cfg, meta["train"])
        run.data = prepare_data(cfg, tokenizer)
        if run.data.train_unknown:
            raise UserError(f"the training text has {run.data.train_unknown:,} character(s) not in the saved "
                            "vocabulary: the data changed since the run started; start a new run")
        run.lr = meta["train"]["lr"]
    else:
        run.data = prepare_data(cfg)
        torch.manual_seed(cfg.seed)
        model = GPT(model_config(cfg, run.data.tokenizer.vocab_size))
    if run.accelerator.device.type == "cuda":
        memory = torch.cuda.get_device_properties(run.accelerator.device).total_memory
        check_memory(cfg, memory, "the GPU's memory", run.data.tokenizer.vocab_size)
    run.say("corpus:\n" + run.data.report)
    if run.lr is None and cfg.lr == "auto":
        run.lr = find_lr(cfg, run.data, out_dir=run.out if run.main else None, log=run.say)
        run.say(f"--lr auto: using lr {run.lr:.2e}")
    run.lr = run.lr if run.lr is not None else cfg.lr
    run.say(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config}")

    optimizer = model.configure_optimizer(run.lr, cfg.weight_decay)
    run.model, run.optimizer = run.accelerator.prepare(model, optimizer)
    run.raw_model = run.accelerator.unwrap_model(run.model)
    run.generator = torch.Generator().manual_seed(cfg.seed + run.accelerator.process_index)
    if state is not None:
        restore(run, state)
    elif cfg.max_time is None:
        plan_schedule(run, cfg.max_iters)
    if run.scheduler is None:  # --max-time: calibrate at the schedule's start, plan once measured
        run.scheduler = make_scheduler(run.optimizer, cfg.schedule, run.lr, CALIBRATION_STEPS, cfg.pct_start)
        advance(run.scheduler, run.step - run.schedule_start)
    open_metrics(run, resumed=state is not None)
    return run


def restore(run, state):
    """Put a saved run back: step, clock, schedule, optimizer and every random state (exact resume)."""
    cfg = run.cfg
    if "random" not in state:
        raise UserError(f"{run.out / STATE} was saved by an older llmb and cannot resume exactly; start a new run")
    run.step, run.elapsed_before = state["step"], state["elapsed_s"]
    run.schedule_start, total = state["schedule_start"], state["total_steps"]
    run.say(f"resuming from step {run.step} in {run.out}")
    if cfg.max_iters is not None and cfg.max_iters != state["max_iters"]:
        if cfg.max_iters <= run.step:
            raise UserError(f"the run in {run.out} is at step {run.step}; give --max-iters above that")
        run.say(f"--max-iters {cfg.max_iters}: the schedule now ends at step {cfg.max_iters} (it ended at {total})")
        total = cfg.max_iters
    if total is not None and run.step >= total:
        raise UserError(f"the run in {run.out} already finished ({run.step} steps); give a larger --max-iters "
                        "to train on, or start a new run in another --out")
    if total is not None:
        plan_schedule(run, total)
    else:  # stopped while --max-time was still measuring: measure again from here
        run.schedule_start = run.step
    run.optimizer.load_state_dict(state["optimizer"])  # after the scheduler: making one resets lr and betas
    rank = state["random"][min(run.accelerator.process_index, len(state["random"]) - 1)]
    run.generator.set_state(rank["batches"])
    torch.set_rng_state(rank["torch"])  # dropout draws from the global generator
    if rank["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rank["cuda"])


def open_metrics(run, resumed):
    run.bar = _progress(run.total_steps, "train", run.cfg.progress and run.main)
    run.bar.update(run.step)
    if not run.main:
        return
    if resumed:
        trim_metrics(run.out / "metrics.jsonl", run.step)  # a killed run may have logged past its last checkpoint
    path = run.out / (NEW_METRICS if run.replace else "metrics.jsonl")
    run.metrics = MetricsLog(path, truncate=not resumed)


# ---------------------------------------------------------------------------------- one step

def train_step(run):
    """Phase 3: one batch forward and backward, one optimizer and schedule step; the loss."""
    x, y = get_batch(run.data.train, run.cfg.block_size, run.cfg.batch_size, run.generator, run.accelerator.device)
    _, loss = run.model(x, y)
    run.optimizer.zero_grad(set_to_none=True)
    run.accelerator.backward(loss)
    if run.cfg.grad_clip:
        run.accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.lr_used = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    run.step += 1
    return loss


# -------------------------------------------------------------------------- evaluate and save

def run_eval(run, sample_chars=None):
    cfg = run.cfg
    val_loss = evaluate(run.raw_model, run.data.val, cfg.block_size, cfg.batch_size, cfg.eval_iters)
    val_bpc = bits_per_char(val_loss, run.data.val_chars_per_token)
    n = cfg.sample_chars if sample_chars is None else sample_chars
    sample = "".join(generate(run.raw_model, run.data.tokenizer, "\n", n, temperature=0.8, seed=cfg.seed)) if n else ""
    run.raw_model.train()
    return val_loss, val_bpc, sample


def evaluate_and_save(run, record):
    """Phase 4: evaluate, add the figures to this step's record, save a checkpoint."""
    val_loss, val_bpc, sample = run_eval(run)
    run.last.update(val_loss=val_loss, val_bpc=val_bpc)
    run.best_val = min(run.best_val, val_loss)
    record.update(val_loss=round(val_loss, 4), val_bpc=round(val_bpc, 4), sample=sample)
    save(run)
    if run.main:
        run.bar.write(f"step {run.step}: train {record['train_loss']:.4f}  val {val_loss:.4f} nats/token, "
                      f"{val_bpc:.4f} {bpc_label(run.data.tokenizer)}  | {sample[:70]!r}")


def save(run):
    """A checkpoint with everything --resume needs, every process's random states included."""
    random = [{"batches": run.generator.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        random = gather_object(random)
    if not run.main:
        return
    cfg = run.cfg
    meta = {"tokenizer": run.data.tokenizer.kind, "train": {**asdict(cfg), "lr": run.lr},
            "step": run.step, "val_loss": run.last["val_loss"], "val_bpc": run.last["val_bpc"]}
    state = {"step": run.step, "total_steps": run.total_steps, "max_iters": cfg.max_iters,
             "schedule_start": run.schedule_start, "elapsed_s": run.elapsed,
             "optimizer": run.optimizer.state_dict(), "random": random}
    save_checkpoint(run.out, run.raw_model, run.data.tokenizer, meta, state, replace=run.replace)
    if run.replace:  # the old run is gone now: its log and summary go too
        os.replace(run.out / NEW_METRICS, run.out / "metrics.jsonl")
        (run.out / "summary.json").unlink(missing_ok=True)
        run.replace = False
    run.saved, run.saved_step = True, run.step


# ---------------------------------------------------------------------------------- the loop

def train(cfg, log=print):
    """Train a story model as `cfg` says; returns (model, summary), the summary also in summary.json."""
    run = prepare(cfg, log)
    stopped_by = "error"
    try:
        stopped_by = loop(run)
    finally:
        summary = finish(run, stopped_by)
    return run.raw_model, summary


def loop(run):
    """Steps until the step budget, the time budget or a stop signal; how the run ended."""
    cfg = run.cfg
    run.raw_model.train()
    run.start = run.t_log = time.perf_counter()
    run.step_log = first_step = run.step
    if cfg.max_time is not None and run.total_steps is not None:  # resumed after planning: replan from here
        run.plan_from = (run.start, run.step, 0.0)
    with StopSignal() as stop:
        while True:
            loss = train_step(run)
            run.bar.update(1)
            now = time.perf_counter()
            if run.total_steps is None and run.step - first_step >= 3:
                calibrate(run, now)
            done = run.total_steps is not None and run.step >= run.total_steps
            out_of_time = cfg.max_time is not None and now - run.start >= cfg.max_time and not done
            stopped_by = [None, "time", "signal"][agree(run.accelerator, 2 if stop.name else int(out_of_time))]
            evaluate_now = run.step % cfg.eval_interval == 0 or done or stopped_by
            if run.step % cfg.log_interval == 0 or evaluate_now:
                log_step(run, loss.item(), now, evaluate_now)
            if done or stopped_by:
                return stopped_by or "done"
            if evaluate_now and cfg.max_time is not None and run.plan_from is not None:
                replan(run)


def log_step(run, loss, now, evaluate_now):
    """One metrics.jsonl record (the run contract's fields), with an eval and a save when due."""
    run.last["train_loss"] = loss
    tokens_per_sec = (run.step - run.step_log) * run.tokens_per_step / max(now - run.t_log, 1e-9)
    record = {"step": run.step, "train_loss": round(loss, 4), "lr": run.lr_used,
              "tokens_per_sec": round(tokens_per_sec, 1), "elapsed_s": round(run.elapsed, 2),
              "total_steps": run.total_steps}
    run.t_log, run.step_log = now, run.step
    if evaluate_now:
        evaluate_and_save(run, record)
        run.t_log = time.perf_counter()  # evals are not counted as training throughput
        run.eval_cost = run.t_log - now
        run.eval_time += run.eval_cost
    if run.main:
        run.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_sec:.0f}")
        run.metrics.log(**record)


def finish(run, stopped_by):
    """Phase 5: summary.json and the closing line. After a failure the summary says "error" and the
    last good checkpoint stays; an --overwrite run that failed before saving leaves the old run untouched."""
    extra = dict(final_val_bpc=run.last["val_bpc"], bpc_lossless=run.data.tokenizer.lossless,
                 best_val_loss=run.best_val if run.best_val < math.inf else None,
                 tokens_seen=run.step * run.tokens_per_step, lr=run.lr, params=run.raw_model.num_params(),
                 tokenizer=run.data.tokenizer.kind, saved_step=run.saved_step)
    summary = {"steps": run.step, "total_steps": run.total_steps, "stopped_by": stopped_by, **extra}
    run.bar.close()
    if run.main:
        run.metrics.close()
        if not run.replace:
            try:
                summary = write_summary(run.out, data=run.cfg.data, steps=run.step, total_steps=run.total_steps,
                                        train_loss=run.last["train_loss"], val_loss=run.last["val_loss"],
                                        elapsed_s=run.elapsed, stopped_by=stopped_by, **extra)
            except OSError as e:  # a full disk: say so, and let the run's own outcome (or error) stand
                run.say(f"warning: could not write {run.out / 'summary.json'}: {e.strerror or e}")
        if stopped_by != "error":
            run.say(f"saved {run.out} (step {run.step}, val {run.last['val_loss']:.4f} nats/token, "
                    f"{run.last['val_bpc']:.4f} {bpc_label(run.data.tokenizer)})"
                    + (" after a stop request" if stopped_by == "signal" else ""))
    if stopped_by != "error":
        run.accelerator.wait_for_everyone()
        run.accelerator.end_training()
    return summary


# -------------------------------------------------------------------------------------- eval

def evaluate_checkpoint(ckpt, data_paths, val_fraction=0.1, batch_size=32, device="cpu"):
    """val_loss (nats/token) and val_bpc of a checkpoint on the validation split of data_paths,
    with how many val characters the checkpoint's tokenizer could not encode (left out of bpc)."""
    model, tokenizer, meta = load_checkpoint(ckpt, device)
    cfg = check(TrainConfig(data=list(data_paths), block_size=model.config.block_size, val_fraction=val_fraction,
                            batch_size=batch_size, device=device))
    data = prepare_data(cfg, tokenizer)
    loss = evaluate(model, data.val, model.config.block_size, cfg.batch_size)
    return {"val_loss": round(loss, 4), "val_bpc": round(bits_per_char(loss, data.val_chars_per_token), 4),
            "bpc_lossless": tokenizer.lossless, "unencodable_chars": data.unknown_chars,
            "val_chars": data.val_chars + data.unknown_chars,
            "val_tokens": len(data.val), "step": meta.get("step")}
