"""QLoRA fine-tuning of a causal LM (Phi-2 by default, any causal LM works) on chat data.

QLoRA (Dettmers et al. 2023): freeze the base model in 4-bit NormalFloat (NF4) with double
quantization, and train only small low-rank adapters (LoRA, Hu et al. 2021) on top:

    h = W0 x + (alpha / r) * B A x        W0 frozen (4-bit), A: r x d_in, B: d_out x r trained

The loop is plain PyTorch driven by accelerate, so `llmb train-assistant` runs on
one device and `accelerate launch -m llmb train-assistant` on several GPUs. A run:

    prepare_data  -> examples in the adapter's prompt format (its chat template)
    build         -> base + LoRA, optimizer, schedule; --resume restores all of it (RNG included)
    loop          -> evaluate at step 0, then optimizer steps; log, evaluate, save as configured
    finish        -> the adapter in --out, summary.json (llmb.runlog.write_summary)

Ctrl-C or the app's Stop drops the step (or evaluation) in progress and saves the last completed step
within seconds, however long a step takes (save_at_stop; llmb.runlog.StopSignal).

--out follows llmb.folders' rule: a new or empty folder, --resume of an adapter run, or --overwrite
of one, whose files stay until the new run's first checkpoint is saved, then all go at once.
"""

import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from llmb.assistant.config import TrainConfig
from llmb.assistant.data import IGNORE, choose_template, collate, encode_dataset, is_guanaco, load_chat_data
from llmb.assistant.loading import compute_dtype, load_base_model, load_tokenizer
from llmb.device import resolve_device
from llmb.errors import UserError
from llmb.fileio import (
    SAVE_ERRORS,
    read_json,
    save_dir_atomically,
    save_failed,
    save_size,
    sync_folder,
    write_error,
    write_json,
)
from llmb.folders import JOB_LOG, check_out_folder, one_writer
from llmb.runlog import (
    NEW_PROGRESS,
    PROGRESS,
    MetricsLog,
    StepAbandoned,
    StopSignal,
    make_summary,
    trim_metrics,
    write_progress,
    write_stopping,
    write_summary,
)
from llmb.stopping import stop_points_in_backward


def add_lora(model, cfg):
    """Freeze the base, add trainable LoRA adapters; gradient checkpointing trades compute for memory."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    ckpt_kwargs = {"use_reentrant": False}
    quantized = getattr(model, "is_quantized", False)
    if quantized:
        model = prepare_model_for_kbit_training(model, cfg.gradient_checkpointing, ckpt_kwargs)
        for module in model.modules():
            # bitsandbytes repacks 4-bit weights for CPU inference in the first eval forward, after
            # which CPU training fails ("a view of a leaf Variable ..."): keep the training layout
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    elif cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
    model.config.use_cache = False  # the KV cache is for generation only
    targets = "all-linear" if list(cfg.lora_targets) == ["all-linear"] else check_targets(model, cfg.lora_targets)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if quantized:
        cast_like_qlora(model, compute_dtype(model.device))
    return model


def check_targets(model, targets):
    """The --lora-targets names, each the name (or last part of the name) of a module of the model, as peft
    matches them; else a UserError listing the model's linear layers."""
    import torch

    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"--lora-targets: this base has no module named {', '.join(missing)}; its linear layers "
                        f"are {', '.join(linear)} (or give all-linear)")
    return list(targets)


def cast_like_qlora(model, dtype):
    """prepare_model_for_kbit_training leaves every non-quantized weight in fp32. On a bf16 run,
    cast LoRA layers, embeddings and lm_head back to bf16 (memory), keeping layer norms in fp32
    (stability), as the QLoRA reference (artidoro/qlora) does."""
    import torch
    from peft.tuners.lora import LoraLayer

    if dtype != torch.bfloat16:
        return model
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.to(torch.bfloat16)
        if "norm" in name:
            module.to(torch.float32)
        if ("lm_head" in name or "embed_tokens" in name) and getattr(module, "weight", None) is not None \
                and module.weight.dtype == torch.float32:
            module.to(torch.bfloat16)
    return model


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


