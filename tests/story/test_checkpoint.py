import json
import os
import stat

import pytest

from llmb.errors import UserError
from llmb.fileio import read_json
from llmb.folders import is_story_checkpoint
from llmb.runlog import read_metrics
from llmb.story.checkpoint import STAGING, load_checkpoint, load_train_state
from llmb.story.config import TrainConfig
from llmb.story.train import train
from tests.story.conftest import TINY

CHECKPOINT_FILES = ("char_vocab.json", "config.json", "model.safetensors", "train_state.pt")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_files_respect_the_umask(corpus, tmp_path, umask, mode):
    out = tmp_path / "run"
    old = os.umask(umask)
    try:
        train(TrainConfig(data=[str(corpus)], out=str(out), max_iters=2, eval_interval=2, eval_iters=1,
                          sample_chars=0, **TINY), log=lambda *a: None)
    finally:
        os.umask(old)
    for name in CHECKPOINT_FILES:
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name
    assert not (out / STAGING).exists()


def test_overwrite_keeps_the_old_run_until_the_new_one_saves(corpus, run_copy, monkeypatch):
    import llmb.story.train as story_train

    old = {name: (run_copy / name).read_bytes() for name in CHECKPOINT_FILES}
    seen = {}
    real = story_train.save_checkpoint

    def look_first(out, *args, **kwargs):  # what the folder holds when the new run first saves
        if "before" not in seen:
            seen["before"] = {name: (out / name).read_bytes() for name in CHECKPOINT_FILES}
        return real(out, *args, **kwargs)

    monkeypatch.setattr(story_train, "save_checkpoint", look_first)
    cfg = TrainConfig(data=[str(corpus)], out=str(run_copy), overwrite=True, tokenizer="bpe", vocab_size=300,
                      max_iters=6, eval_interval=3, log_interval=1, eval_iters=1, sample_chars=0, **TINY)
    train(cfg, log=lambda *a: None)
    assert seen["before"] == old  # nothing of the old run was touched before the first save
    model, tokenizer, meta = load_checkpoint(run_copy)
    assert tokenizer.kind == "subword" and meta["step"] == 6 and model.config.vocab_size == 300
    assert not (run_copy / "char_vocab.json").exists()  # the old run's vocabulary went with it
    assert [r["step"] for r in read_metrics(run_copy / "metrics.jsonl")] == list(range(1, 7))
    assert not (run_copy / "summary.json").exists() or read_json(run_copy / "summary.json")["steps"] == 6


def test_a_save_interrupted_between_its_moves_is_named_on_resume(corpus, run_copy, monkeypatch):
    import llmb.story.checkpoint as checkpoint

    real, moves = os.replace, []

    def crash_on_config(src, dst):
        if str(dst).endswith("config.json"):
            raise KeyboardInterrupt  # a kill just before the last move
        moves.append(dst)
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data=[str(corpus)], out=str(run_copy), resume=True, max_iters=30, eval_interval=10,
                          eval_iters=2, sample_chars=0, **TINY), log=lambda *a: None)
    monkeypatch.undo()
    assert moves and is_story_checkpoint(run_copy)
    assert load_checkpoint(run_copy)[2]["step"] == 20  # still loads (same run, same vocabulary)
    with pytest.raises(UserError, match="last save was interrupted"):
        load_train_state(run_copy)


def test_a_tokenizer_from_another_run_is_named_not_sampled_from(run_copy):
    vocab = json.loads((run_copy / "char_vocab.json").read_text())
    vocab["chars"] = vocab["chars"][:-5]
    (run_copy / "char_vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(UserError, match="mixes files of two runs"):
        load_checkpoint(run_copy)


def test_samplers_get_int8_on_a_cpu_by_default_with_logits_close_to_fp32(trained):
    import torch

    from llmb.quantize import int8_supported
    from llmb.story.checkpoint import load_for_sampling

    fp32, _, meta = load_for_sampling(trained, "cpu", "fp32")
    assert meta["precision"] == "fp32" and type(fp32.h[0].mlp.c_fc) is torch.nn.Linear
    auto, _, meta = load_for_sampling(trained, "cpu")
    used = meta["precision"]
    assert used == ("int8" if int8_supported() else "fp32")
    assert (type(auto.h[0].mlp.c_fc) is not torch.nn.Linear) == (used == "int8")
    ids = torch.randint(0, fp32.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = fp32(ids)[0], auto(ids)[0]
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # int8 weights: close, not equal
    with pytest.raises(UserError, match="unknown precision 'half'"):
        load_for_sampling(trained, "cpu", "half")
