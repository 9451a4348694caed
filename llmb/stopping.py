"""The torch side of a trainer's stop (llmb.runlog.StopSignal): the random states a dropped step puts back, and
the points in a backward pass where a stop signal can drop it. Apart from runlog, which the app imports at start
without torch."""


def random_states(generators=()):
    """torch's global random states (CPU, and CUDA once in use) and those of `generators`."""
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, [g.get_state() for g in generators]


def set_random_states(states, generators=()):
    import torch

    cpu, cuda, own = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    for g, state in zip(generators, own):
        g.set_state(state)


def stop_points_in_backward(model):
    """Let a stop signal abandon a backward pass half-way, not only a forward pass.

    A signal handler runs between two Python bytecodes. A forward pass is Python module by module, but a
    backward pass is C++ from the loss down to the inputs: without this, a stop waits for the whole of it
    (a LoRA micro-batch of SmolLM2-135M at 4 x 256 tokens on a 2-core CPU: about 30 s). Here a hook on the
    output of each block of `model` (each member of a ModuleList: a transformer's layers) runs a Python
    function when the backward pass reaches that block, and the pending handler runs with it: a stop waits
    for one block's backward at most (about 1 s there; the loss and output layer, before the first block: 2 s).
    On a GPU the backward pass runs in a thread of torch's own, where no handler runs: the stop waits for it
    there, which is short (seconds at most).
    """
    import torch

    def on_block_output(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if torch.is_tensor(hidden) and hidden.requires_grad:  # training, not evaluation or sampling
            hidden.register_hook(_python_runs_here)

    blocks = [block for m in model.modules() if isinstance(m, torch.nn.ModuleList) for block in m]
    return [block.register_forward_hook(on_block_output) for block in blocks]


def _python_runs_here(grad):
    """Changes nothing: while Python runs this, a stop signal's handler can run too (and raise StepAbandoned)."""
    return None
