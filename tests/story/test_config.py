import pytest

from llmb.errors import UserError
from llmb.settings import check, from_values
from llmb.story.config import GB, SHORT_RUN_S, TrainConfig, check_memory, memory_estimate

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


@pytest.mark.parametrize("max_time, depth", [(None, 4), (30, 2), (SHORT_RUN_S - 1, 2), (SHORT_RUN_S, 4), (3600, 4)])
def test_auto_depth_is_two_blocks_for_a_short_time_budget_only(max_time, depth):
    cfg = check(TrainConfig(data=["x"], max_iters=None if max_time else 100, max_time=max_time))
    assert cfg.n_layer == depth
    assert check(TrainConfig(data=["x"], max_time=max_time or 60, n_layer=5)).n_layer == 5  # given: kept
    assert check(TrainConfig(data=["x"], max_time=max_time or 60, n_layer=" AUTO ")).n_layer in (2, 4)


def test_auto_depth_on_resume_is_the_saved_runs_and_a_given_one_must_match():
    from llmb.story.train import check_resume

    resumed = check(TrainConfig(data=["x"], max_time=3600, resume=True))  # auto would give 4 blocks
    assert resumed.n_layer == "auto"
    check_resume(resumed, {"n_layer": 2, "data": ["x"]})
    assert resumed.n_layer == 2
    with pytest.raises(UserError, match="--n-layer 2 -> 4"):
        check_resume(check(TrainConfig(data=["x"], max_time=3600, n_layer=4, resume=True)), {"n_layer": 2})
