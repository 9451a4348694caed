"""Settings of the story model, each defined once: its trainer (`llmb train-story`, the app's Train
form) and its sampler (`llmb sample`, the app's Story tab).

Every field carries its help text and allowed range (see llmb.settings): the command lines, the
app's Train form and sliders, the job command line and the checks are all generated from these
classes. It imports no torch.
"""

import os
from dataclasses import dataclass

from llmb.errors import UserError
from llmb.settings import MAX_NEW_TOKENS, SEED_RANGE, SamplingRules, setting

DAY = 24 * 3600.0
GB = 1024**3
RUNTIME = GB // 2  # Python, torch and the data, before any model

# --n-layer auto: the depth for the run's length. In a short --max-time run, twice the steps of a 2-block model
# reach a lower loss than the steps of the default 4 blocks (tinyshakespeare: docs/results.md).
SHORT_RUN_S = 300.0

# What --resume may change: how long to train, how often to look, where and how it shows.
# Any other setting is part of the run (the model, the data, the optimizer): changing it is refused.
SAFE_ON_RESUME = ("max_iters", "max_time", "eval_interval", "eval_iters", "log_interval", "sample_chars",
                  "device", "progress", "resume", "overwrite", "out")


# What a TrainConfig says about the model itself (GPTConfig's fields, bar the vocabulary's size).
MODEL_SETTINGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")

# What `lr-find` takes of a story config: the data and the model, not the schedule or the run's length.
LR_FIND_SETTINGS = ("data", "out", "tokenizer", "vocab_size", "val_fraction", "n_layer", "n_head", "n_embd",
                    "block_size", "dropout", "bias", "batch_size", "weight_decay", "grad_clip", "seed", "device",
                    "progress", "overwrite")


def auto_depth(max_time):
    """The blocks of --n-layer auto: 2 for a --max-time under SHORT_RUN_S seconds, else 4."""
    return 2 if max_time is not None and max_time < SHORT_RUN_S else 4


@dataclass
class TrainConfig:
    # data and output
    data: list = setting(help="text files and/or folders of .txt books (read in sorted order), or Hugging Face data "
                         "sets (owner/name or hf:owner/name: the train split's text column)", factory=list,
                         required=True)
    out: str = setting("checkpoints/story", "checkpoint folder (config, weights, tokenizer, metrics)", required=True)
    tokenizer: str = setting("char", "char; bpe (byte-level, lossless) or wordpiece (lossy: drops whitespace), "
                                     "trained on the training split; or a pretrained hub id / local folder")
    vocab_size: int = setting(2000, "vocabulary size for --tokenizer bpe or wordpiece", low=64, high=200_000)
    val_fraction: float = setting(0.1, "last part of every book held out for validation", low=0.01, high=0.5)
    # the model
    n_layer: int | str = setting("auto", "transformer blocks; auto: 2 for a --max-time under "
                                         f"{SHORT_RUN_S:g} s, else 4", low=1, high=64, words=("auto",),
                                 label="Layers", form=True)
    n_head: int = setting(4, "attention heads per block", low=1, high=64, label="Heads", form=True)
    n_embd: int = setting(128, "embedding width (a multiple of 2 x heads)", low=2, high=4096,
                          label="Embedding width", form=True)
    block_size: int = setting(64, "context length in tokens (characters with the char tokenizer)", low=2,
                              high=8192, label="Context (tokens)", form=True)
    dropout: float = setting(0.0, "dropout probability", low=0.0, high=0.9, label="Dropout", form=True)
    bias: bool = setting(False, "bias in linear layers and layer norms")
    # optimisation
    batch_size: int = setting(8, "sequences per step; small batches, many updates suit a short CPU run",
                              low=1, high=4096, label="Batch size", form=True)
    lr: float | str = setting(2e-3, "peak learning rate, or 'auto' to run the LR finder first", low=1e-8, high=10.0,
                              words=("auto",), label="Learning rate", form=True)
    schedule: str = setting("onecycle", "learning-rate schedule", choices=("onecycle", "cosine", "constant"))
    pct_start: float = setting(0.25, "share of the one-cycle spent warming up", low=0.01, high=0.9)
    weight_decay: float = setting(0.1, "AdamW weight decay", low=0.0, high=1.0)
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0 = off)", low=0.0, high=1000.0)
    # how long
    max_iters: int | None = setting(None, "stop after N steps", low=1, high=10**7, label="Max steps", form=True)
    max_time: float | None = setting(None, "stop after S seconds of training (plans the schedule to fit)",
                                     low=1.0, high=7 * DAY, label="Max time (s)", form=True)
    eval_interval: int = setting(250, "evaluate (val loss, bpc, a sample) and save every N steps", low=1,
                                 high=10**7, label="Evaluate every", form=True)
    eval_iters: int = setting(20, "batches per evaluation", low=1, high=10**4)
    log_interval: int = setting(10, "log train loss every N steps", low=1, high=10**6)
    sample_chars: int = setting(120, "characters sampled at each evaluation", low=0, high=10_000)
    # the run
    seed: int = setting(1337, "random seed", low=0, high=2**31 - 1)
    device: str = setting("auto", "where to train", choices=("auto", "cpu", "cuda"))
    resume: bool = setting(False, "continue the run saved in --out")
    overwrite: bool = setting(False, "start afresh in an --out that already holds a run of this kind (it stays "
                                     "until the new run's first save replaces it)")
    progress: bool = setting(True, "show a progress bar")

    def check(self):
        """Rules that tie settings together (each setting's own range is checked from its field).

        --n-layer auto becomes a number here (auto_depth), except on --resume, where it is the saved run's.
        """
        if self.n_layer == "auto" and not self.resume:
            self.n_layer = auto_depth(self.max_time)
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise UserError(f"--n-embd {self.n_embd} must split into --n-head {self.n_head} heads of even width")
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in --out, --overwrite replaces it: give one of them")
        # on a GPU the trainer checks the GPU's memory once it has one; on --resume, auto is the saved depth
        if self.device != "cuda" and self.n_layer != "auto":
            check_memory(self, ram_bytes(), "this machine's memory")

    def model_settings(self):
        """GPTConfig's fields from these settings: GPTConfig(vocab_size=..., **cfg.model_settings())."""
        return {name: getattr(self, name) for name in MODEL_SETTINGS}

    def check_length(self):
        if self.max_iters is None and self.max_time is None:
            raise UserError("say how long to train: max steps (--max-iters N) or max time (--max-time SECONDS)")


