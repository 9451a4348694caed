"""LR range test (Smith 2015, "Cyclical Learning Rates"): raise the learning rate exponentially
over a few hundred batches, watch the smoothed loss, and suggest the rate where it falls fastest.
"""

import math

from llmb.fileio import atomic_path, write_json


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
    """The lr where the smoothed loss falls fastest (steepest negative slope against log lr),
    looked for before the loss minimum, ignoring the noisy first and last tenth of the sweep."""
    if len(lrs) < 10:
        raise ValueError("the sweep is too short to suggest a learning rate")
    lo = len(lrs) // 10
    hi = min(range(len(losses)), key=losses.__getitem__) + 1  # just past the minimum
    hi = max(hi, lo + 3)
    slopes = [(losses[i + 1] - losses[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
              for i in range(max(lo, 1), min(hi, len(lrs) - 1))]
    steepest = min(range(len(slopes)), key=slopes.__getitem__) + max(lo, 1)
    return lrs[steepest]


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
