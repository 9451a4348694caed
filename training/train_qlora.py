"""Fine-tune the assistant with LoRA (QLoRA on a GPU) on chat data: the same as `llmb train-assistant`.

    python training/train_qlora.py --out checkpoints/phi2-guanaco --max-steps 500
    python training/train_qlora.py --help
"""

import sys

from llmb.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["train-assistant", *sys.argv[1:]]))
