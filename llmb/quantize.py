"""int8 weights for fast CPU decoding, shared by the story model and the assistant.

Decoding one token at a time reads every weight once per token, so on a CPU it is limited by
memory traffic, not arithmetic: int8 weights move a quarter of the bytes of fp32.
"""

import sys
import warnings
from functools import cache

from llmb.errors import UserError

PRECISIONS = ("auto", "fp32", "int8")  # what a sampler may ask for (auto: int8 on a CPU where it is fast)


def int8_supported():
    """Whether this PyTorch has the x86 int8 kernels (fbgemm) that make int8 decoding fast."""
    import torch

    engines = torch.backends.quantized.supported_engines
    return direct_int8_linear() is not None and any(engine in engines for engine in ("x86", "fbgemm"))


def wants_int8(precision, device, auto=True):
    """Whether a sampler asking for `precision` (auto, fp32, int8) on `device` (cpu or cuda) gets int8 layers.

    auto: int8 on a CPU that has the int8 kernels where `auto` is True (the story model: +0.001 nats/char),
    full precision elsewhere (a GPU is not limited the same way, and these kernels are CPU-only). The
    assistant passes auto=False: its activations have outlier channels that int8 flattens (SmolLM2-135M's
    next-token logits move by half their size, and greedy answers change on AVX-512 CPUs).
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "int8" and device != "cpu":
        raise UserError("--precision int8 is for the CPU; use it with --device cpu, or fp32 or auto on a GPU")
    return precision == "int8" or (precision == "auto" and auto and device == "cpu" and int8_supported())


def is_int8(model):
    """Whether `model` has int8 linear layers (quantize_linears_int8 falls back to fp32 when it cannot)."""
    Int8Linear = direct_int8_linear()
    return Int8Linear is not None and any(isinstance(m, Int8Linear) for m in model.modules())


def quantize_linears_int8(model):
    """Replace each frozen nn.Linear by a dynamically quantized int8 one, in place, one at a time.

    Weights: int8 with one scale per output channel. Activations: quantized on the fly per
    token batch. LoRA's own small A/B matrices stay fp32, so a LoRA wrapper around an int8
    base layer still works and can still be switched off. Everything else becomes fp32.

    torch.ao's quantization is deprecated: where this PyTorch no longer has it (or it fails), the
    model stays fp32 and one line on stderr says so (is_int8 tells the caller which it got).
    """
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch marks its quantized tensors as deprecated
            _swap_linears_int8(model)
    except Exception as e:  # ImportError, AttributeError, RuntimeError: whatever a removed API raises
        why = str(e).splitlines()[0] if str(e) else "no message"
        print(f"note: no int8 layers in this PyTorch ({type(e).__name__}: {why}); the model stays fp32",
              file=sys.stderr)
    return model.to(torch.float32)


def _swap_linears_int8(model):
    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig

    Int8Linear = direct_int8_linear()
    if Int8Linear is None:
        raise ImportError("torch.ao.nn.quantized.dynamic.Linear or its int8 kernel is missing")
    # names, not modules: holding the old layers would keep every float weight alive
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lora_" not in n]
    for name in names:
        parent, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent)
        linear = getattr(parent, child_name).float()
        linear.qconfig = per_channel_dynamic_qconfig
        setattr(parent, child_name, Int8Linear.from_float(linear))
        del linear


@cache
def direct_int8_linear():
    """torch.ao's dynamically quantized Linear, whose forward calls the int8 kernel directly.

    Decoding calls every layer once per token, and the stock forward (a dtype check, then torch.ops'
    Python dispatch) costs about a tenth of a story-model token on a CPU. Same kernel, same result.
    None when this PyTorch has neither (torch.ao is deprecated).
    """
    import torch

    try:
        from torch.ao.nn.quantized.dynamic import Linear

        linear_dynamic = torch.ops.quantized.linear_dynamic.default
    except (ImportError, AttributeError, RuntimeError):
        return None

    class Int8Linear(Linear):
        def forward(self, x):
            if torch.jit.is_scripting():  # TorchScript calls the op from C++ anyway (see llmb.story.fast_decode)
                return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, True)
            return linear_dynamic(x, self._packed_params._packed_params, True)  # reduce_range, as Linear does

    return Int8Linear
