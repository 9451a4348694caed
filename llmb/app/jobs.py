"""Training jobs for the app: one at a time, in a subprocess, remembered on disk.

    order = job_order("story", {"data": ["books/oz"], "out": "checkpoints/my-story", "max_iters": 2000})
    manager = JobManager(state_file="runs/app/job.json")
    job = manager.start(order)
    manager.current()      # the job as the state file says, with its live status
    progress(job)          # step, total, tokens/s, ETA, losses, latest sample (from metrics.jsonl)
    manager.stop()         # SIGINT: the trainer drops its step, saves the last one and exits; again: SIGTERM, SIGKILL

A job runs the same command a user would type (`python -m llmb train-story`, `... train-assistant`,
`... lr-find`, `... export-gguf`), built from its config dataclass by `llmb.settings.to_argv`;
`command_line(order)` shows it. The state file is written before the trainer starts, and is what
lets a page reload, a second browser or a restarted app re-attach to a job that is still running.
The LR finder and the GGUF export are jobs too, so they cannot run beside a training run and Stop stops them.
"""

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmb.assistant.config import ExportConfig
from llmb.assistant.config import TrainConfig as QLoRAConfig
from llmb.errors import UserError
from llmb.fileio import read_json, write_json
from llmb.folders import saved_step
from llmb.runlog import read_metrics, read_progress
from llmb.settings import check_number, from_values, to_argv
from llmb.story.config import LR_FIND_SETTINGS
from llmb.story.config import TrainConfig as StoryConfig

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = {kind: ["-m", "llmb", name] for kind, name in
            {"story": "train-story", "qlora": "train-assistant", "lr-find": "lr-find", "export-gguf": "export-gguf"}.items()}
CONFIGS = {"story": StoryConfig, "qlora": QLoRAConfig, "lr-find": StoryConfig, "export-gguf": ExportConfig}
RUNNING = ("starting", "running", "stopping")
GRACE_S = 30.0  # after Stop: SIGINT; SIGTERM once the trainer has said nothing for GRACE_S, SIGKILL for 2 x GRACE_S


@dataclass
class JobOrder:
    """What to run: a job of `kind` with its checked settings (the job itself is the dict JobManager keeps)."""

    kind: str  # "story", "qlora", "lr-find" or "export-gguf"
    config: object  # the trainer's checked TrainConfig
    num_iters: int = 100  # lr-find only: batches in the sweep


def job_order(kind, values, num_iters=100):
    """A checked JobOrder from {setting name: value} (form values or API values).

    The config class checks every value (its field's range, then its own `check()`); a story
    run must also say how long to train.
    """
    if kind not in CONFIGS:
        raise UserError(f"unknown job type {kind!r}; use story or qlora")
    if kind != "export-gguf" and not values.get("data"):
        raise UserError("pick or upload training data first")
    if kind == "lr-find":
        values = {k: v for k, v in values.items() if k in LR_FIND_SETTINGS}
    config = from_values(CONFIGS[kind], values | {"progress": False} if kind in ("story", "lr-find") else values,
                         labels=True)
    if kind == "story":
        config.check_length()
    num_iters = check_number("LR finder steps", num_iters, 10, 2000, int) if kind == "lr-find" else num_iters
    return JobOrder(kind, config, num_iters)


def command(order):
    """The job's command line as a list (what Popen runs)."""
    skip = [f for f in asdict(order.config) if f not in LR_FIND_SETTINGS] if order.kind == "lr-find" else ()
    cmd = [sys.executable, *PROGRAMS[order.kind], *to_argv(order.config, skip=skip)]
    return cmd + (["--num-iters", str(order.num_iters)] if order.kind == "lr-find" else [])


def command_line(order):
    """The same command as a user would type it (in the repository folder, or anywhere llmb is installed)."""
    return shlex.join(["python", *command(order)[1:]])


def child_environment():
    """The trainer's environment: unbuffered logs, and this llmb on the path (a Space does not pip-install it,
    and `python app.py` may be started from another folder)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


# ------------------------------------------------------------------------------- the manager

def pid_alive(pid, marker):
    """Is `pid` running, and is it our trainer (its command line mentions `marker`)?"""
    if not pid:
        return False
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


def send(pid, sig):
    """Signal the job's whole process group (the trainer and anything it started)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def disk_error(e, what):
    return UserError(f"could not write {what} ({e.strerror or e}); nothing was started. Free some disk space")


def read_owners(owners_file):
    """{folder: owner} of the folders jobs wrote (JobManager's `owners_file`); {} when there is none."""
    try:
        owners = read_json(owners_file)
    except (OSError, ValueError):
        return {}
    return owners if isinstance(owners, dict) else {}


