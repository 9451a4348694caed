"""Fine-tune a causal LM (Phi-2 by default) with QLoRA on chat data (openassistant-guanaco by default).

    python training/train_qlora.py --out checkpoints/phi2-guanaco --max-steps 500
    python training/train_qlora.py --base checkpoints/smollm2-135m-instruct --quant none --device cpu --out ...
    accelerate launch training/train_qlora.py --out ...      # several GPUs

Ctrl-C saves the adapter and stops; --resume continues from the last checkpoint.
"""

import sys

from llmb.assistant.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(description=__doc__))