def length_grouped_batches(lengths, batch_size, seed, group_by_length=True):
    """Batches of example indices for one epoch, shuffled with `seed`.

    Grouped by length (artidoro/qlora's group_by_length): shuffle, cut into mega-batches of 50
    batches, sort each by length so a batch holds similar lengths (little padding), then shuffle
    the batches so training does not see the lengths in order.
    """
    import random

    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = 50 * batch_size
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def micro_batches(examples, cfg, pad_id, rank=0, world=1, skip=0):
    """Endless stream of this process's batches, a new order each epoch (seed + epoch); `skip` resumes mid-run."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    epoch = 0
    while True:
        batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch, cfg.group_by_length)
        mine = batches[:len(batches) // world * world][rank::world] or batches[:1]
        for batch in mine:
            if skip:
                skip -= 1
                continue
            yield collate([examples[i] for i in batch], pad_id)
        epoch += 1


def eval_batches(examples, batch_size, pad_id, rank=0, world=1):
    """The eval set in batches of similar length (this process's share)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)][rank::world]
    return [collate([examples[i] for i in b], pad_id) for b in batches]


def prepare_data(cfg, tokenizer):
    """(train examples, eval examples); the tokenizer gets the run's prompt format as its chat template."""
    tokenizer.chat_template = choose_template(tokenizer, cfg.format)
    train_convs, eval_convs = load_chat_data(cfg.data, cfg.eval_data, cfg.eval_split, cfg.skip_bad_rows, cfg.seed)
    return (encode_dataset(tokenizer, train_convs, cfg.max_seq_len),
            encode_dataset(tokenizer, eval_convs[:cfg.max_eval_examples], cfg.max_seq_len))


# ---------------------------------------------------------------------------
# Loss and evaluation


def answer_tokens(batch):
    """How many tokens of a batch are predicted and scored (answer tokens after the first position)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss_sum(model, batch):
    """Summed cross-entropy over the answer tokens of a batch (token t predicts token t+1)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def loss_sums(model, batches, device):
    """[summed loss, answer tokens] over `batches`, as a float64 tensor on `device`."""
    import torch

    sums = torch.zeros(2, device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            sums += torch.stack([loss_sum(model, batch).double(), torch.tensor(answer_tokens(batch), device=device)])
    model.train(was_training)
    return sums


def evaluate(model, batches, accelerator):
    """Mean cross-entropy per answer token over the whole eval set (exp of it = perplexity)."""
    sums = accelerator.reduce(loss_sums(model, batches, accelerator.device), "sum")
    return (sums[0] / sums[1].clamp(min=1)).item()


def chat_eval(base, data, adapter=None, max_seq_len=512, batch_size=4, device="cpu", skip_bad_rows=False):
    """Mean loss per answer token of base (+ adapter) on every row of `data`, masked as in training.

    Returns {"loss", "ppl", "tokens", "rows"}: `python -m llmb chat-eval` prints it as one JSON line.
    """
    import torch

    from llmb.assistant.loading import load_adapter, load_chat_tokenizer

    tokenizer = load_chat_tokenizer(base, adapter)
    convs, _ = load_chat_data(data, eval_split=0, skip_bad_rows=skip_bad_rows)
    examples = encode_dataset(tokenizer, convs, max_seq_len)
    model = load_base_model(base, "none", resolve_device(device), torch.float32)
    if adapter:
        model = load_adapter(model, adapter)
    sums = loss_sums(model, eval_batches(examples, batch_size, tokenizer.pad_token_id), model.device)
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {"loss": round(loss, 5), "ppl": round(math.exp(min(loss, 50)), 4), "tokens": int(sums[1]),
            "rows": len(examples)}


# ---------------------------------------------------------------------------
# Checkpoints: adapter + optimizer + schedule + RNG, so a resumed run continues exactly


STATE = "training_state.pt"  # a checkpoint's optimizer, schedule and random states, beside the adapter


def checkpoints(out):
    return sorted(Path(out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def rng_state():
    import torch

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def trainable_weights(model):
    return [p for p in model.parameters() if p.requires_grad]  # the adapter's


def save_checkpoint(out, step, model, tokenizer, optimizer, scheduler):
    import torch

    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}

    def write(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE)

    target = Path(out) / f"checkpoint-{step}"
    needed = save_size(trainable_weights(model), state, files=checkpoints(out)[-1:])
    try:
        save_dir_atomically(target, write)
    except SAVE_ERRORS as e:
        raise save_failed("the checkpoint", out, e, needed) from None
    for old in checkpoints(out):  # keep only the newest
        if old != target:
            shutil.rmtree(old)


def load_checkpoint(ckpt, model, optimizer, scheduler):
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    state = torch.load(ckpt / STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])  # dropout masks go on as in an uninterrupted run
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def save_adapter(out, model, tokenizer):
    """The out dir itself is a PEFT adapter dir: written beside, then moved in file by file."""
    tmp = Path(out) / ".tmp-adapter"
    last = checkpoints(out)[-1:]  # the adapter is what its last checkpoint holds but the training state
    needed = save_size(trainable_weights(model), files=[f for ckpt in last for f in ckpt.iterdir() if f.name != STATE])
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # with the chat template: the adapter's prompt format
        sync_folder(tmp)  # safetensors writes 0600: give the files the umask's mode
        for f in tmp.iterdir():
            os.replace(f, Path(out) / f.name)
        tmp.rmdir()
    except SAVE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_failed("the adapter", out, e, needed) from None


NEW_METRICS = ".metrics.new.jsonl"  # an --overwrite run logs here until its first checkpoint replaces the old run


def replace_old_run(run, out):
    """--overwrite: the new run has saved its first checkpoint, so the old run's files go, all at once."""
    for name in run.replace:
        old = Path(out) / name
        if name not in (NEW_METRICS, NEW_PROGRESS) and not (old.is_dir() and old in checkpoints(out)[-1:]):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink(missing_ok=True)
    os.replace(Path(out) / NEW_METRICS, Path(out) / "metrics.jsonl")
    if (Path(out) / NEW_PROGRESS).exists():
        os.replace(Path(out) / NEW_PROGRESS, Path(out) / PROGRESS)
    run.progress = PROGRESS
    write_json(Path(out) / "training_args.json", asdict(run.cfg))
    run.replace = []


# ---------------------------------------------------------------------------
# Training


def new_tally():
    """What a metrics record sums since the one before: the train loss over its answer tokens, the tokens seen
    (for tokens/s) and when it began."""
    return {"loss": 0.0, "answer_tokens": 0, "tokens": 0, "t": time.time()}


@dataclass
class Run:
    """What the loop needs, built once by `build`."""

    cfg: TrainConfig
    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    tokenizer: object
    start_step: int
    train_set: list
    eval_set: list
    since_log: dict = field(default_factory=new_tally)  # sums for the next metrics record
    replace: list = field(default_factory=list)  # --overwrite: the old run's files, until the first save
    saved_step: int = None  # the step of the newest checkpoint in --out (what --resume continues)
    progress: str = PROGRESS  # the progress file's name (NEW_PROGRESS while an --overwrite run has not saved)
    stop: StopSignal = field(default_factory=lambda: StopSignal(abandon=False))  # the loop's, while it runs
    step: int = 0  # optimizer steps completed
    logged_step: int = None  # the step of the last metrics record
    train_loss: float = None  # the last record's
    val_loss: float = None  # the last evaluation's


def build(cfg, accelerator, out, progress=PROGRESS):
    """Tokenizer, data, base + LoRA, optimizer and schedule; restored from the last checkpoint on --resume."""
    from transformers import get_constant_schedule_with_warmup

    found = checkpoints(out)
    if cfg.resume and not found:
        raise UserError(f"--resume: no checkpoint in {out} to resume from; leave out --resume to start a new run")
    say = partial(write_progress, out, file=progress) if accelerator.is_main_process else (lambda phase: None)
    say(f"loading the tokenizer of {cfg.base}")
    tokenizer = load_tokenizer(cfg.base)
    say("reading and tokenizing the data")
    train_set, eval_set = prepare_data(cfg, tokenizer)
    say(f"loading the base model {cfg.base} ({len(train_set)} train conversations ready)")
    model = add_lora(load_base_model(cfg.base, cfg.quant, accelerator.device), cfg)
    stop_points_in_backward(model)
    optimizer = make_optimizer(model, cfg.lr, accelerator.device)
    scheduler = get_constant_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.max_steps))
    start_step = 0
    if cfg.resume:
        start_step = load_checkpoint(found[-1], model, optimizer, scheduler)
        print(f"resuming from {found[-1]} (step {start_step})")
    model, optimizer = accelerator.prepare(model, optimizer)
    return Run(cfg, accelerator, model, optimizer, scheduler, tokenizer, start_step, train_set, eval_set,
               progress=progress)


