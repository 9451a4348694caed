"""Training the story model: the run, its loop, evaluation and checkpoints.

One loop serves a laptop CPU, a GPU (mixed precision) and several processes under
`accelerate launch` / `torchrun` (DDP via accelerate). It stops after --max-iters steps or
a wall-clock budget --max-time, saves at every eval, and a SIGINT/SIGTERM makes it save
and exit within seconds: the step (or eval) in progress is dropped and the last completed
step is saved (`save_at_stop`; llmb.runlog.StopSignal). A run goes through four phases, one function each:

    prepare             check the settings and --out, read the data, build or restore model and optimizer
    train_step          one optimizer step on one batch
    evaluate_and_save   val loss, bits per character, a sample, and a checkpoint
    finish              summary.json (the run contract of llmb.runlog), also when the run fails

`loop` calls them in turn, logs each step, and under --max-time plans the schedule once the speed
is measured (`calibrate`) and again at each eval (`replan`). The data (splits, batches, the val loss) is in
llmb.story.batches, the learning-rate schedule and the --max-time budget in llmb.story.schedule,
the LR finder (--lr auto) in llmb.story.lr_finder.
"""

import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from llmb.device import resolve_device
from llmb.errors import UserError
from llmb.folders import check_out_folder, is_story_checkpoint, one_writer
from llmb.runlog import (
    NEW_PROGRESS,
    PROGRESS,
    MetricsLog,
    StepAbandoned,
    StopSignal,
    trim_metrics,
    write_stopping,
    write_summary,
)
from llmb.settings import check
from llmb.stopping import stop_points_in_backward
from llmb.story.batches import Data, bits_per_char, bpc_label, evaluate, get_batch, prepare_data
from llmb.story.checkpoint import STATE, load_checkpoint, load_train_state, save_checkpoint
from llmb.story.config import SAFE_ON_RESUME, TrainConfig, check_memory
from llmb.story.lr_finder import find_lr
from llmb.story.model import GPT, GPTConfig
from llmb.story.sample import generate
from llmb.story.schedule import Schedule, TimeBudget

NEW_METRICS = ".metrics.new.jsonl"  # an --overwrite run logs here until its first checkpoint replaces the old run
STOP_REASONS = (None, "time", "signal")  # why a run stops early, by rank: when processes differ, a signal wins


# ----------------------------------------------------------------------- every process alike

def make_accelerator(device):
    from accelerate import Accelerator

    use_cuda = resolve_device(device) == "cuda"
    precision = "no"
    if use_cuda:
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Accelerator(cpu=not use_cuda, mixed_precision=precision)


def max_over_processes(accelerator, value):
    """The largest of every process's value, so all processes of a DDP run take the same decision."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([float(value)], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return type(value)(t.item())


def agreed_stop(accelerator, reason):
    """Why every process stops (a name of STOP_REASONS; None: go on), from this process's own reason."""
    return STOP_REASONS[max_over_processes(accelerator, STOP_REASONS.index(reason))]


# -------------------------------------------------------------------------------------- the run

class Throughput:
    """Training tokens per second between two records, the time spent in evals left out."""

    def __init__(self, tokens_per_step, now, step):
        self.tokens_per_step, self.since, self.since_step = tokens_per_step, now, step

    def rate(self, now, step):
        """Tokens per second since the last call (or the last pause); the next rate counts from here."""
        rate = (step - self.since_step) * self.tokens_per_step / max(now - self.since, 1e-9)
        self.since, self.since_step = now, step
        return rate

    def pause_ended(self):
        """Training resumes after an eval or a plan: their time is not training time."""
        self.since = time.perf_counter()


@dataclass
class Run:
    """Everything the phases of one training run share."""

    cfg: TrainConfig
    out: Path
    accelerator: object
    say: object
    budget: TimeBudget = None  # --max-time
    data: Data = None
    model: object = None  # what accelerate wraps (DDP); raw_model is the GPT itself
    raw_model: object = None
    optimizer: object = None
    schedule: Schedule = None
    lr: float = None  # the peak learning rate
    lr_used: float = None  # the learning rate of the last step
    generator: object = None
    metrics: MetricsLog = None
    bar: object = None
    throughput: Throughput = None
    stop: StopSignal = None  # the stop signal, while the loop runs
    replace: bool = False  # the folder holds another run's checkpoint; the first save replaces it
    saved_step: int = None  # the step of the checkpoint in out (resumable), this run's or the resumed one's
    step: int = 0
    loss: object = None  # the last completed step's loss (a tensor)
    logged_step: int = None  # the step of the last metrics record
    elapsed_before: float = 0.0  # seconds trained before a --resume
    start: float = 0.0  # when this invocation's training began (time.perf_counter)
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
    budget = None
    if cfg.max_time is not None:
        budget = TimeBudget(cfg.max_time, cfg.eval_interval, cfg.max_iters, partial(max_over_processes, accelerator))
    run = Run(cfg, out, accelerator, say, budget)
    if not cfg.resume:
        run.replace = found is not None  # --overwrite: the first save replaces what is there
        return run, None
    if not (is_story_checkpoint(out) and (out / STATE).is_file()):
        raise UserError(f"--resume: no checkpoint with training state in {out}; start a run without --resume")
    state = load_train_state(out)
    run.saved_step = state["step"]
    return run, state


