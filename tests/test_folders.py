"""One answer to "what kind of folder is this": story checkpoint, LoRA adapter or base model."""

import json

import pytest

from llmb.errors import UserError
from llmb.folders import OUTPUTS, check_out_file, check_out_folder, folder_kind, output_kind, require, saved_step


def make(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_kinds(tmp_path):
    story = make(tmp_path / "s", {"config.json": json.dumps({"llmb": "story"}), "model.safetensors": ""})
    adapter = make(tmp_path / "a", {"adapter_config.json": "{}", "adapter_model.safetensors": ""})
    model = make(tmp_path / "m", {"config.json": json.dumps({"model_type": "llama"}), "model.safetensors": ""})
    half = make(tmp_path / "h", {"config.json": json.dumps({"llmb": "story"})})  # weights not written yet
    broken = make(tmp_path / "b", {"config.json": "{not json", "model.safetensors": ""})
    assert [folder_kind(p) for p in (story, adapter, model, half, broken)] == ["story", "adapter", "model", None, None]
    assert require(story, "story") == story


def test_require_says_what_the_folder_is(tmp_path):
    adapter = make(tmp_path / "a", {"adapter_config.json": "{}"})
    with pytest.raises(UserError, match="not a story checkpoint.*it is an adapter folder; train one first"):
        require(adapter, "story", "train one first")
    with pytest.raises(UserError, match="does not exist"):
        require(tmp_path / "missing", "adapter")


# ------------------------------------------------------------------------------ output folders

def thesis(tmp_path):
    """A folder of a user's own files, which no command may touch."""
    folder = make(tmp_path / "mine", {"thesis.txt": "years of work"})
    (folder / "sub").mkdir()
    (folder / "sub" / "photo.jpg").write_bytes(b"\xff\xd8")
    return folder


@pytest.mark.parametrize("kind", ["story", "adapter", "model", "lr-find"])
def test_new_and_empty_folders_are_accepted(tmp_path, kind):
    assert check_out_folder(tmp_path / "new" / "deeper", kind) is None
    (tmp_path / "empty").mkdir()
    assert check_out_folder(tmp_path / "empty", kind) is None
    (tmp_path / "empty" / "train.log").write_text("")  # the app's log of this job, opened before it starts
    assert check_out_folder(tmp_path / "empty", kind) is None


@pytest.mark.parametrize("kind", ["story", "adapter", "model", "lr-find"])
def test_a_users_own_files_are_refused_even_with_overwrite(tmp_path, kind):
    mine = thesis(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"mine already holds files that are not a model \(sub/, thesis.txt\); "
                                            r"give another --out"):
            check_out_folder(mine, kind, overwrite=overwrite)
    assert (mine / "thesis.txt").read_text() == "years of work"


def test_a_folder_of_another_kind_is_refused_naming_what_is_there(tmp_path):
    story = make(tmp_path / "s", {"config.json": json.dumps({"llmb": "story"}), "model.safetensors": "",
                                  "char_vocab.json": "", "train_state.pt": "", "metrics.jsonl": ""})
    with pytest.raises(UserError, match=r"s already holds a story checkpoint \(char_vocab.json, config.json, "
                                        r"metrics.jsonl, model.safetensors, ...\); give another --out "
                                        r"\(--overwrite only replaces a model folder\)"):
        check_out_folder(story, "model", overwrite=True)
    with pytest.raises(UserError, match="--resume: .* holds a story checkpoint .*, not a LoRA adapter run"):
        check_out_folder(story, "adapter", resume=True)


def test_its_own_kind_needs_overwrite_or_resume(tmp_path):
    adapter = make(tmp_path / "a", {"adapter_config.json": "{}", "metrics.jsonl": ""})
    with pytest.raises(UserError, match="already holds a LoRA adapter run .*; give --resume to continue it, another "
                                        "--out, or --overwrite to replace it"):
        check_out_folder(adapter, "adapter")
    assert check_out_folder(adapter, "adapter", overwrite=True) == "adapter"
    assert check_out_folder(adapter, "adapter", resume=True) == "adapter"
    stopped = make(tmp_path / "b", {"metrics.jsonl": ""})  # a QLoRA run stopped before it finished
    (stopped / "checkpoint-30").mkdir()
    assert output_kind(stopped) == "adapter" and saved_step(stopped) == 30
    with pytest.raises(UserError, match="--resume: no checkpoint in"):
        check_out_folder(tmp_path / "none", "adapter", resume=True)
    failed = make(tmp_path / "f", {"metrics.jsonl": "", "summary.json": "{}"})  # a run that saved no model
    with pytest.raises(UserError, match="holds the log of a run that saved no model"):
        check_out_folder(failed, "story")
    assert check_out_folder(failed, "story", overwrite=True) == "run"
    loading = make(tmp_path / "p", {"progress.json": "{}"})  # a QLoRA run that failed while it loaded the base
    assert output_kind(loading) == "run" and check_out_folder(loading, "adapter", overwrite=True) == "run"
    swept = make(tmp_path / "lr", {"lr_find.json": "{}", "lr_find.png": ""})  # lr-find --out, then train there
    with pytest.raises(UserError, match="holds an LR-finder result .*; give another --out, or --overwrite"):
        check_out_folder(swept, "story")
    assert check_out_folder(swept, "story", overwrite=True) == "lr-find"


def test_a_file_is_refused_as_a_folder_and_a_folder_as_a_file(tmp_path):
    file = make(tmp_path / "d", {"notes.txt": "x"}) / "notes.txt"
    with pytest.raises(UserError, match="--out .*notes.txt is a file; give a folder"):
        check_out_folder(file, "adapter")
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check_out_file(tmp_path / "d", "gguf", overwrite=True)
    assert check_out_file(tmp_path / "d" / "new.gguf", "gguf") == tmp_path / "d" / "new.gguf"


def test_overwrite_replaces_only_a_file_of_the_kind_the_command_writes(tmp_path):
    gguf = make(tmp_path / "d", {"old.gguf": "GGUF and the rest", "notes.txt": "x"}) / "old.gguf"
    with pytest.raises(UserError, match="already exists; give another --out, or --overwrite"):
        check_out_file(gguf, "gguf")
    assert check_out_file(gguf, "gguf", overwrite=True) == gguf
    with pytest.raises(UserError, match="notes.txt is not a GGUF file; give another --out .--overwrite only "
                                        "replaces a GGUF file."):
        check_out_file(tmp_path / "d" / "notes.txt", "gguf", overwrite=True)


@pytest.mark.parametrize("kind, files", [
    ("adapter", {"adapter_config.json": "{}", "adapter_model.safetensors": "w"}),
    ("story", {"config.json": json.dumps({"llmb": "story"}), "model.safetensors": "w"}),
    ("model", {"config.json": json.dumps({"model_type": "phi"}), "model.safetensors": "w", "model.gguf": "GGUF"})])
def test_no_file_is_written_inside_a_model_folder(tmp_path, kind, files):
    folder = make(tmp_path / "run", files)
    for name in [*files, "new.gguf"]:
        with pytest.raises(UserError, match=f"run holds {OUTPUTS[kind]}, which must stay as it is; give --out a "
                                            f"file outside it, e.g. .*{tmp_path.name}/run.gguf"):
            check_out_file(folder / name, "gguf", overwrite=True)


def test_saved_step_reads_the_folder(tmp_path):
    story = make(tmp_path / "s", {"config.json": json.dumps({"llmb": "story", "step": 30}), "model.safetensors": ""})
    assert saved_step(story) == 30 and saved_step(tmp_path) is None


def test_the_shipped_demo_model_is_never_replaced_nor_resumed(tmp_path):
    """`train-story --out checkpoints/oz-story --overwrite` replaced the demo model that the README, the app and
    the tests use with a 2-step one: a folder holding a .llmb-keep file is kept, whatever the flags."""
    import shutil

    from llmb.folders import KEEP
    from tests.conftest import REPO

    shipped = REPO / "checkpoints" / "oz-story"
    assert (shipped / KEEP).is_file()
    demo = shutil.copytree(shipped, tmp_path / "oz-story")
    before = {p.name: p.read_bytes() for p in demo.iterdir()}
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(UserError, match="oz-story is kept as it is \\(the Oz demo model"):
            check_out_folder(demo, "story", **flags)
    assert {p.name: p.read_bytes() for p in demo.iterdir()} == before