def build_or_undo(cfg, accelerator, out, progress):
    """`build`, and if it fails (a bad --lora-targets, a base that will not load), take back the progress.json
    its phases wrote: a refused run leaves --out as it was."""
    had, existed = (out / progress).exists(), out.exists()
    try:
        return build(cfg, accelerator, out, progress)
    except BaseException:
        if accelerator.is_main_process:
            if not had:
                (out / progress).unlink(missing_ok=True)
            if not existed and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise


def optimizer_step(run, batches):
    """One optimizer step over cfg.grad_accum micro-batches; the loss is the mean over all their answer tokens.
    A stop signal drops the micro-batches' work (StepAbandoned) before the optimizer steps.

    Returns (the step's mean loss over all processes' answer tokens, the tokens seen)."""
    import torch

    acc = run.accelerator
    with run.stop.abandonable():
        loss_step, answers, tokens_step, total = accumulate(run, batches)
    acc.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.since_log["loss"] += loss_step
    run.since_log["answer_tokens"] += answers
    run.since_log["tokens"] += tokens_step
    loss_step = acc.reduce(torch.tensor(loss_step, device=acc.device), "sum").item()
    return loss_step / max(total, 1), tokens_step


def accumulate(run, batches):
    """The gradients of one step: forward and backward over cfg.grad_accum micro-batches.

    Returns this process's (loss summed over its answer tokens, its answer tokens, tokens seen by all
    processes, answer tokens of all processes)."""
    from contextlib import nullcontext

    import torch

    acc, model, cfg = run.accelerator, run.model, run.cfg
    micro = [{k: v.to(acc.device) for k, v in next(batches).items()} for _ in range(cfg.grad_accum)]
    # every answer token of the step weighs the same, whichever micro-batch (or process) it is in
    total = acc.reduce(torch.tensor(sum(answer_tokens(b) for b in micro), device=acc.device), "sum").item()
    loss_step, tokens_step = 0.0, 0
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1  # all-reduce gradients only on the last micro-batch
        with nullcontext() if sync else acc.no_sync(model):
            loss = loss_sum(model, batch)
            acc.backward(loss * acc.num_processes / max(total, 1))  # DDP averages over processes
        loss_step += loss.item()
        tokens_step += int(batch["attention_mask"].sum()) * acc.num_processes
    return loss_step, sum(answer_tokens(b) for b in micro), tokens_step, total


