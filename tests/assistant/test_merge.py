import torch
from transformers import AutoModelForCausalLM

from llmb.assistant.loading import load_base_model
from llmb.assistant.merge import merge
from llmb.hub import SOURCE_FILE


def tokens(n=24, seed=0):
    return torch.randint(0, 50000, (2, n), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_matches_adapter_model(tiny_phi, tiny_phi_adapter, tmp_path):
    from peft import PeftModel

    base = load_base_model(str(tiny_phi), "none", "cpu")
    ids = tokens()
    base_logits = logits(base, ids)
    adapted = logits(PeftModel.from_pretrained(base, tiny_phi_adapter).eval(), ids)
    merge(str(tiny_phi), str(tiny_phi_adapter), tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(logits(merged, ids), adapted, atol=1e-4)
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapter really changed the model
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert (tmp_path / "merged" / "chat_template.jinja").is_file()  # the adapter's prompt format goes along
    assert (tmp_path / "merged" / SOURCE_FILE).read_text().count(str(tiny_phi)) == 0  # no local path
