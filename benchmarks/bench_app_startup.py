"""How long `python app.py` takes to answer HTTP (models load lazily, on first use). Target: <= 8 s.

    python benchmarks/bench_app_startup.py [--runs 3]
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from common import REPO

p = argparse.ArgumentParser()
p.add_argument("--runs", type=int, default=3)
args = p.parse_args()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup_seconds():
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < 120:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.1)
        raise SystemExit("app.py did not answer within 120 s")
    finally:
        proc.terminate()
        proc.wait(20)


times = [startup_seconds() for _ in range(args.runs)]
print(f"app answers HTTP after {statistics.median(times):.1f} s (median of {args.runs}: "
      f"{', '.join(f'{t:.1f}' for t in times)}; target <= 8 s)")
