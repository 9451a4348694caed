"""Training jobs for the app: one at a time, in a subprocess, remembered on disk.

    manager = JobManager(state_file="runs/app/job.json")
    job = manager.start(JobSpec(kind="story", data=["books/oz"], out="checkpoints/my-story",
                                params={"max_iters": 2000}))
    manager.current()      # the job as the state file says, with its live status
    progress(job)          # step, total, tokens/s, ETA, losses, latest sample (from metrics.jsonl)
    manager.stop()         # SIGINT: the trainer finishes its step, saves and exits

The job runs the same command a user would type (`training/train_char.py`,
`training/train_qlora.py`); `command_line(spec)` shows it. The state file is what lets a page
reload, a second browser or a restarted app re-attach to a job that is still running.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmb.errors import UserError
from llmb.fileio import read_json, write_json
from llmb.runlog import read_metrics

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"story": REPO / "training" / "train_char.py", "qlora": REPO / "training" / "train_qlora.py"}

# The settings each job type takes from the app: flag name -> (type, smallest, largest).
# The ranges are what makes sense on one machine; the trainers check the finer rules.
DAY = 24 * 3600.0
MODEL = {"batch_size": (int, 1, 4096), "seed": (int, 0, 2**31 - 1), "device": (("auto", "cpu", "cuda"), None, None)}
STORY_FLAGS = MODEL | {
    "n_layer": (int, 1, 64), "n_head": (int, 1, 64), "n_embd": (int, 2, 4096), "block_size": (int, 2, 8192),
    "dropout": (float, 0.0, 0.99), "lr": ("lr", 1e-8, 10.0), "max_iters": (int, 1, 10**7),
    "max_time": (float, 1.0, 7 * DAY), "eval_interval": (int, 1, 10**7), "eval_iters": (int, 1, 10**4),
    "log_interval": (int, 1, 10**6)}
QLORA_FLAGS = MODEL | {
    "base": (str, None, None), "max_steps": (int, 1, 10**7), "max_seq_len": (int, 8, 16384), "lr": (float, 1e-8, 1.0),
    "grad_accum": (int, 1, 1024), "lora_r": (int, 1, 1024), "eval_steps": (int, 1, 10**7),
    "save_steps": (int, 1, 10**7), "log_steps": (int, 1, 10**6), "quant": (("4bit", "8bit", "none"), None, None)}
FLAGS = {"story": STORY_FLAGS, "qlora": QLORA_FLAGS}
RUNNING = ("running", "stopping")


@dataclass
class JobSpec:
    kind: str  # "story" or "qlora"
    data: list  # files or folders
    out: str  # the run's folder (a new one)
    params: dict = field(default_factory=dict)  # flag name (underscores) -> value; None = trainer default


def check_value(name, rule, value):
    """The value as the flag wants it, or UserError naming the field and the allowed range."""
    kind, low, high = rule
    label = name.replace("_", " ")
    if isinstance(kind, tuple):  # a choice
        if value not in kind:
            raise UserError(f"{label} must be one of {', '.join(kind)} (got {value!r})")
        return value
    if kind == "lr":
        if str(value).strip() == "auto":
            return "auto"
        kind = float
    if kind is str:
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{label} must be a number (got {value!r})") from None
    if number != number or abs(number) == float("inf"):  # nan, inf
        raise UserError(f"{label} must be a finite number (got {value!r})")
    if kind is int and number != int(number):
        raise UserError(f"{label} must be a whole number (got {value!r})")
    number = kind(number)
    if not low <= number <= high:
        raise UserError(f"{label} must be between {low:g} and {high:g} (got {number:g})")
    return number


def check_spec(spec):
    """Refuse what the trainer would refuse later, so the user hears it at once."""
    if spec.kind not in FLAGS:
        raise UserError(f"unknown job type {spec.kind!r}; use story or qlora")
    if not spec.data:
        raise UserError("pick or upload training data first")
    rules = FLAGS[spec.kind]
    params = {}
    for name, value in spec.params.items():
        if name not in rules:
            raise UserError(f"{name} is not a setting of a {spec.kind} job")
        if value is not None and value != "":
            params[name] = check_value(name, rules[name], value)
    if spec.kind == "story" and "max_iters" not in params and "max_time" not in params:
        raise UserError("say how long to train: max steps or max time")
    return JobSpec(spec.kind, [str(d) for d in spec.data], str(spec.out), params)


def command(spec):
    """The trainer's command line as a list (what Popen runs)."""
    spec = check_spec(spec)
    cmd = [sys.executable, str(SCRIPTS[spec.kind]), "--data", *spec.data, "--out", spec.out]
    for name, value in spec.params.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    if spec.kind == "story":
        cmd.append("--no-progress")  # the log file gets one line per eval, not a progress bar
    return cmd


