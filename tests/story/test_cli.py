import json
import math

import pytest

from tests.story.conftest import cli, run_cli


@pytest.mark.slow
def test_sample_cli_streams_and_names_dropped_characters(trained):
    r = run_cli("-m", "llmb", "sample", "--ckpt", trained, "--prompt", "KING \u2603:", "--max-new-tokens", 50,
                "--seed", 3)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("KING \u2603:") and len(r.stdout) >= len("KING \u2603:") + 50
    assert "dropped characters the model never saw: '\u2603'" in r.stderr


def test_sample_is_reproducible_with_a_seed(trained, capsys):
    argv = ["sample", "--ckpt", trained, "--prompt", "KING:", "--max-new-tokens", 30, "--seed", 3]
    (code, first, err), (_, second, _) = cli(argv, capsys), cli(argv, capsys)
    assert code == 0, err
    assert first == second and first.startswith("KING:") and len(first) > 30


def test_eval_reports_bits_per_character_and_unencodable_characters(trained, corpus, tmp_path, capsys):
    code, out, err = cli(["eval", "--ckpt", trained, "--data", corpus], capsys)
    assert code == 0, err
    line = json.loads(out)
    assert 0 < line["val_loss"] < math.log(65) and line["unencodable_chars"] == 0 and line["bpc_lossless"]
    assert line["val_bpc"] == pytest.approx(line["val_loss"] / math.log(2), abs=1e-3)

    # the same text with a character the model never saw in every 10: those are named, not counted as free
    text = corpus.read_text()
    odd = tmp_path / "odd.txt"
    odd.write_text("".join(c if i % 10 else "\u2603" for i, c in enumerate(text)))
    code, out, err = cli(["eval", "--ckpt", trained, "--data", odd], capsys)
    result = json.loads(out)
    assert code == 0 and result["unencodable_chars"] == pytest.approx(result["val_chars"] / 10, rel=0.01)
    assert "validation characters cannot be encoded; bits per character leave them out" in err
    # bpc per encodable character: dropping 10% of the characters does not make the text cheaper per character
    assert result["val_bpc"] > 0.95 * line["val_bpc"]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no .txt files"),
    (lambda d: (d / "notes").mkdir() or (d / "notes" / "a.md").write_text("x") and d / "notes", "has no .txt files"),
    (lambda d: (d / "b.txt").write_bytes(bytes(range(256))) and d / "b.txt", "binary"),
    (lambda d: (d / "short.txt").write_text("Too short a book.\n" * 4) and d / "short.txt", "fewer than one block"),
])
def test_bad_data_gives_one_line_and_writes_nothing(tmp_path, capsys, make, message):
    data = make(tmp_path)
    out = tmp_path / "out"
    code, _, err = cli(["train", "--data", data, "--out", out, "--max-iters", 5], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not out.exists()


@pytest.mark.slow
def test_train_script_error_is_one_line_in_a_real_process(tmp_path):
    r = run_cli("training/train_char.py", "--data", tmp_path / "missing", "--out", tmp_path / "out", "--max-iters", 5)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
