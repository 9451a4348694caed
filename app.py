"""llmb in a browser: continue a story, chat with the assistant, train your own models.

    python app.py                    # then open http://127.0.0.1:7860
    python app.py --help             # flags; each has an environment variable (for Spaces)

This file is only the entry point. The page is llmb/app/page.py, one module per tab
(story_tab, chat_tab, train_tab, sharing llmb/app/common.py); the models load lazily (llmb/app/models.py), training runs
in a subprocess (llmb/app/jobs.py), and llmb/app/config.py holds the flags and folders.
"""

import os
import sys

from llmb.app import config as app_config

for _key, _value in app_config.environment().items():  # before gradio: no analytics; HF cache on /data
    os.environ.setdefault(_key, _value)

from llmb.app.page import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