def command_line(spec):
    """The same command as a user would type it in the repository folder."""
    cmd = command(spec)
    cmd[0] = "python"
    cmd[1] = str(Path(cmd[1]).relative_to(REPO))
    return shlex.join(cmd)


# ------------------------------------------------------------------------------- the manager

def pid_alive(pid, marker):
    """Is `pid` running, and is it our trainer (its command line mentions `marker`)?"""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # Linux: make sure the pid was not reused by another program
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie: finished, not yet reaped
            return False
        return marker in text
    return True


class JobManager:
    """Starts, watches and stops the one training job; its state lives in `state_file`."""

    def __init__(self, state_file):
        self.state_file = Path(state_file)
        self.lock = threading.Lock()
        self.process = None  # the Popen of a job this process started (None after a restart)

    # --- reading the state

    def read_state(self):
        if not self.state_file.is_file():
            return None
        try:
            return read_json(self.state_file)
        except (OSError, json.JSONDecodeError):
            return None

    def current(self):
        """The latest job (running or finished) as a dict, its status brought up to date; or None."""
        with self.lock:
            return self._refresh()

    def _refresh(self):
        job = self.read_state()
        if job is None or job["status"] not in RUNNING:
            return job
        if self._running(job):
            return job
        job.update(self._outcome(job))
        write_json(self.state_file, job)
        return job

    def _running(self, job):
        if self.process is not None and self.process.pid == job["pid"]:
            return self.process.poll() is None
        return pid_alive(job["pid"], job["out"])

    def _outcome(self, job):
        """How a job that is no longer running ended: finished, stopped or failed (with why)."""
        code = self.process.returncode if self.process is not None and self.process.pid == job["pid"] else None
        summary_file = Path(job["out"]) / "summary.json"
        summary = read_json(summary_file) if summary_file.is_file() else None
        ended = {"ended_at": time.time(), "returncode": code}
        if summary is not None and code in (0, None):
            stopped = summary.get("stopped_by") in ("signal", "SIGINT", "SIGTERM")
            return ended | {"status": "stopped" if stopped else "finished", "summary": summary}
        if job["status"] == "stopping":
            return ended | {"status": "stopped", "error": "stopped before anything was saved"}
        return ended | {"status": "failed", "error": error_from_log(job["log"]) or f"exit code {code}"}

    # --- starting and stopping

    def start(self, spec):
        """Start a job; UserError if one is running or the output folder is taken."""
        cmd = command(spec)
        out = Path(spec.out)
        with self.lock:
            job = self._refresh()
            if job is not None and job["status"] in RUNNING:
                raise UserError(f"a training job is already running ({job['name']}, started "
                                f"{time.strftime('%H:%M:%S', time.localtime(job['started_at']))}); stop it first")
            if out.exists() and any(out.iterdir()):
                raise UserError(f"{out} already exists; pick another run name")
            out.mkdir(parents=True, exist_ok=True)
            log = out / "train.log"
            with open(log, "wb") as log_file:
                self.process = subprocess.Popen(
                    cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=os.environ | {"PYTHONUNBUFFERED": "1"},
                    start_new_session=True,  # Ctrl-C in the app's terminal does not reach the trainer
                )
            job = {"name": out.name, "kind": spec.kind, "out": str(out), "log": str(log), "pid": self.process.pid,
                   "command": command_line(spec), "spec": asdict(check_spec(spec)), "started_at": time.time(),
                   "status": "running"}
            write_json(self.state_file, job)
            return job

    def stop(self):
        """Ask the running job to save and exit (SIGINT, like Ctrl-C). Returns the job, or None.

        Only one signal per job: the trainers take a second Ctrl-C to mean "quit now, unsaved".
        """
        with self.lock:
            job = self._refresh()
            if job is None or job["status"] not in RUNNING:
                return None
            if job["status"] == "stopping":
                return job
            try:
                os.kill(job["pid"], signal.SIGINT)
            except ProcessLookupError:
                pass
            job.update(status="stopping", stop_requested_at=time.time())
            write_json(self.state_file, job)
            return job

    def wait(self, timeout):
        """Block until the job is no longer running (tests, scripts); returns the job."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.current()
            if job is None or job["status"] not in RUNNING:
                return job
            time.sleep(0.2)
        raise TimeoutError(f"the job is still running after {timeout} s")


def error_from_log(path, lines=5):
    """The trainer's own 'error: ...' line, else the last lines of its log."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return None
    errors = [line for line in text if line.startswith("error:")]
    return errors[-1] if errors else "\n".join(text[-lines:]) or None


