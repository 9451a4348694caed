"""Settings of the assistant, each defined once: its LoRA trainer (`llmb train-assistant`, the app's Train
form), its answers (`llmb chat`, the app's Assistant tab, with the sampling that suits the base model) and its
GGUF export.

Every field carries its help text and allowed range (see llmb.settings). Imports no torch.

A LoRA run's size depends on the device: on a GPU the QLoRA recipe for Phi-2 (500 steps of 4 x 4 sequences of
512 tokens, gradient checkpointing); on a CPU, where a step of that recipe took 2 minutes, a run that ends in about
5 minutes on the small assistant (SmolLM2-135M), its step-0 and last evaluations included, with its held-out loss
going down (30 steps of 4 sequences of 256 tokens, 16 held-out conversations, no gradient checkpointing: it
costs another forward pass, and memory is not short). Those settings are "auto" (llmb.settings, by_device).
"""

import json
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

from llmb.errors import UserError
from llmb.settings import MAX_NEW_TOKENS, SEED_RANGE, SamplingRules, setting

DEFAULT_BASE = "microsoft/phi-2"
DEFAULT_DATA = "timdettmers/openassistant-guanaco"
# LoRA on every linear layer of every block (attention and MLP), whatever the architecture; peft
# finds them by type and writes their names into the adapter config. Give names to pick fewer.
DEFAULT_TARGETS = ["all-linear"]


@dataclass
class TrainConfig:
    base: str = setting(DEFAULT_BASE, "hub id or local folder of the base model")
    data: list = setting(help=".jsonl/.json/.parquet chat files and/or Hugging Face data sets (owner/name or "
                         "hf:owner/name)", factory=lambda: [DEFAULT_DATA])
    out: str = setting("checkpoints/phi2-guanaco", "output folder: the adapter, metrics.jsonl, summary.json, "
                       "checkpoints", required=True)
    quant: str = setting("4bit", "load the base quantized: 4bit (QLoRA, NF4), 8bit or none (needs a GPU for 4/8 bit)",
                         choices=("4bit", "8bit", "none"))
    max_steps: int | str = setting(help="optimizer steps", low=1, high=10**7, label="Max steps", form=True,
                                   by_device={"cpu": 30, "cuda": 500})
    max_seq_len: int | str = setting(help="longest example in tokens (longer ones are cut)", low=8, high=16384,
                                     label="Max sequence length", form=True, by_device={"cpu": 256, "cuda": 512})
    lora_r: int = setting(16, "LoRA rank", low=1, high=1024, label="LoRA rank", form=True)
    lora_alpha: int = setting(32, "LoRA scaling alpha (update scaled by alpha / r)", low=1, high=4096)
    lora_dropout: float = setting(0.05, "dropout on the LoRA input", low=0.0, high=0.9)
    lora_targets: list = setting(help="module names that get LoRA adapters, or all-linear (every linear layer of "
                                 "the blocks)", factory=lambda: list(DEFAULT_TARGETS))
    format: str = setting("auto", "prompt format, saved with the adapter as its chat template: template (the base's "
                          "own), guanaco ('### Human: ... ### Assistant:'), auto (the base's own if it has one, "
                          "else guanaco)", choices=("auto", "guanaco", "template"))
    lr: float = setting(2e-4, "peak learning rate", low=1e-8, high=1.0, label="Learning rate", form=True)
    warmup_ratio: float = setting(0.03, "share of the steps spent warming up", low=0.0, high=0.5)
    max_grad_norm: float = setting(0.3, "clip the gradient norm to this", low=0.0, high=1000.0)
    batch_size: int | str = setting(help="examples per micro-batch", low=1, high=4096, label="Batch size", form=True,
                                    by_device={"cpu": 4, "cuda": 4})
    grad_accum: int | str = setting(help="micro-batches per optimizer step", low=1, high=1024,
                                    by_device={"cpu": 1, "cuda": 4})
    group_by_length: bool = setting(True, "batch examples of similar length together (much less padding)")
    eval_steps: int = setting(50, "evaluate every N steps", low=1, high=10**7, label="Evaluate every", form=True)
    save_steps: int = setting(100, "save a resumable checkpoint every N steps", low=1, high=10**7,
                              label="Save every", form=True)
    log_steps: int = setting(10, "log train loss every N steps", low=1, high=10**6)
    eval_split: float = setting(0.05, "fraction of the data held out when there is no --eval-data", low=0.0, high=0.5)
    eval_data: str | None = setting(None, "separate eval file (or hub id)")
    max_eval_examples: int | str = setting(help="evaluate on at most this many examples", low=1, high=10**6,
                                           by_device={"cpu": 16, "cuda": 200})
    skip_bad_rows: bool = setting(False, "skip unusable rows (each is named) instead of stopping",
                                  label="Skip bad rows", form=True)
    device: str = setting("auto", "where to train", choices=("auto", "cpu", "cuda"))
    gradient_checkpointing: bool | str = setting(help="recompute activations in the backward pass (less memory, "
                                                      "a third more compute)", by_device={"cpu": False, "cuda": True})
    resume: bool = setting(False, "continue from the last checkpoint in --out")
    overwrite: bool = setting(False, "start afresh in an --out that already holds an adapter run (it stays "
                                     "until the new run's first checkpoint replaces it)")
    seed: int = setting(0, "random seed", low=0, high=2**31 - 1)

    def check(self):
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in --out, --overwrite replaces it: give one of them")


