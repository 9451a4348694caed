"""Train the character-level story model on a folder of books: the same as `llmb train-story`.

    python training/train_char.py --data data/books/oz --out checkpoints/my-story --max-time 600
    python training/train_char.py --help
"""

import sys

from llmb.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["train-story", *sys.argv[1:]]))