def log_tail(job, lines=15):
    try:
        return "\n".join(Path(job["log"]).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------- progress

@dataclass
class Progress:
    step: int = 0
    total: int | None = None
    tokens_per_sec: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    losses: list = field(default_factory=list)  # {"step", "loss", "split": "train" | "val"}
    sample: str = ""


def progress(job):
    """What the run's metrics.jsonl says so far."""
    records = read_metrics(Path(job["out"]) / "metrics.jsonl")
    if not records:
        return Progress()
    last = records[-1]
    total = last.get("total_steps") or job["spec"]["params"].get("max_steps") or job["spec"]["params"].get("max_iters")
    step, elapsed = last.get("step", 0), last.get("elapsed_s")
    eta = None
    if total and step and elapsed:
        eta = max(0.0, (total - step) * elapsed / step)
    losses = [{"step": r["step"], "loss": r["train_loss"], "split": "train"} for r in records if "train_loss" in r]
    losses += [{"step": r["step"], "loss": r["val_loss"], "split": "val"}
               for r in records if r.get("val_loss") is not None]
    sample = next((r["sample"] for r in reversed(records) if r.get("sample")), "")
    return Progress(step, total, last.get("tokens_per_sec"), eta, elapsed, losses, sample)


# ------------------------------------------------------------------------------- LR finder

def lr_find(data, out, params, num_iters=100, timeout=600):
    """Run `python -m llmb lr-find` for a story model; returns (suggested lr, path of the plot)."""
    model_flags = {k: v for k, v in params.items()
                   if k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout")}
    spec = check_spec(JobSpec("story", data, out, model_flags | {"max_iters": 1}))
    num_iters = check_value("LR finder steps", (int, 10, 2000), num_iters)
    cmd = [sys.executable, "-m", "llmb", "lr-find", "--data", *spec.data, "--out", spec.out, "--no-progress",
           "--num-iters", str(num_iters)]
    for name, value in spec.params.items():
        if name != "max_iters":
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    try:
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"the LR finder took more than {timeout} s; try fewer steps or a smaller model") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        errors = [line for line in lines if line.startswith("error:")]
        raise UserError(errors[-1] if errors else f"the LR finder failed: {lines[-1]}")
    found = read_json(Path(out) / "lr_find.json")
    return found["suggested_lr"], Path(out) / "lr_find.png"


# ------------------------------------------------------------------------------- uploads

def save_upload(path, uploads_dir):
    """Copy an uploaded file into `uploads_dir` after checking it is usable training data.

    .txt: a plain-text book (no binary); .jsonl: chat rows the QLoRA trainer understands.
    Returns the saved path; UserError says what is wrong with the file.
    """
    import re
    import shutil

    from llmb.assistant.data import load_conversations
    from llmb.story.corpus import read_book

    src = Path(path)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", src.name).lstrip(".") or "upload"
    if src.suffix.lower() not in (".txt", ".jsonl"):
        raise UserError(f"{src.name}: upload .txt books or .jsonl chats")
    if src.suffix.lower() == ".txt":
        read_book(src)
    else:
        try:
            _, _, bad = load_conversations(str(src))
        except UnicodeDecodeError:
            raise UserError(f"{src.name} is not UTF-8 text") from None
        if bad:
            raise UserError(f"{src.name}: {len(bad)} bad rows, e.g. {bad[0].split(':', 1)[-1].strip()}")
    dest = Path(uploads_dir) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest
