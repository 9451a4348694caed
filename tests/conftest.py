import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real data lives beside the checkout (../shared/data), never in the repo.
SHARED_DATA = Path(os.environ.get("LLMB_SHARED_DATA", REPO.parent / "shared" / "data"))

# Nothing in the tests may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set LLMB_SHARED_DATA")
    return SHARED_DATA