class JobManager:
    """Starts, watches and stops the one job (training or LR finder); its state lives in `state_file`, and who
    started each job's folder in `owners_file` (when given)."""

    def __init__(self, state_file, owners_file=None):
        self.state_file = Path(state_file)
        self.owners_file = Path(owners_file) if owners_file else None
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
            if job["status"] == "stopping":
                self._escalate(job)
            return job
        job.update(self._outcome(job))
        self._write(job)
        return job

    def _write(self, job):
        try:
            write_json(self.state_file, job)
        except OSError:  # a full disk: the page still shows the state held in memory
            pass

    def _running(self, job):
        if self.process is not None and self.process.pid == job["pid"]:
            return self.process.poll() is None
        return pid_alive(job["pid"], job["out"])

    def _outcome(self, job):
        """How a job that is no longer running ended: finished, stopped or failed (with why)."""
        ours = self.process is not None and self.process.pid == job["pid"]
        code = self.process.returncode if ours else None
        summary = result(job)
        ended = {"ended_at": time.time(), "returncode": code}
        if summary is not None and code in (0, None):
            stopped = summary.get("stopped_by") == "signal"
            return ended | {"status": "stopped" if stopped else "finished", "summary": summary}
        why = exit_reason(job["log"], code)
        if job["status"] == "stopping":
            return ended | {"status": "stopped", "error": stopped_unsaved(job, why)}
        if job["kind"] in ("story", "qlora") and saved_step(job["out"]) is not None:  # killed: say what is kept
            return ended | {"status": "failed", "error": stopped_unsaved(job, why)}
        return ended | {"status": "failed", "error": why}

    def _escalate(self, job):
        """A trainer that has said nothing for GRACE_S since Stop gets SIGTERM, then (2 x GRACE_S) SIGKILL.

        The trainers answer a stop at once in progress.json ("stop requested: saving step N"), whatever their
        step's length, so a trainer that answered is saving: the wait counts from its last word.
        """
        asked = job["stop_requested_at"]
        silent = time.time() - read_progress(job["out"], since=asked).get("time", asked)
        sent = job.setdefault("signals", ["SIGINT"])
        for sig, after in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 2 * GRACE_S)):
            if silent >= after and sig.name not in sent:
                send(job["pid"], sig)
                sent.append(sig.name)
                self._write(job)

    # --- starting and stopping

    def start(self, order, owner=None):
        """Start a job; UserError if one is running or the output folder is taken. `owner`: who started it
        (kept in the state file and the owners file, never shown).

        The state and the owner are written first: if that fails (a full disk), nothing is started.
        """
        cmd, out = command(order), job_folder(order)
        with self.lock:
            job = self._refresh()
            if job is not None and job["status"] in RUNNING:
                raise UserError(busy_message(job, owner))
            if out.exists() and any(out.iterdir()):
                raise UserError(f"{out.name} already exists; pick another run name")
            job = {"name": out.name, "kind": order.kind, "out": str(out), "log": str(out / "train.log"), "pid": None,
                   "command": command_line(order), "config": asdict(order.config), "started_at": time.time(),
                   "status": "starting", "owner": owner}
            try:
                out.mkdir(parents=True, exist_ok=True)
                self._record_owner(out, owner)
                write_json(self.state_file, job)
                log_file = open(job["log"], "wb")
            except OSError as e:
                raise disk_error(e, "the job state") from None
            with log_file:
                self.process = subprocess.Popen(
                    cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=child_environment(),
                    start_new_session=True,  # Ctrl-C in the app's terminal does not reach the trainer
                )
            job.update(pid=self.process.pid, status="running")
            self._write(job)
            return job

    def _record_owner(self, folder, owner):
        if self.owners_file is not None and owner is not None:
            write_json(self.owners_file, read_owners(self.owners_file) | {str(Path(folder).resolve()): owner})

    def stop(self):
        """Ask the running job to save and exit. Returns the job, or None if none is running.

        First Stop: SIGINT (the trainers drop the step in progress, save the last one and exit, like Ctrl-C). Each
        further Stop moves on at once: SIGTERM, then SIGKILL; without one, the same happens to a trainer that says
        nothing for GRACE_S (see _escalate).
        """
        with self.lock:
            job = self._refresh()
            if job is None or job["status"] not in RUNNING or not job["pid"]:
                return None
            if job["status"] != "stopping":
                send(job["pid"], signal.SIGINT)
                job.update(status="stopping", stop_requested_at=time.time(), signals=["SIGINT"])
            else:
                sig = signal.SIGTERM if "SIGTERM" not in job["signals"] else signal.SIGKILL
                send(job["pid"], sig)
                job["signals"].append(sig.name)
            self._write(job)
            return job

    def wait(self, timeout):
        """Block until the job is no longer running (tests, the LR finder); returns the job."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.current()
            if job is None or job["status"] not in RUNNING:
                return job
            time.sleep(0.2)
        raise TimeoutError(f"the job is still running after {timeout} s")


def busy_message(job, owner):
    """Why a job cannot start while `job` runs; its name only to the one who started it (`owner`)."""
    what = "the LR finder" if job["kind"] == "lr-find" else "a training job"
    if job.get("owner") == owner:
        started = time.strftime("%H:%M:%S", time.localtime(job["started_at"]))
        return f"{what} is already running ({job['name']}, started {started}); stop it first"
    return f"{what} started in another browser is running; one job runs at a time: try again when it ends"


def job_folder(order):
    """The job's own folder (its log, and what it writes): a trainer's --out, an export's file's folder."""
    out = Path(order.config.out)
    return out.parent if order.kind == "export-gguf" else out


def result(job):
    """What a job that ended well left: its summary.json (lr_find.json), or the exported file's name and size."""
    if job["kind"] == "export-gguf":
        file = Path(job["config"]["out"])
        return {"file": file.name, "bytes": file.stat().st_size} if file.is_file() else None
    summary_file = Path(job["out"]) / ("lr_find.json" if job["kind"] == "lr-find" else "summary.json")
    try:
        return read_json(summary_file) if summary_file.is_file() else None
    except (OSError, ValueError):
        return None


