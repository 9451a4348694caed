import subprocess
import sys

import pytest

from llmb.assistant.gguf import import_gguf
from llmb.errors import UserError
from tests.conftest import REPO


def test_missing_and_not_gguf_files(tmp_path):
    with pytest.raises(UserError, match="does not exist; give the path of a .gguf file"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(UserError, match="is not a GGUF file"):
        import_gguf(tmp_path / "fake.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_unsupported_architecture_one_line(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "bogusarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = subprocess.run([sys.executable, "-m", "llmb", "import-gguf", str(path), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: transformers cannot read odd.gguf: GGUF model with architecture bogusarch is not supported")


@pytest.mark.slow
def test_get_small_assistant_reuses_the_imported_folder(small_assistant):
    proc = subprocess.run([sys.executable, "-m", "llmb", "get-small-assistant", "--checkpoints",
                           str(small_assistant.parent)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == str(small_assistant)
    told = proc.stderr.strip().splitlines()  # what was installed, and what to do next
    assert told[0] == f"HuggingFaceTB/SmolLM2-135M-Instruct already installed in {small_assistant}", told
    assert "pick `smollm2-135m-instruct` in the Assistant tab's Base" in told[1]
    assert told[-1].strip() == f"python -m llmb chat --base {small_assistant}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "source.json"):
        assert (small_assistant / name).is_file(), name
