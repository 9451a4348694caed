"""int8 weights for fast CPU decoding, shared by the story model and the assistant.

Decoding one token at a time reads every weight once per token, so on a CPU it is limited by
memory traffic, not arithmetic: int8 weights move a quarter of the bytes of fp32.
"""

import warnings
from functools import cache

PRECISIONS = ("auto", "fp32", "int8")  # what a sampler may ask for (auto: int8 on a CPU where it is fast)


def int8_supported():
    """Whether this PyTorch has the x86 int8 kernels (fbgemm) that make int8 decoding fast."""
    import torch

    return any(engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm"))


def quantize_linears_int8(model):
    """Replace each frozen nn.Linear by a dynamically quantized int8 one, in place, one at a time.

    Weights: int8 with one scale per output channel. Activations: quantized on the fly per
    token batch. LoRA's own small A/B matrices stay fp32, so a LoRA wrapper around an int8
    base layer still works and can still be switched off. Everything else becomes fp32.
    """
    import torch
    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig

    Int8Linear = direct_int8_linear()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks its quantized tensors as deprecated
        # names, not modules: holding the old layers would keep every float weight alive
        names = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lora_" not in n]
        for name in names:
            parent, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent)
            linear = getattr(parent, child_name).float()
            linear.qconfig = per_channel_dynamic_qconfig
            setattr(parent, child_name, Int8Linear.from_float(linear))
            del linear
    return model.to(torch.float32)


@cache
def direct_int8_linear():
    """torch.ao's dynamically quantized Linear, whose forward calls the int8 kernel directly.

    Decoding calls every layer once per token, and the stock forward (a dtype check, then torch.ops'
    Python dispatch) costs about a tenth of a story-model token on a CPU. Same kernel, same result.
    """
    import torch
    from torch.ao.nn.quantized.dynamic import Linear

    linear_dynamic = torch.ops.quantized.linear_dynamic.default

    class Int8Linear(Linear):
        def forward(self, x):
            if torch.jit.is_scripting():  # TorchScript calls the op from C++ anyway (see llmb.story.fast_decode)
                return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, True)
            return linear_dynamic(x, self._packed_params._packed_params, True)  # reduce_range, as Linear does

    return Int8Linear