def log_record(run, step, t0, val_loss=None):
    """The metrics.jsonl record for `step` (train loss over the steps since the last record)."""
    w = run.since_log
    run.logged_step = step
    record = {"step": step, "train_loss": w["loss"] / w["answer_tokens"] if w["answer_tokens"] else None,
              "lr": run.scheduler.get_last_lr()[0],
              "tokens_per_sec": w["tokens"] / (time.time() - w["t"]) if w["tokens"] else None,
              "elapsed_s": round(time.time() - t0, 3), "total_steps": run.cfg.max_steps}
    if val_loss is not None:
        record |= {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
    run.since_log = new_tally()
    return record


def loop(run, log, evals, out):
    """Optimizer steps until max_steps or a stop signal; returns (step, last train loss, last val loss).

    A stop signal drops the step or the evaluation in progress (StepAbandoned); the run then logs and saves
    its last completed step (save_at_stop)."""
    from tqdm import tqdm

    cfg, acc = run.cfg, run.accelerator
    main = acc.is_main_process
    run.step, t0 = run.start_step, time.time()
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not main, desc="train")
    try:
        if run.step == 0 and evals is not None:  # the base model's loss: where the run starts from
            evaluate_base(run, log, evals, out, t0)
        batches = micro_batches(run.train_set, cfg, run.tokenizer.pad_token_id, acc.process_index,
                                acc.num_processes, skip=run.step * cfg.grad_accum)
        run.model.train()
        first, t_first = run.step, time.time()
        while run.step < cfg.max_steps and not run.stop.name:
            t_step = time.time()
            loss, tokens = optimizer_step(run, batches)
            step = run.step
            bar.update(1)
            if main:  # the figures of every step, for the app's status line
                now = time.time()
                write_progress(out, file=run.progress, step=step, total=cfg.max_steps, loss=loss,
                               tokens_per_sec=tokens / (now - t_step), elapsed_s=now - t0,
                               eta_s=(cfg.max_steps - step) * (now - t_first) / (step - first))
            done = step == cfg.max_steps
            evaluated = evals is not None and (step % cfg.eval_steps == 0 or done)
            if evaluated:
                with run.stop.abandonable():
                    run.val_loss = evaluate(run.model, evals, acc)
            if main and (step % cfg.log_steps == 0 or evaluated or done):
                log_step(run, log, t0, evaluated)
                bar.set_postfix(loss=run.train_loss, **({"val": run.val_loss} if evaluated else {}))
            if step % cfg.save_steps == 0 or done:
                save(run, out)
    except StepAbandoned:
        pass
    if run.stop.name:
        save_at_stop(run, log, out, t0)
    bar.close()
    return run.step, run.train_loss, run.val_loss


