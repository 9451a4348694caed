"""Shared bits of the benchmark scripts: where the repo and the shared data are."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLMB_SHARED_DATA", REPO.parent / "shared" / "data"))
