"""The job manager (llmb.app.jobs), uploads (llmb.app.uploads) and the app's folders (llmb.app.config)."""

import json
import os
import time

import pytest

from llmb.app import config as app_config
from llmb.app.jobs import JobManager, command_line, job_order, progress
from llmb.app.uploads import save_upload
from llmb.errors import UserError
from llmb.story.checkpoint import load_checkpoint
from tests.app.app_server import BOOK
from tests.conftest import REPO

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=16, eval_interval=10, eval_iters=2)


def story_spec(repo_data, out, **params):
    return job_order("story", {"data": [str(repo_data / BOOK)], "out": str(out)} | TINY | {"max_iters": 100_000}
                    | params)


def wait_until(condition, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail("timed out")


def saved_a_checkpoint(out):
    return lambda: (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------- specs

def test_command_line_is_what_a_user_would_type(tmp_path, repo_data):
    line = command_line(story_spec(repo_data, tmp_path / "run", lr="auto"))
    assert line.startswith(f"python -m llmb train-story --data {repo_data / BOOK} --out {tmp_path / 'run'} ")
    assert "--n-layer 2" in line and "--lr auto" in line and "--max-iters 100000" in line
    assert line.endswith(" --no-progress"), "the log gets one line per eval, not a progress bar"
    qlora = command_line(job_order("qlora", {"data": ["chats.jsonl"], "out": "out", "base": "some/model",
                                            "max_steps": 10, "quant": "none"}))
    assert qlora == "python -m llmb train-assistant --base some/model --data chats.jsonl --out out --quant none " \
                    "--max-steps 10"
    lr_find = command_line(job_order("lr-find", {"data": ["a.txt"], "out": "o", "n_layer": 2, "max_iters": 5}, 20))
    assert lr_find == "python -m llmb lr-find --data a.txt --out o --n-layer 2 --no-progress --num-iters 20"


def test_the_qlora_form_shows_auto_and_what_a_cpu_run_will_use():
    """The form's defaults were Phi-2's GPU recipe (500 steps): on a CPU the first run never ended."""
    from llmb.app.train_tab import form_field
    from llmb.assistant.config import TrainConfig
    from llmb.settings import spec_of

    for name, cpu in (("max_steps", 30), ("max_seq_len", 256), ("batch_size", 4)):
        box = form_field(spec_of(TrainConfig, name), "qlora")
        assert box.value == "auto" and f"auto: {cpu} on a CPU" in box.info, box.info
    order = job_order("qlora", {"data": ["chats.jsonl"], "out": "out", "base": "b", "quant": "none",
                                "max_steps": "auto", "batch_size": " Auto "})
    assert command_line(order) == "python -m llmb train-assistant --base b --data chats.jsonl --out out --quant none"


def test_the_trainer_finds_the_repository_without_an_install():
    """A Space does not pip-install the repo and no file edits sys.path: the child gets it on PYTHONPATH."""
    from llmb.app.jobs import REPO, child_environment

    assert child_environment()["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    assert child_environment()["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize("params, message", [
    ({"n_layer": 0}, "Layers must be a whole number from 1 to 64 or 'auto'"),
    ({"n_embd": -8}, "Embedding width must be between"),
    ({"batch_size": 2.5}, "Batch size must be a whole number"),
    ({"lr": "nan"}, "Learning rate must be a number from"),
    ({"lr": "inf"}, "Learning rate must be a number from"),
    ({"max_iters": 10**12}, "Max steps must be between"),
    ({"max_time": 0}, r"Max time \(s\) must be between"),
    ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
    ({"lora_r": 8}, "'lora_r' is not a setting of TrainConfig"),
    ({"max_iters": None}, "say how long to train"),
])
def test_bad_settings_are_refused_before_starting(tmp_path, repo_data, params, message):
    with pytest.raises(UserError, match=message):
        story_spec(repo_data, tmp_path / "run", **params)


def test_empty_data_and_unknown_kind_are_refused(tmp_path):
    with pytest.raises(UserError, match="pick or upload training data"):
        job_order("story", {"data": [], "out": str(tmp_path), "max_iters": 5})
    with pytest.raises(UserError, match="unknown job type"):
        job_order("dpo", {"data": ["x"], "out": str(tmp_path)})
    with pytest.raises(UserError, match="LR finder steps must be between 10 and 2000"):
        job_order("lr-find", {"data": ["x"], "out": str(tmp_path)}, num_iters=3)


# ------------------------------------------------------------------------------- running jobs

@pytest.mark.slow
def test_start_refuse_a_second_and_stop_gracefully(tmp_path, repo_data):
    manager = JobManager(tmp_path / "job.json")
    job = manager.start(story_spec(repo_data, tmp_path / "run1"))
    assert job["status"] == "running" and json.loads((tmp_path / "job.json").read_text())["pid"] == job["pid"]
    try:
        with pytest.raises(UserError, match=r"already running \(run1"):
            manager.start(story_spec(repo_data, tmp_path / "run2"))
        assert not (tmp_path / "run2").exists()
        wait_until(saved_a_checkpoint(tmp_path / "run1"))
        p = progress(manager.current())
        assert p.step >= 10 and p.total == 100_000 and p.tokens_per_sec > 0 and p.eta_s > 0
        assert {row["split"] for row in p.losses} == {"train", "val"} and p.sample
    finally:
        assert manager.stop()["status"] == "stopping"
    job = manager.wait(60)
    assert job["status"] == "stopped" and job["returncode"] == 0
    assert job["summary"]["stopped_by"] == "signal"
    model, tokenizer, meta = load_checkpoint(tmp_path / "run1")
    assert meta["step"] == job["summary"]["steps"]
    assert manager.stop() is None, "nothing left to stop"
    with pytest.raises(UserError, match="already exists"):
        manager.start(story_spec(repo_data, tmp_path / "run1"))


@pytest.mark.slow
def test_a_new_manager_reattaches_from_the_state_file(tmp_path, repo_data):
    first = JobManager(tmp_path / "job.json")
    job = first.start(story_spec(repo_data, tmp_path / "run"))
    try:
        wait_until(saved_a_checkpoint(tmp_path / "run"))
        # a page reload, a second browser or a restarted app: only the state file is shared
        second = JobManager(tmp_path / "job.json")
        assert second.current()["status"] == "running" and second.current()["pid"] == job["pid"]
        with pytest.raises(UserError, match="already running"):
            second.start(story_spec(repo_data, tmp_path / "other"))
        assert second.stop()["signals"] == ["SIGINT"]
    finally:
        if first.current()["status"] == "running":
            first.stop()
    first.process.wait(60)  # only the parent can reap the child; then the state file says how it ended
    job = JobManager(tmp_path / "job.json").wait(10)
    assert job["status"] == "stopped" and job["summary"]["steps"] >= 10, job


@pytest.mark.slow
def test_a_failing_run_reports_the_trainers_error(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short\n")
    manager = JobManager(tmp_path / "job.json")
    manager.start(job_order("story", {"data": [str(tiny)], "out": str(tmp_path / "run"), "max_iters": 5} | TINY))
    job = manager.wait(60)
    assert job["status"] == "failed" and job["returncode"] == 2
    assert job["error"].startswith("the training split has") and "fewer than one block" in job["error"]


def stubborn_trainer(out, answers):
    """A trainer that ignores SIGINT and SIGTERM (one in a step it cannot leave); one that `answers` rewrites
    progress.json as a trainer saving after a Stop does. Returns (its process, the job the app keeps for it)."""
    import subprocess
    import sys

    answer = "write_progress(sys.argv[1], 'stop requested: saving step 3')" if answers else "pass"
    code = ("import signal, sys, time\n"
            "from llmb.runlog import write_progress\n"
            "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_IGN)\n"
            f"while True:\n    {answer}\n    time.sleep(0.1)\n")
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], start_new_session=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    job = {"name": out.name, "kind": "qlora", "out": str(out), "log": str(out / "train.log"), "pid": proc.pid,
           "command": "python ...", "config": {}, "started_at": time.time(), "status": "running"}
    return proc, job


@pytest.mark.parametrize("answers", [True, False])
def test_stop_escalates_only_for_a_trainer_that_says_nothing(tmp_path, monkeypatch, answers):
    """A LoRA step on a CPU took 2 minutes: the app sent SIGTERM at 30 s and SIGKILL at 60 s, and the run died
    unsaved. A trainer that answers the Stop (progress.json: saving) is left to save, however long it takes."""
    from llmb.app import jobs
    from llmb.app.train_tab import job_markdown

    monkeypatch.setattr(jobs, "GRACE_S", 1.0)
    proc, job = stubborn_trainer(tmp_path / "run", answers)
    try:
        (tmp_path / "job.json").write_text(json.dumps(job))
        manager = JobManager(tmp_path / "job.json")
        time.sleep(0.5)  # the trainer has started
        assert manager.stop()["signals"] == ["SIGINT"]
        deadline = time.time() + 3.5  # past SIGTERM's 1 s and SIGKILL's 2 s of silence
        while time.time() < deadline and manager.current()["status"] == "stopping":
            time.sleep(0.1)
        job = manager.current()
        if answers:
            assert job["status"] == "stopping" and job["signals"] == ["SIGINT"]
            assert "stop requested: saving step 3…" in job_markdown(job)
        else:
            assert job["signals"] == ["SIGINT", "SIGTERM", "SIGKILL"] and job["status"] == "stopped"
            assert job["error"].startswith("stopped before anything was saved")
    finally:
        proc.kill()
        proc.wait()


def test_state_file_of_a_dead_process_is_not_running(tmp_path):
    state = {"name": "gone", "kind": "story", "out": str(tmp_path / "gone"), "log": str(tmp_path / "gone.log"),
             "pid": 2**22 + 12345, "command": "python ...", "config": {}, "started_at": time.time(),
             "status": "running"}
    (tmp_path / "job.json").write_text(json.dumps(state))
    job = JobManager(tmp_path / "job.json").current()
    assert job["status"] == "failed"


def test_progress_reads_the_metrics_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lines = [{"step": 10, "train_loss": 3.0, "tokens_per_sec": 100.0, "elapsed_s": 5.0, "total_steps": 40},
             {"step": 20, "train_loss": 2.5, "tokens_per_sec": 120.0, "elapsed_s": 10.0, "total_steps": 40,
              "val_loss": 2.6, "sample": "Dorothy"}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 3')
    p = progress({"out": str(out), "kind": "story", "config": {}})
    assert (p.step, p.total, p.tokens_per_sec, p.eta_s, p.sample) == (20, 40, 120.0, 10.0, "Dorothy")
    assert p.losses == [{"step": 10, "loss": 3.0, "split": "train"}, {"step": 20, "loss": 2.5, "split": "train"},
                        {"step": 20, "loss": 2.6, "split": "val"}]


def test_progress_shows_the_phase_then_every_step_from_progress_json(tmp_path):
    from llmb.app.train_tab import job_markdown
    from llmb.runlog import NEW_PROGRESS, write_progress

    out = tmp_path / "run"
    out.mkdir()
    job = {"out": str(out), "kind": "qlora", "config": {"max_steps": 40}, "name": "run", "status": "running",
           "started_at": time.time()}
    assert "preparing data and model" in job_markdown(job)  # nothing written yet
    write_progress(out, "loading the base model x")
    assert "loading the base model x…" in job_markdown(job)
    write_progress(out, "step 1 of 40: about 6.5 min to go", total=40, eta_s=390.0)  # after step 0
    assert "step 1 of 40: about 6.5 min to go…" in job_markdown(job) and progress(job).eta_s == 390.0
    write_progress(out, step=1, total=40, loss=2.25, tokens_per_sec=300.0, elapsed_s=9.0, eta_s=390.0)
    assert "step 1/40, 300 tokens/s, ETA 6.5 min, loss 2.2500" in job_markdown(job)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 2.5, "elapsed_s": 3.0}) + "\n")
    assert progress(job).step == 1 and progress(job).loss == 2.25  # the step-0 record is older
    write_progress(out, step=2, total=40, loss=2.0, file=NEW_PROGRESS)  # an --overwrite run before its first save
    assert progress(job).step == 2 and progress(job).loss == 2.0
    job["started_at"] = time.time() + 60  # a progress.json left by an earlier run in the same folder
    assert progress(job).step == 0 and "preparing data and model" in job_markdown(job)


# ------------------------------------------------------------------------------- folders

def test_paths_outside_the_allowed_folders_are_refused(tmp_path):
    data = tmp_path / "data"
    (data / "books").mkdir(parents=True)
    (data / "books" / "a.txt").write_text("text")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", data / "link.txt")
    assert app_config.inside(data / "books" / "a.txt", [data]) == (data / "books" / "a.txt").resolve()
    for bad in (data / ".." / "secret.txt", "/etc/passwd", data / "link.txt", f"{data}/books/../../secret.txt"):
        with pytest.raises(UserError, match="outside the allowed data folders"):
            app_config.inside(bad, [data])


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/abs", "", "x" * 65, "a b", ".hidden"])
def test_run_names_cannot_escape_the_checkpoints_folder(name):
    with pytest.raises(UserError, match="run name"):
        app_config.check_name(name)


def test_uploads_are_checked_and_renamed(tmp_path):
    uploads = tmp_path / "uploads"
    book = tmp_path / "my book?.txt"
    book.write_text("Once upon a time.\n" * 10)
    assert save_upload(book, uploads) == uploads / "my_book_.txt"
    blob = tmp_path / "blob.txt"
    blob.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(UserError, match="binary"):
        save_upload(blob, uploads)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "### Human: hi### Assistant: hello"}\n[1, 2\n')
    with pytest.raises(UserError, match="invalid JSON"):
        save_upload(broken, uploads)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "\xe9"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        save_upload(latin, uploads)
    with pytest.raises(UserError, match="upload .txt books or .jsonl chats"):
        save_upload(tmp_path / "model.bin", uploads)
    assert sorted(p.name for p in uploads.iterdir()) == ["my_book_.txt"]


# ------------------------------------------------------------------------------- settings

def test_flags_and_environment_variables(tmp_path):
    env = {"LLMB_STORY_CKPT": str(tmp_path / "s"), "LLMB_BASE": "some/model", "LLMB_DEVICE": "cpu",
           "LLMB_CPU_INT8": "1", "GRADIO_SERVER_PORT": "9999", "LLMB_DATA_DIRS": f"{tmp_path}/a{os.pathsep}{tmp_path}/b"}
    c = app_config.parse_args([], env)
    assert (c.port, c.base, c.device, c.cpu_int8, c.story_ckpt) == (9999, "some/model", "cpu", True, tmp_path / "s")
    assert c.data_dirs == [tmp_path / "a", tmp_path / "b"] and c.host == "127.0.0.1" and not c.share
    c = app_config.parse_args(["--port", "1234", "--base", "other", "--data-dir", str(tmp_path)], env)
    assert (c.port, c.base, c.data_dirs) == (1234, "other", [tmp_path])
    assert app_config.environment({})["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_app_flags_come_from_one_dataclass_with_their_environment_variables(tmp_path, capsys):
    from llmb.settings import specs

    for spec in specs(app_config.AppConfig):  # every flag has help; the help names its variable
        assert spec.help or spec.name == "on_space"
    with pytest.raises(SystemExit):
        app_config.parse_args(["--help"], {})
    shown = " ".join(capsys.readouterr().out.split())
    assert "--max-turns" in shown and "environment variable LLMB_MAX_TURNS" in shown
    for bad, says in (({"LLMB_MAX_TURNS": "abc"}, "LLMB_MAX_TURNS must be a number (got 'abc')"),
                      ({"LLMB_UPLOADS_MB": "0"}, "LLMB_UPLOADS_MB must be between 1 and"),
                      ({"LLMB_CPU_INT8": "maybe"}, "LLMB_CPU_INT8 must be true or false")):
        with pytest.raises(SystemExit) as exit_:
            app_config.parse_args([], bad)
        assert exit_.value.code == 2 and says in capsys.readouterr().err
    a, b = tmp_path / "a", tmp_path / "b"
    assert app_config.parse_args(["--data-dir", str(a), "--data-dir", str(b)], {}).data_dirs == [a, b]
    assert app_config.parse_args(["--data-dir", str(a), str(b)], {}).data_dirs == [a, b]
    assert app_config.parse_args(["--max-turns", "7"], {"LLMB_MAX_TURNS": "9"}).max_turns == 7  # the flag wins
    assert app_config.parse_args([], {"LLMB_MAX_TURNS": "9"}).max_turns == 9
    app_config.parse_args(["--data-dir", str(tmp_path / "typo")], {})  # a folder that is not there: said at start
    assert f"warning: the data folder {tmp_path / 'typo'} does not exist" in capsys.readouterr().err


def test_training_is_off_on_a_public_space_unless_allowed():
    assert app_config.parse_args([], {}).allow_training
    assert not app_config.parse_args([], {"SPACE_ID": "me/llmb"}).allow_training
    assert app_config.parse_args([], {"SPACE_ID": "me/llmb", "LLMB_ALLOW_TRAINING": "1"}).allow_training


def test_pickers_find_checkpoints_adapters_and_data(tmp_path, repo_data):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "story-a").mkdir(parents=True)  # what makes a story checkpoint (llmb.folders), without training one
    (ckpts / "story-a" / "config.json").write_text('{"llmb": "story"}')
    (ckpts / "story-a" / "model.safetensors").write_bytes(b"")
    for name in ("adapter-old", "adapter-new"):
        (ckpts / name).mkdir()
        (ckpts / name / "adapter_config.json").write_text("{}")
        time.sleep(0.01)
    (ckpts / "half-written").mkdir()
    data = tmp_path / "data"
    (data / "oz").mkdir(parents=True)
    for n in (1, 2):
        (data / "oz" / f"{n}.txt").write_text("book")
    (data / "chats.jsonl").write_text("{}")
    (data / "notes.md").write_text("not data")
    c = app_config.parse_args(["--checkpoints", str(ckpts), "--story-ckpt", str(tmp_path / "missing"),
                               "--data-dir", str(data), "--work-dir", str(tmp_path / "work")], {})
    stories = app_config.find_story_checkpoints(c)
    assert ckpts / "story-a" in stories and ckpts / "half-written" not in stories
    assert tmp_path / "missing" not in stories
    assert app_config.find_adapters(c)[:2] == [ckpts / "adapter-new", ckpts / "adapter-old"]
    assert app_config.default_adapters(c)[:2] == [ckpts / "adapter-new", ckpts / "adapter-old"]
    assert app_config.default_adapters(app_config.parse_args(["--adapter", "none"], {})) == []
    labels = [label for label, _ in app_config.data_choices(c)]
    assert labels == ["data/chats.jsonl", "data/oz/ (2 books)", "data/oz/1.txt", "data/oz/2.txt"]