def evaluate_base(run, log, evals, out, t0):
    """Step 0: the base model's loss, the first metrics record; and from its speed, what the run will cost."""
    main, progress = run.accelerator.is_main_process, partial(write_progress, out, file=run.progress)
    if main:
        progress(f"evaluating the base model on {len(run.eval_set)} conversations (step 0)")
    began = time.time()
    with run.stop.abandonable():
        run.val_loss = evaluate(run.model, evals, run.accelerator)
    if main:
        log_step(run, log, t0, evaluated=True)
        eta = estimated_time(run, time.time() - began, evals)
        progress(f"step 1 of {run.cfg.max_steps}: about {eta / 60:.1f} min to go (estimated from the step-0 "
                 "evaluation's speed)", total=run.cfg.max_steps, eta_s=eta)


def estimated_time(run, eval_s, evals):
    """Seconds the rest of the run will take, from how long an evaluation took (`eval_s`): a training token costs
    about three evaluated ones (its forward pass, and a backward pass about twice as long: 2.9x measured for
    SmolLM2-135M on a CPU; four with gradient checkpointing, which runs the forward again), and each evaluation
    still to come as long as this one."""
    cfg = run.cfg
    per_token = eval_s / max(sum(int(b["attention_mask"].sum()) for b in evals), 1)
    example = sum(len(ex["input_ids"]) for ex in run.train_set) / max(len(run.train_set), 1)
    step_s = per_token * (4 if cfg.gradient_checkpointing else 3) * example * cfg.batch_size * cfg.grad_accum
    evals_left = sum(s % cfg.eval_steps == 0 or s == cfg.max_steps for s in range(run.step + 1, cfg.max_steps + 1))
    return (cfg.max_steps - run.step) * step_s + evals_left * eval_s


def log_step(run, log, t0, evaluated=False):
    """The metrics record of the step just done (main process)."""
    record = log_record(run, run.step, t0, run.val_loss if evaluated else None)
    run.train_loss = record["train_loss"]
    log.log(**record)


