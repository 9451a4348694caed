"""LR range test (Smith 2015, "Cyclical Learning Rates"): raise the learning rate exponentially
over a few hundred batches, watch the smoothed loss, and suggest the rate where it falls fastest.

`find_lr` runs it on the story model a run would start from (`lr-find`, and `--lr auto`);
`lr_sweep` and `suggest_lr` are the method itself.
"""

import math
from pathlib import Path

import torch

from llmb.errors import UserError
from llmb.fileio import atomic_path, write_json
from llmb.folders import check_writable
from llmb.settings import check, check_number
from llmb.story.batches import get_batch, prepare_data
from llmb.story.model import GPT, GPTConfig


def find_lr(cfg, data=None, num_iters=200, start_lr=1e-5, end_lr=1.0, out_dir=None, log=print):
    """Run the LR range test on a fresh model; write lr_find.json/png to out_dir; return the suggestion."""
    from tqdm.auto import tqdm

    check(cfg)
    num_iters = check_number("--num-iters", num_iters, 10, 100_000, int)
    start_lr = check_number("--start-lr", start_lr, 1e-12, 10.0)
    end_lr = check_number("--end-lr", end_lr, start_lr * 10, 1e3)
    if out_dir is not None:
        check_writable(out_dir)
    data = data or prepare_data(cfg)
    bar = tqdm(total=num_iters, desc="lr-find", disable=not cfg.progress, dynamic_ncols=True, unit="it")

    def progress(i, lr, loss):
        bar.update(1)
        bar.set_postfix(lr=f"{lr:.1e}", loss=f"{loss:.3f}")

    lrs, losses = lr_sweep(sweep_step(cfg, data), start_lr, end_lr, num_iters, progress=progress)
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


def sweep_step(cfg, data):
    """train_step(lr) -> loss for lr_sweep: one batch on the model a run with `cfg` starts from."""
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, **cfg.model_settings()))
    model.train()
    optimizer = model.configure_optimizer(1.0, cfg.weight_decay)  # every step sets its own lr
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

    return train_step


def lr_sweep(train_step, start_lr=1e-5, end_lr=1.0, num_iters=200, beta=0.98, diverge=4.0, progress=None):
    """Call train_step(lr) -> loss with exponentially growing lr; stop early once the loss explodes.

    Returns the lrs and the bias-corrected exponential moving average of the losses.
    """
    factor = (end_lr / start_lr) ** (1 / max(1, num_iters - 1))
    lrs, smoothed, avg, best = [], [], 0.0, math.inf
    for i in range(num_iters):
        lr = start_lr * factor**i
        loss = train_step(lr)
        if not math.isfinite(loss):
            break
        avg = beta * avg + (1 - beta) * loss
        value = avg / (1 - beta ** (i + 1))
        lrs.append(lr)
        smoothed.append(value)
        if progress is not None:
            progress(i, lr, value)
        best = min(best, value)
        if i > 10 and value > diverge * best:
            break
    return lrs, smoothed


def suggest_lr(lrs, losses):
    """A tenth of the lr where the smoothed loss is lowest (Smith's rule of thumb; fastai's `lr_min`).

    The steepest point of the curve, the other usual pick, lands on the first few dozen batches on a
    character model: there the loss falls fast at any lr because training has just begun (3e-5 suggested
    on an Oz book, where 2e-3 trains well). The minimum is a late, stable feature of the sweep.
    """
    if len(lrs) < 10:
        raise ValueError("the sweep is too short to suggest a learning rate")
    lowest = min(range(len(losses)), key=losses.__getitem__)
    return max(lrs[0], lrs[lowest] / 10)


def save_lr_find(out_dir, lrs, losses, suggestion):
    """lr_find.json (the sweep and the suggestion) and lr_find.png (the plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(out_dir / "lr_find.json", {"suggested_lr": suggestion, "lrs": lrs, "losses": losses})
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested {suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title("LR finder")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_dir / "lr_find.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