def check_resume(cfg, saved):
    """Refuse a --resume whose settings change the run itself (the model, the data, the optimizer); a
    setting left to auto takes the saved run's value."""
    changed = []
    for name, old in saved.items():
        new = getattr(cfg, name, old)
        if name in SAFE_ON_RESUME or (name == "lr" and new == "auto"):
            continue
        if name == "n_layer" and new == "auto":  # auto on --resume: the saved run's depth
            cfg.n_layer = old
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
        model = GPT(GPTConfig(vocab_size=run.data.tokenizer.vocab_size, **cfg.model_settings()))
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
    stop_points_in_backward(run.raw_model)
    run.generator = torch.Generator().manual_seed(cfg.seed + run.accelerator.process_index)
    run.schedule = Schedule(run.optimizer, cfg.schedule, run.lr, cfg.pct_start)
    if state is not None:
        restore(run, state)
    elif cfg.max_time is None:
        run.schedule.plan(cfg.max_iters, run.step)
    if run.schedule.scheduler is None:  # --max-time: calibrate at the schedule's start, plan once measured
        run.schedule.provisional(run.step)
    open_metrics(run, resumed=state is not None)
    return run


def restore(run, state):
    """Put a saved run back: step, clock, schedule, optimizer and every random state (exact resume)."""
    cfg = run.cfg
    if "random" not in state:
        raise UserError(f"{run.out / STATE} was saved by an older llmb and cannot resume exactly; start a new run")
    run.step, run.elapsed_before = state["step"], state["elapsed_s"]
    run.schedule.start, total = state["schedule_start"], state["total_steps"]
    run.say(f"resuming from step {run.step} in {run.out}")
    if cfg.max_iters is not None and cfg.max_iters != state["max_iters"]:
        if cfg.max_iters <= run.step:
            raise UserError(f"the run in {run.out} is at step {run.step}; give --max-iters above that")
        run.say(f"--max-iters {cfg.max_iters}: the schedule now ends at step {cfg.max_iters} (it ended at {total})")
        total = cfg.max_iters
    if total is None and run.budget is None:  # stopped while --max-time was measuring; resumed with --max-iters only
        total = cfg.max_iters
    if total is not None and run.step >= total:
        raise UserError(f"the run in {run.out} already finished ({run.step} steps); give --max-iters above "
                        f"{run.step} to train on (its learning-rate schedule is lengthened; more --max-time alone "
                        "cannot reopen a finished schedule), or start a new run in another --out")
    if total is not None:
        run.schedule.plan(total, run.step)
    else:  # stopped while --max-time was still measuring: measure again from here
        run.schedule.start = run.step
    run.optimizer.load_state_dict(state["optimizer"])  # after the scheduler: making one resets lr and betas
    rank = state["random"][min(run.accelerator.process_index, len(state["random"]) - 1)]
    run.generator.set_state(rank["batches"])
    torch.set_rng_state(rank["torch"])  # dropout draws from the global generator
    if rank["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rank["cuda"])


def open_metrics(run, resumed):
    from tqdm.auto import tqdm

    run.bar = tqdm(total=run.schedule.total, desc="train", disable=not (run.cfg.progress and run.main),
                   dynamic_ncols=True, unit="it")
    run.bar.update(run.step)
    if not run.main:
        return
    if resumed:
        trim_metrics(run.out / "metrics.jsonl", run.step)  # a killed run may have logged past its last checkpoint
    path = run.out / (NEW_METRICS if run.replace else "metrics.jsonl")
    run.metrics = MetricsLog(path, truncate=not resumed)


# ---------------------------------------------------------------------------------- one step

def train_step(run):
    """Phase 2: one batch forward and backward (dropped by a stop signal: StepAbandoned), one optimizer and
    schedule step; the loss."""
    with run.stop.abandonable(run.generator):
        x, y = get_batch(run.data.train, run.cfg.block_size, run.cfg.batch_size, run.generator,
                         run.accelerator.device)
        _, loss = run.model(x, y)
        run.optimizer.zero_grad(set_to_none=True)
        run.accelerator.backward(loss)
    if run.cfg.grad_clip:
        run.accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.lr_used = run.optimizer.param_groups[0]["lr"]
    run.schedule.step()
    run.step += 1
    run.loss = loss
    return loss


# -------------------------------------------------------------------------- evaluate and save

def run_eval(run, sample_chars=None):
    """(val loss in nats/token, bits per character, a sample of `sample_chars` or --sample-chars); a stop signal
    drops it (StepAbandoned)."""
    cfg = run.cfg
    n = cfg.sample_chars if sample_chars is None else sample_chars
    with run.stop.abandonable():
        val_loss = evaluate(run.raw_model, run.data.val, cfg.block_size, cfg.batch_size, cfg.eval_iters)
        sample = "".join(generate(run.raw_model, run.data.tokenizer, "\n", n, temperature=0.8, seed=cfg.seed)) \
            if n else ""
    val_bpc = bits_per_char(val_loss, run.data.val_chars_per_token)
    run.raw_model.train()
    return val_loss, val_bpc, sample


def evaluate_and_save(run, record, now):
    """Phase 3: evaluate, add the figures to this step's record, save a checkpoint; `now`: when it began."""
    val_loss, val_bpc, sample = run_eval(run)
    run.last.update(val_loss=val_loss, val_bpc=val_bpc)
    run.best_val = min(run.best_val, val_loss)
    record.update(val_loss=round(val_loss, 4), val_bpc=round(val_bpc, 4), sample=sample)
    save(run)
    if run.main:
        run.bar.write(f"step {run.step}: train {record['train_loss']:.4f}  val {val_loss:.4f} nats/token, "
                      f"{val_bpc:.4f} {bpc_label(run.data.tokenizer)}  | {sample[:70]!r}")
    run.throughput.pause_ended()  # evals are not counted as training throughput
    if run.budget is not None:
        run.budget.evaluated(time.perf_counter() - now)


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
    state = {"step": run.step, "total_steps": run.schedule.total, "max_iters": cfg.max_iters,
             "schedule_start": run.schedule.start, "elapsed_s": run.elapsed,
             "optimizer": run.optimizer.state_dict(), "random": random}
    save_checkpoint(run.out, run.raw_model, run.data.tokenizer, meta, state, replace=run.replace)
    if run.replace:  # the old run is gone now: its log and summary go too
        os.replace(run.out / NEW_METRICS, run.out / "metrics.jsonl")
        if (run.out / NEW_PROGRESS).exists():
            os.replace(run.out / NEW_PROGRESS, run.out / PROGRESS)
        (run.out / "summary.json").unlink(missing_ok=True)
        run.replace = False
    run.saved_step = run.step


def save_at_stop(run):
    """A stop signal: the last completed step's record (unless logged) and checkpoint (unless saved), at once.

    No eval: it could take as long as many steps. progress.json says first that the run is saving, so the
    app sees it answer. Nothing is saved before the first step (the run would start from the same place).
    """
    if run.main:
        write_stopping(run.out, run.step, run.saved_step, file=NEW_PROGRESS if run.replace else PROGRESS)
    if run.loss is not None and run.logged_step != run.step:
        log_record(run, step_record(run, run.loss.item(), time.perf_counter()))
    if run.step and run.saved_step != run.step:
        save(run)


# ---------------------------------------------------------------------------------- the loop

@one_writer
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
    """Steps until the step budget, the time budget or a stop signal; how the run ended. A stop signal drops the
    step or eval in progress (StepAbandoned) and the run saves its last completed step (save_at_stop)."""
    cfg, budget = run.cfg, run.budget
    run.raw_model.train()
    run.start = time.perf_counter()
    run.throughput = Throughput(run.tokens_per_step, run.start, run.step)
    first_step = run.step
    if budget is not None:  # a resumed run that had planned its schedule plans again from here
        budget.begin(run.start, run.step, planned=run.schedule.total is not None)
    with StopSignal(abandon=run.accelerator.num_processes == 1) as run.stop:
        try:
            while True:
                loss = train_step(run)
                run.bar.update(1)
                now = time.perf_counter()
                if run.schedule.total is None and run.step - first_step >= 3:
                    calibrate(run, now)
                done = run.schedule.total is not None and run.step >= run.schedule.total
                out_of_time = budget is not None and budget.out_of_time(now) and not done
                stopped_by = agreed_stop(run.accelerator,
                                         "signal" if run.stop.name else "time" if out_of_time else None)
                if stopped_by == "signal":
                    break
                evaluate_now = run.step % cfg.eval_interval == 0 or done or stopped_by
                if run.step % cfg.log_interval == 0 or evaluate_now:
                    record = step_record(run, loss.item(), now)
                    if evaluate_now:
                        evaluate_and_save(run, record, now)
                    log_record(run, record)
                if done or stopped_by:
                    return stopped_by or "done"
                if budget is not None and budget.plan_from is not None and (
                        evaluate_now or (run.step % cfg.log_interval == 0 and budget.due(now))):
                    replan(run)
        except StepAbandoned:
            pass
        save_at_stop(run)
        return "signal"


def step_record(run, loss, now):
    """This step's metrics.jsonl record (the run contract's fields; an eval adds its own)."""
    run.last["train_loss"] = loss
    return {"step": run.step, "train_loss": round(loss, 4), "lr": run.lr_used,
            "tokens_per_sec": round(run.throughput.rate(now, run.step), 1), "elapsed_s": round(run.elapsed, 2),
            "total_steps": run.schedule.total}


def log_record(run, record):
    run.logged_step = record["step"]
    if run.main:
        run.bar.set_postfix(loss=f"{run.last['train_loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}")
        run.metrics.log(**record)


def calibrate(run, now):
    """--max-time: once the speed is measured (see TimeBudget), time an eval and plan the schedule."""
    step_time = run.budget.measured_step_time(now, run.step)
    if step_time is None:
        return
    t0 = time.perf_counter()
    run.last["val_loss"], run.last["val_bpc"], _ = run_eval(run, sample_chars=0)
    total = run.budget.end_step(run.step, step_time, eval_cost=time.perf_counter() - t0)
    run.schedule.start = run.step  # the planned schedule starts here, at the lr the calibration used
    run.schedule.plan(total, run.step)
    planned(run, f"--max-time {run.cfg.max_time:g}s: {step_time * 1e3:.1f} ms/step -> planned {total} steps")
    run.throughput.pause_ended()


def replan(run):
    """--max-time, at each eval (and at a log step once 2% of the time went by without a plan): plan the
    rest again from the speed measured since the last plan."""
    new_plan = run.budget.replan(run.schedule, run.step)
    if new_plan is None:
        return
    total, step_time = new_plan
    run.schedule.stretch(total, run.step)
    planned(run, f"--max-time: {step_time * 1e3:.1f} ms/step since the last plan -> now {total} steps")


def planned(run, message):
    """Show the schedule's new length, and remember when it was planned."""
    run.bar.total = run.schedule.total
    run.bar.refresh()
    run.say(message)
    run.budget.planned(run.step)


def finish(run, stopped_by):
    """Phase 4: summary.json and the closing line. After a failure the summary says "error" and the
    last good checkpoint stays; an --overwrite run that failed before saving leaves the old run untouched."""
    extra = dict(final_val_bpc=run.last["val_bpc"], bpc_lossless=run.data.tokenizer.lossless,
                 best_val_loss=run.best_val if run.best_val < math.inf else None,
                 tokens_seen=run.step * run.tokens_per_step, lr=run.lr, params=run.raw_model.num_params(),
                 tokenizer=run.data.tokenizer.kind, saved_step=run.saved_step)
    summary = {"steps": run.step, "total_steps": run.schedule.total, "stopped_by": stopped_by, **extra}
    run.bar.close()
    if run.main:
        run.metrics.close()
        if not run.replace:
            try:
                summary = write_summary(run.out, data=run.cfg.data, steps=run.step, total_steps=run.schedule.total,
                                        train_loss=run.last["train_loss"], val_loss=run.last["val_loss"],
                                        elapsed_s=run.elapsed, stopped_by=stopped_by, **extra)
            except OSError as e:  # a full disk: say so, and let the run's own outcome (or error) stand
                run.say(f"warning: could not write {run.out / 'summary.json'}: {e.strerror or e}")
        if stopped_by == "signal":
            run.say(f"saved {run.out} (step {run.step}) after a stop request" if run.saved_step is not None
                    else "stopped before the first step: nothing to save")
        elif stopped_by != "error":
            run.say(f"saved {run.out} (step {run.step}, val {run.last['val_loss']:.4f} nats/token, "
                    f"{run.last['val_bpc']:.4f} {bpc_label(run.data.tokenizer)})")
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
