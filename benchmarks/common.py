"""Shared bits of the benchmark scripts: where the repo, the shared data and the peer (nanoGPT) are,
how to run a command and time it, and how to run two contenders in turn (A B A B).

Every benchmark that states a ratio runs its peer in the same run: this machine's speed moves
by 30% or more from hour to hour, so a figure measured on another day says nothing.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLMB_SHARED_DATA", REPO.parent / "shared" / "data"))
NANOGPT = REPO.parent / "shared" / "peers" / "nanoGPT"
TINYSHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"

# nanoGPT's CPU recipe for the Shakespeare character model (its README; ../shared/peers/README.md)
NANOGPT_CPU_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                      "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                      "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
# the same model and batch through our trainer (its other settings stay at their defaults)
OUR_CPU_CONFIG = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64", "--batch-size", "12",
                  "--dropout", "0"]


def peer_parser(doc, rounds):
    """A benchmark's command line: the peer, the data, --threads, --rounds; add more, then call parse."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=rounds, help="runs of each contender, alternating")
    parser.add_argument("--nanogpt", default=str(NANOGPT), metavar="DIR",
                        help="a nanoGPT checkout (default: the unmodified copy in ../shared/peers/nanoGPT)")
    parser.add_argument("--data", default=str(TINYSHAKESPEARE), help="the text both models train on")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every contender (default: torch's own choice, one per core); "
                             "1 gives steadier figures on a machine shared with other jobs")
    return parser


def parse(parser):
    """Parse the command line; every contender then runs with the same thread count (children inherit it)."""
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    return args


def run(cmd, cwd, **kw):
    """Run cmd (a list) in cwd, stopping on failure; return (seconds, stdout)."""
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, **kw)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(map(str, cmd))}\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return seconds, result.stdout


def train_char(data, out, *flags):
    """Our trainer as a user runs it; returns its wall time in seconds (process start to exit)."""
    seconds, _ = run([sys.executable, "training/train_char.py", "--data", data, "--out", out, "--no-progress", *flags],
                     cwd=REPO)
    return seconds


@contextmanager
def nanogpt_workdir(nanogpt, data):
    """A scratch copy of nanoGPT with `data` as its Shakespeare input, prepared (train.bin, val.bin, meta.pkl)."""
    if not (Path(nanogpt) / "train.py").is_file():
        sys.exit(f"no nanoGPT checkout at {nanogpt} (give one with --nanogpt DIR)")
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as tmp:
        work = Path(tmp) / "nanoGPT"
        shutil.copytree(nanogpt, work, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "*.pkl"))
        shutil.copyfile(data, work / "data" / "shakespeare_char" / "input.txt")
        run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=work)
        yield work


def nanogpt_train(work, *flags):
    """nanoGPT's train.py with the given flags; returns (wall seconds, stdout)."""
    return run([sys.executable, "train.py", *flags], cwd=work)


def alternate(contenders, rounds):
    """Run each (name, fn) in turn, `rounds` times (A B A B ...); return {name: [fn() results]}."""
    results = {name: [] for name, _ in contenders}
    for r in range(rounds):
        for name, fn in contenders:
            results[name].append(fn())
            print(f"  round {r + 1}: {name}: {results[name][-1]}", flush=True)
    return results


def median(values):
    return statistics.median(values)