def save(run, out):
    """checkpoint-<step> in `out` (resumable); an --overwrite run's first save replaces the old run."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_checkpoint(out, run.step, acc.unwrap_model(run.model), run.tokenizer, run.optimizer, run.scheduler)
        if run.replace:
            replace_old_run(run, out)
    run.saved_step = run.step


def save_at_stop(run, log, out, t0):
    """A stop signal: the last completed step's record (unless logged) and checkpoint (unless saved), at once.

    No evaluation: on a CPU it takes minutes. progress.json says first that the run is saving, so the app
    sees it answer. Nothing is saved before the first step (the run would start from the same place).
    """
    if run.accelerator.is_main_process:
        write_stopping(out, run.step, run.saved_step, file=run.progress)
        if run.logged_step != run.step and run.since_log["answer_tokens"]:
            log_step(run, log, t0)
    if run.step and run.saved_step != run.step:
        save(run, out)


@one_writer
def train(cfg: TrainConfig):
    """Fine-tune cfg.base with LoRA on cfg.data; returns the summary dict (also in out/summary.json)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=resolve_device(cfg.device) == "cpu")
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    out = Path(cfg.out)
    found = check_out_folder(out, "adapter", cfg.overwrite, cfg.resume)
    size_for_device(cfg, accelerator, out)
    old_files = sorted(p.name for p in out.iterdir() if p.name != JOB_LOG) if found and not cfg.resume else []
    run = build_or_undo(cfg, accelerator, out, NEW_PROGRESS if old_files else PROGRESS)
    out.mkdir(parents=True, exist_ok=True)
    run.replace, run.saved_step = old_files, run.start_step or None
    if main:
        accelerator.unwrap_model(run.model).print_trainable_parameters()  # DDP wraps it on several processes
        print(f"{len(run.train_set)} train / {len(run.eval_set)} eval conversations, "
              f"device {accelerator.device}, quant {cfg.quant}")
        if not run.replace:
            write_json(out / "training_args.json", asdict(cfg))
        if run.start_step:
            trim_metrics(out / "metrics.jsonl", run.start_step)
    metrics = out / (NEW_METRICS if run.replace else "metrics.jsonl")
    log = MetricsLog(metrics, truncate=run.start_step == 0) if main else None
    evals = eval_batches(run.eval_set, cfg.batch_size, run.tokenizer.pad_token_id, accelerator.process_index,
                         accelerator.num_processes) if run.eval_set else None
    t0, step, train_loss, val_loss, stopped_by = time.time(), run.start_step, None, None, "error"
    try:
        with StopSignal(abandon=accelerator.num_processes == 1) as run.stop:
            step, train_loss, val_loss = loop(run, log, evals, out)
        stopped_by = "signal" if run.stop.name else "done"
    finally:
        summary = finish(run, out, log, step, train_loss, val_loss, time.time() - t0, stopped_by) if main else None
        accelerator.wait_for_everyone()
    return summary


def size_for_device(cfg, accelerator, out):
    """The settings left to auto (llmb.assistant.config), as the device wants them, or on --resume as the run in
    `out` had them (training_args.json); said in one line, as the flags that would give them."""
    from llmb.settings import resolve_by_device, to_argv

    args = out / "training_args.json"
    saved = read_json(args) if cfg.resume and args.is_file() else None
    chosen = resolve_by_device(cfg, accelerator.device.type, saved)
    if chosen and accelerator.is_main_process:
        flags = " ".join(to_argv(cfg, skip=[name for name in asdict(cfg) if name not in chosen]))
        device = "GPU" if accelerator.device.type == "cuda" else "CPU"
        print(f"auto settings ({'as the run being resumed had them' if saved else 'sized for a ' + device}): {flags}")


def finish(run, out, log, step, train_loss, val_loss, elapsed_s, stopped_by):
    """The adapter (with its prompt format) in `out`, and summary.json; also after an error (stopped_by error).

    An --overwrite run that ends before its first checkpoint leaves the old run as it was.
    """
    cfg, error = run.cfg, None
    log.close()
    if run.replace:
        for name in (NEW_METRICS, NEW_PROGRESS):
            (Path(out) / name).unlink(missing_ok=True)
    elif stopped_by != "error":
        try:
            save_adapter(out, run.accelerator.unwrap_model(run.model), run.tokenizer)
        except UserError as e:  # a full disk: the summary still says how the run ended
            error, stopped_by = e, "error"
    summary = dict(data=cfg.data, steps=step, total_steps=cfg.max_steps, train_loss=train_loss, val_loss=val_loss,
                   elapsed_s=elapsed_s, stopped_by=stopped_by, base=cfg.base, quant=cfg.quant,
                   format="guanaco" if is_guanaco(run.tokenizer) else "template",
                   final_val_ppl=math.exp(min(val_loss, 50)) if val_loss is not None else None,
                   lora={"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                         "targets": cfg.lora_targets}, saved_step=run.saved_step)
    summary = make_summary(**summary) if run.replace else write_summary_or_warn(out, summary)
    if error:
        raise error
    return summary


def write_summary_or_warn(out, fields):
    """summary.json; on a full disk a warning, so the run's own outcome (or error) stands."""
    try:
        return write_summary(out, **fields)
    except OSError as e:
        print(f"warning: could not write {Path(out) / 'summary.json'}: {write_error(e)}", file=sys.stderr)
        return make_summary(**fields)
