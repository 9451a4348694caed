"""The assistant's settings that depend on the model: the sampling that suits a base."""

import argparse
import json

from llmb.assistant.cli import suited_sampling
from llmb.assistant.config import model_sampling, parameter_count


def test_a_small_model_without_its_own_sampling_answers_greedily(tiny_phi):
    assert 0 < parameter_count(tiny_phi) < 10**9
    assert model_sampling(tiny_phi) == {"temperature": 0.0}


def test_the_models_own_generation_config_wins(tmp_path, tiny_phi):
    import shutil

    base = shutil.copytree(tiny_phi, tmp_path / "base")
    (base / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    assert model_sampling(base) == {"temperature": 0.6, "top_p": 0.95}
    (base / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert model_sampling(base) == {"temperature": 0.0}


def test_a_hub_id_not_downloaded_keeps_the_defaults_and_flags_given_win(tiny_phi):
    assert model_sampling("microsoft/phi-2") == {}
    args = argparse.Namespace(base=str(tiny_phi), temperature=None, top_p=None, top_k="7", max_new_tokens="5")
    chosen = suited_sampling(args)
    assert (chosen.temperature, chosen.top_p, chosen.top_k) == (0.0, 0.9, "7")
    chosen = suited_sampling(argparse.Namespace(base="microsoft/phi-2", temperature="1.2", top_p=None, top_k=None))
    assert (chosen.temperature, chosen.top_p, chosen.top_k) == ("1.2", 0.9, 50)
