"""Run bookkeeping shared by both trainers: the one metrics log, atomic writes, graceful stop.

The metrics log is JSON lines, one object per log step: the CLI prints it, the app plots it
and the benchmarks read it. Writes are atomic (temporary file + rename) wherever a
half-written file would hurt.
"""

import json
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj):
    """Write `obj` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


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


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits. A second Ctrl-C kills."""

    def __init__(self):
        self.name = None

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def __enter__(self):
        self._old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. inside an app): no handler
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def trim_metrics(path, step):
    """On resume, drop log lines written after the checkpoint we go back to."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
