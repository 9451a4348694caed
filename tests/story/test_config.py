import pytest

from llmb.errors import UserError
from llmb.settings import check, from_values
from llmb.story.config import GB, TrainConfig, check_memory, memory_estimate

OZ = dict(n_layer=6, n_head=8, n_embd=256, block_size=128, batch_size=32)  # checkpoints/oz-story


def test_memory_estimate_counts_weights_optimizer_and_activations():
    cfg = TrainConfig(**OZ)
    params = 12 * 6 * 256**2 + 256 * 256
    assert memory_estimate(cfg) > 16 * params  # weights, grads, two AdamW moments, then activations
    assert memory_estimate(cfg) < 2 * GB
    bigger = TrainConfig(**{**OZ, "batch_size": 64})
    assert memory_estimate(bigger) > memory_estimate(cfg)


def test_a_config_that_cannot_fit_is_refused_saying_the_estimate():
    big = dict(n_layer=64, n_embd=4096, n_head=64, batch_size=4096)  # 12.9B parameters
    with pytest.raises(UserError, match=r"need about \d+\.\d GB to train.*more than this machine's memory"):
        from_values(TrainConfig, {"data": ["x"], "max_iters": 1, **big})
    check(TrainConfig(data=["x"], max_iters=1, **OZ))  # the shipped model fits
    with pytest.raises(UserError, match="the GPU's memory"):
        check_memory(TrainConfig(**OZ), 0.1 * GB, "the GPU's memory")


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(UserError, match="give one of them"):
        check(TrainConfig(data=["x"], max_iters=1, resume=True, overwrite=True))