@dataclass
class StorySampling(SamplingRules):
    """How the story model continues a text: `llmb sample`'s flags, the Story tab's sliders, `generate`'s checks.

    The app offers narrower ranges (`app_range`): a public server bounds the work one call may ask for.
    """

    max_new_tokens: int = setting(500, "tokens to write (characters with the char tokenizer)", low=1,
                                  high=MAX_NEW_TOKENS, label="Max new characters", app_range=(1, 2000),
                                  called="max new tokens")
    temperature: float = setting(0.8, "divides the logits: below 1 surer, above 1 wilder; 0 = greedy (always the "
                                      "likeliest), else at least 0.01", low=0, label="Temperature", app_range=(0, 2),
                                 called="temperature (0 = greedy)")
    top_k: int | None = setting(None, "sample from the k likeliest tokens only (default: from all)", low=1,
                                label="Top-k", app_range=(0, 200), called="top-k")
    top_p: float | None = setting(1.0, "sample from the likeliest tokens that together reach this probability "
                                       "(1 = all; more than 0)", low=0, high=1, label="Top-p", app_range=(0.05, 1),
                                  called="top-p")
    seed: int | None = setting(None, "random seed: the same seed writes the same text (default: a new one each "
                                     "time)", low=SEED_RANGE[0], high=SEED_RANGE[1], label="Seed",
                               app_range=(0, 2**31 - 1), called="seed")


def memory_estimate(cfg, vocab_size=None):
    """Bytes a training step needs, roughly: float32 weights, gradients and AdamW's two moments
    (16 bytes per parameter), plus the activations kept for the backward pass.

    Parameters: 12 n_embd^2 per block (attention 4, MLP 8) and the tied embedding. Activations
    per block, per token: about 18 n_embd floats plus the attention matrix (n_head x block_size);
    the logits and their gradient add 3 x vocab floats per token. Python and torch themselves
    take about half a gigabyte more (1.26 GB peak measured for the Oz model's 6/8/256, block 128,
    batch 32, against 1.18 GB estimated).
    """
    vocab = vocab_size or (cfg.vocab_size if cfg.tokenizer in ("bpe", "wordpiece") else 256)
    params = 12 * cfg.n_layer * cfg.n_embd**2 + vocab * cfg.n_embd
    tokens = cfg.batch_size * cfg.block_size
    activations = tokens * (cfg.n_layer * (18 * cfg.n_embd + 2 * cfg.n_head * cfg.block_size) + 3 * vocab)
    return 16 * params + 4 * activations + RUNTIME


def check_memory(cfg, available, where, vocab_size=None):
    """Refuse a model and batch whose estimated training memory exceeds `available` bytes."""
    need = memory_estimate(cfg, vocab_size)
    if need > available:
        raise UserError(f"this model and batch need about {need / GB:.1f} GB to train (estimated from --n-layer, "
                        f"--n-embd, --batch-size and --block-size), more than {where} ({available / GB:.1f} GB); "
                        "choose a smaller model or batch")


def ram_bytes():
    """This machine's physical memory (no torch needed)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
