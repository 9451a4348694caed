"""Train the character-level story model on a folder of books.

    python training/train_char.py --data path/to/books --out checkpoints/my-story --max-time 600

Ctrl-C saves and exits; --resume continues (same flags; only how long and how often may change);
--overwrite replaces a run already in --out. Several processes: accelerate launch training/train_char.py ...
"""

import sys

from llmb.story.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(description=__doc__))
