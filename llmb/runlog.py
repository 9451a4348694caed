"""Run bookkeeping shared by both trainers: the one metrics log and the graceful stop.

The metrics log is JSON lines, one object per log step: the CLI prints it, the app plots it
and the benchmarks read it. A run whose steps are slow (the assistant on a CPU) also keeps
progress.json: what it is doing right now, rewritten at every step, so the app can show
"step 1/N" from the first step and which phase the run is in before that.

The graceful stop (StopSignal) saves within seconds of Ctrl-C or the app's Stop, however long a
step takes: the step in progress is dropped, and the run saves its last completed step.
"""

import json
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from llmb.fileio import atomic_path, write_json

# How a run ended, the same words for both trainers: it reached its step budget, its time
# budget, a signal (Ctrl-C, SIGTERM, the app's Stop) asked it to save and stop, or it failed.
STOPPED_BY = ("done", "time", "signal", "error")


class MetricsLog:
    """Append-only `metrics.jsonl`. Each record is flushed at once so a reader sees it live."""

    def __init__(self, path, truncate=False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w" if truncate else "a", encoding="utf-8")

    def log(self, **record):
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()


def read_metrics(path):
    """All complete records of a metrics log (a partly written last line is skipped)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


PROGRESS = "progress.json"
NEW_PROGRESS = ".progress.new.json"  # an --overwrite run's, until its first save replaces the old run


def write_progress(out, phase=None, file=PROGRESS, **figures):
    """progress.json in `out`: a phase before the first step ("loading the base model"), then the last
    step's figures (step, total, loss, tokens_per_sec, eta_s). Written atomically, read by the app."""
    write_json(Path(out) / file, {"phase": phase, **figures, "time": time.time()})


def write_stopping(out, step, saved_step, file=PROGRESS):
    """progress.json as soon as a trainer sees a stop signal, before its save: the app sees it answer, and waits
    for the save rather than kill it (llmb.app.jobs escalates only for a trainer that says nothing)."""
    what = f"saving step {step}" if step and saved_step != step else "ending"
    write_progress(out, f"stop requested: {what}", file=file)


def read_progress(out, since=0.0):
    """What the run's progress file says (the newer of the two), if written after `since` (a Unix time); else {}."""
    found = []
    for file in (PROGRESS, NEW_PROGRESS):
        try:
            found.append(json.loads((Path(out) / file).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    found = [p for p in found if isinstance(p, dict) and p.get("time", 0) >= since]
    return max(found, key=lambda p: p["time"]) if found else {}


def write_summary(out, *, data, steps, total_steps, train_loss, val_loss, elapsed_s, stopped_by, **extra):
    """summary.json, the one run summary both trainers write and the model card / app / benchmarks read.

    data: the data sources; steps: optimizer steps done; train_loss/val_loss: the last ones
    (nats per token); elapsed_s: training time; stopped_by: one of STOPPED_BY. `extra` holds
    what only one kind of run has (val_bpc for a story model, base and lora for an adapter); both
    trainers add saved_step, the step of the checkpoint left in `out` (None if none), whatever stopped them.
    """
    summary = make_summary(data=data, steps=steps, total_steps=total_steps, train_loss=train_loss,
                           val_loss=val_loss, elapsed_s=elapsed_s, stopped_by=stopped_by, **extra)
    write_json(Path(out) / "summary.json", summary)
    return summary


def make_summary(*, data, steps, total_steps, train_loss, val_loss, elapsed_s, stopped_by, **extra):
    """The dict write_summary writes (for a run that must leave the folder as it was)."""
    if stopped_by not in STOPPED_BY:
        raise ValueError(f"stopped_by must be one of {STOPPED_BY}, not {stopped_by!r}")
    return {"data": [str(d) for d in data], "steps": steps, "total_steps": total_steps,
            "final_train_loss": train_loss, "final_val_loss": val_loss, "elapsed_s": round(elapsed_s, 2),
            "stopped_by": stopped_by, **extra}


class StepAbandoned(BaseException):
    """A stop signal arrived inside `StopSignal.abandonable()`: the work there is dropped. A BaseException, as
    KeyboardInterrupt is, so that no library's `except Exception` swallows it on its way out."""


# the stop signal received, if any, and whether the work running now may be dropped (set by the handler below)
_requested = {"name": None, "abandon": False}


def _on_stop(signum, frame):
    _requested["name"] = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
    if _requested["abandon"]:
        _requested["abandon"] = False
        raise StepAbandoned(_requested["name"])


def listen_for_stop():
    """From now on SIGINT/SIGTERM ask the run to save and stop: call it first thing in a trainer.

    It replaces whatever the process inherited, SIG_IGN included: a server started with
    `nohup ... &` ignores SIGINT, and so would its trainer, losing the app's Stop.
    """
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(s, _on_stop)
        except ValueError:  # not the main thread (e.g. inside an app): no handler
            pass


class StopSignal:
    """Within `with StopSignal() as stop:`, a SIGINT/SIGTERM sets `stop.name` (e.g. "SIGINT"), and the run saves
    the state of its last completed optimizer step and exits, however long a step takes:

        with stop.abandonable(generator):   # batching, forward, backward, an evaluation: dropped on a stop
            loss = forward_backward(...)
        optimizer.step()                    # never interrupted: the loop looks at stop.name between steps

    A signal inside `abandonable()` raises StepAbandoned there at once; the trainer catches it and saves.
    Anywhere else (an optimizer or schedule step, a save) the signal only sets `stop.name`. A signal received
    earlier (after listen_for_stop) counts too, and `stop.name` still says what happened after the block
    ("" when nothing did). abandon=False: every step runs to its end (the processes of a DDP run must
    stop at the same step: they exchange gradients inside it).
    """

    def __init__(self, abandon=True):
        self.abandon = abandon

    def __enter__(self):
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self._after = None  # the name, kept once the block has ended
        listen_for_stop()
        return self

    @property
    def name(self):
        return _requested["name"] if self._after is None else self._after

    @contextmanager
    def abandonable(self, *generators):
        """Work that a stop signal drops: StepAbandoned is raised in it (or at once, if a stop came before).

        The work may have drawn random numbers (batches from `generators`, dropout from torch's global
        generator): on a stop they are put back as they were before it, so the state the trainer then saves
        is exactly that of its last completed step, and a --resume repeats the dropped step as it would have run.
        """
        if not self.abandon:
            yield
            return
        from llmb.stopping import random_states, set_random_states  # torch: only once a trainer runs

        before = random_states(generators)
        try:
            _requested["abandon"] = True
            if _requested["name"]:
                raise StepAbandoned(_requested["name"])
            yield
            _requested["abandon"] = False  # inside the try: a signal that comes just as the work ends drops it too
        except StepAbandoned:
            set_random_states(before, generators)
            raise
        finally:
            _requested["abandon"] = False

    def __exit__(self, *exc):
        self._after, _requested["name"] = _requested["name"] or "", None
        for s, h in self._old.items():
            try:
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            except ValueError:
                pass


def trim_metrics(path, step):
    """On resume, drop log lines written after the checkpoint we go back to."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