@dataclass
class ChatSampling(SamplingRules):
    """How the assistant answers: `llmb chat`'s flags, the Assistant tab's sliders, `ChatEngine.stream`'s checks.

    The app offers narrower ranges (`app_range`): a public server bounds the work one call may ask for.
    """

    temperature: float = setting(0.7, "divides the logits: below 1 surer, above 1 wilder; 0 = greedy (always the "
                                      "likeliest), else at least 0.01", low=0, label="Temperature", app_range=(0, 2),
                                 called="temperature (0 = greedy)")
    top_p: float | None = setting(0.9, "sample from the likeliest tokens that together reach this probability "
                                       "(1 = all; more than 0)", low=0, high=1, label="Top-p", app_range=(0.05, 1),
                                  called="top-p")
    top_k: int | None = setting(50, "sample from the k likeliest tokens only (0 = from all)", low=0, label="Top-k",
                                app_range=(0, 200), called="top-k")
    repetition_penalty: float | None = setting(1.1, "makes tokens already in the text less likely (1 = off; more "
                                                    "than 0)",
                                               low=0, label="Repetition penalty", app_range=(1, 2),
                                               called="repetition penalty")
    max_new_tokens: int = setting(256, "longest answer in tokens", low=1, high=MAX_NEW_TOKENS,
                                  label="Max new tokens", app_range=(1, 1024), called="max new tokens")
    seed: int | None = setting(None, "random seed: the same seed gives the same answer (default: a new one each "
                                     "time)", low=SEED_RANGE[0], high=SEED_RANGE[1], label="Seed",
                               app_range=(0, 2**31 - 1), called="seed")

    def check(self):
        super().check()
        if self.repetition_penalty == 0:
            raise UserError("repetition penalty must be more than 0 (got 0); 1 is off")


SAMPLING_KEYS = ("temperature", "top_p", "top_k")
SMALL_MODEL = 10**9  # parameters: below this, greedy answers unless the model says otherwise


def model_sampling(base):
    """The sampling that suits the base model in folder `base`: its own (generation_config.json's temperature,
    top_p, top_k), else greedy for a model under 1B parameters (a small model's samples wander: SmolLM2-135M at
    temperature 0.7 named "Mon-Pélée" France's capital), else {} (ChatSampling's defaults). A hub id that is not
    in a local folder gets {}. Reads JSON and safetensors headers only."""
    folder = Path(base)
    if not folder.is_dir():
        return {}
    try:
        own = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        own = {}
    if own.get("do_sample") is False:
        return {"temperature": 0.0}
    chosen = {key: own[key] for key in SAMPLING_KEYS if isinstance(own.get(key), (int, float))}
    if chosen:
        return chosen
    params = parameter_count(folder)
    return {"temperature": 0.0} if params is not None and params < SMALL_MODEL else {}


def parameter_count(folder):
    """Parameters in a model folder's safetensors files (from their headers), or None without them."""
    total, files = 0, sorted(Path(folder).glob("*.safetensors"))
    for file in files:
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error):
            return None
        total += sum(prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total if files else None


@dataclass
class ExportConfig:
    """Settings of `python -m llmb export-gguf` and of the app's Export to GGUF."""

    base: str = setting(DEFAULT_BASE, "hub id or local folder of the base model")
    adapter: str | None = setting(None, "LoRA adapter dir; its prompt format becomes the file's chat template")
    out: str = setting("model.gguf", "the .gguf file to write", required=True)
    type: str = setting("f16", "how weights are stored (q8_0: 8-bit, about half the size of f16)",
                        choices=("f32", "f16", "q8_0"), label="GGUF type")
    overwrite: bool = setting(False, "replace the GGUF file in --out (once the new one is written); no other file")
