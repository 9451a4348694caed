"""`python app.py` to HTTP 200, beside a bare Gradio Blocks page with three tabs, in the same run.

    python benchmarks/bench_app_startup.py [--runs 5]

The two are started alternately (app, bare, app, bare, ...), each as a fresh process, and timed
from the start of the process to the first HTTP 200 on "/". The bare page is the peer: the
least any Gradio page with three tabs takes on this machine at this moment. The app loads no
model before the first request that needs one, so the ratio is the cost of its own page.
Goal: app / bare <= 1.3.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import REPO

BARE_PAGE = """
import sys
import gradio as gr

with gr.Blocks(title="bare") as demo:
    with gr.Tabs():
        for name in ("one", "two", "three"):
            with gr.Tab(name):
                gr.Textbox(label=name)
                gr.Button(name)
demo.queue().launch(server_name="127.0.0.1", server_port=int(sys.argv[1]))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds_to_http(command, env):
    """Start `command` (its last argument is the port) and time it until "/" answers 200."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([*command, str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < 120:
            if proc.poll() is not None:
                raise SystemExit(f"{command} exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"{command} did not answer within 120 s")
    finally:
        proc.terminate()
        proc.wait(20)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="starts of each (alternating)")
    args = p.parse_args()
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        bare = os.path.join(tmp, "bare_page.py")
        with open(bare, "w") as f:
            f.write(BARE_PAGE)
        commands = {"app": [sys.executable, "app.py", "--work-dir", os.path.join(tmp, "work"), "--port"],
                    "bare": [sys.executable, bare]}
        times = {"app": [], "bare": []}
        for _ in range(args.runs):
            for name, command in commands.items():  # A B A B: both see the same machine
                times[name].append(seconds_to_http(command, env))
    app, bare = statistics.median(times["app"]), statistics.median(times["bare"])
    for name, ts in times.items():
        print(f"{name:>4}: median {statistics.median(ts):.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})")
    print(f"python app.py to HTTP 200: {app:.2f} s; bare Gradio Blocks with three tabs: {bare:.2f} s; "
          f"ratio {app / bare:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
