"""The README's "First things to try", run as written in a copy of a fresh clone with nothing beside it."""

import json
import os
import re
import shutil
import subprocess

import pytest

from llmb.runlog import read_metrics
from tests.conftest import REPO
from tests.test_data import commands, tracked_files


def fresh_clone(root):
    """The files a `git clone` gives, copied to `root`, with nothing else beside them."""
    for name in tracked_files():
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def section(markdown, title):
    """The text under a `## title` heading, up to the next heading of any level (a `#` line in a code block is a
    shell comment, not a heading)."""
    lines, fenced, inside = [], False, False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        heading = not fenced and re.match(r"#{1,6} ", line)
        if heading:
            inside = line == f"## {title}"
        elif inside:
            lines.append(line)
    return "\n".join(lines) + "\n"


def run(command, cwd, timeout=900):
    """A README command as a user's shell runs it (the assistant's training needs a few minutes)."""
    return subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"PYTHONPATH": ""}, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_every_command_of_first_things_to_try_runs_as_written(tmp_path):
    clone = fresh_clone(tmp_path / "llmb")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup = [c for c in commands(section(readme, "Set up")) if "get-small-assistant" in c]
    tries = commands(section(readme, "First things to try"))
    assert setup and len(tries) >= 6, "the README's set-up and first commands moved: update this test"
    outputs = []
    for command in setup + tries:
        done = run(command, clone)
        assert done.returncode == 0, f"`{command}` failed:\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, f"`{command}`:\n{done.stderr[-3000:]}"
        outputs.append((command, done.stdout))
    said = {command: out for command, out in outputs}
    story = next(out for command, out in said.items() if "sample --ckpt checkpoints/oz-story" in command)
    assert story.startswith("Dorothy looked at the Scarecrow and") and len(story) > 200
    france = next(out for command, out in said.items() if "capital of France" in command)
    assert "Paris" in france
    assert json.loads((clone / "checkpoints/my-oz/summary.json").read_text())["stopped_by"] in ("done", "time")
    mine = next(out for command, out in said.items() if "--ckpt checkpoints/my-oz" in command)
    assert mine.startswith("The Tin Woodman") and len(re.findall(r"[a-z]", mine)) > 100
    assert json.loads((clone / "checkpoints/smol-guanaco/summary.json").read_text())["stopped_by"] == "done"
    val = [r["val_loss"] for r in read_metrics(clone / "checkpoints/smol-guanaco/metrics.jsonl") if r.get("val_loss")]
    assert len(val) >= 2 and val[-1] < val[0], f"held-out loss did not go down: {val}"
    tips = next(out for command, out in said.items() if "--adapter checkpoints/smol-guanaco" in command)
    assert len(tips.split()) > 10, tips