def stopped_unsaved(job, why):
    """What a run stopped before its final save left on disk: its last checkpoint (resumable), or nothing."""
    records = read_metrics(Path(job["out"]) / "metrics.jsonl")
    reached = f"stopped at step {records[-1].get('step', 0)}" if records else "stopped"
    saved = saved_step(job["out"])
    if saved is None:
        return f"{reached} before anything was saved ({why})"
    return f"{reached} ({why}); the checkpoint of step {saved} is kept: run the command above with --resume to go on"


def exit_reason(log, returncode):
    """Why a job ended without its result: the trainer's own error line, the signal, or the exception.

    Never raw traceback lines or file paths.
    """
    if returncode is not None and returncode < 0:
        return f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
    try:
        lines = Path(log).read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        lines = []
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if errors:  # the last error, with the indented lines that go on with it (the bad row it names)
        more = itertools.takewhile(lambda line: line.startswith((" ", "\t")), lines[errors[-1] + 1:errors[-1] + 4])
        return " ".join([lines[errors[-1]].removeprefix("error:").strip(), *(line.strip()[:300] for line in more)])
    exception = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line)]
    if exception:
        return f"the trainer crashed: {exception[-1][:300]} (the log has the details)"
    if returncode is None:
        return "the trainer ended without saving a summary (the log has the details)"
    return f"the trainer exited with code {returncode} (the log has the details)"


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
    loss: float | None = None  # the last step's train loss
    phase: str = ""  # what the run does before its first step (and what it will cost), or after a Stop


def progress(job):
    """What the run's metrics.jsonl says so far, and its progress.json where that is newer (every step)."""
    records = read_metrics(Path(job["out"]) / "metrics.jsonl")
    now = read_progress(job["out"], since=job.get("started_at", 0))
    if not records:
        return step_progress(Progress(), now)
    last, config = records[-1], job.get("config", {})
    total = last.get("total_steps") or config.get("max_steps") or config.get("max_iters")
    step, elapsed = last.get("step", 0), last.get("elapsed_s")
    eta = None
    if total and step and elapsed:
        eta = max(0.0, (total - step) * elapsed / step)
    # the QLoRA trainer's step-0 record has only the base model's val_loss
    losses = [{"step": r["step"], "loss": r["train_loss"], "split": "train"}
              for r in records if r.get("train_loss") is not None]
    losses += [{"step": r["step"], "loss": r["val_loss"], "split": "val"}
               for r in records if r.get("val_loss") is not None]
    sample = next((r["sample"] for r in reversed(records) if r.get("sample")), "")
    return step_progress(Progress(step, total, last.get("tokens_per_sec"), eta, elapsed, losses, sample), now)


def step_progress(p, now):
    """`p` brought up to date by progress.json's figures `now`, if they are of a later step (or a phase)."""
    if now.get("step", 0) > p.step:
        p.step, p.total, p.loss = now["step"], now.get("total") or p.total, now.get("loss")
        p.tokens_per_sec, p.eta_s, p.elapsed_s = now.get("tokens_per_sec"), now.get("eta_s"), now.get("elapsed_s")
    elif now.get("phase"):
        p.phase = now["phase"]
        if not p.step:  # the trainer's estimate of the whole run, before its first step
            p.eta_s = now.get("eta_s")
    return p
