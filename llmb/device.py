"""Which device to run on: the one answer to --device auto|cpu|cuda, for every command and the app."""

from llmb.errors import UserError


def resolve_device(device="auto"):
    """'cuda' or 'cpu'. auto picks the GPU when there is one; asking for a missing GPU is an error."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
