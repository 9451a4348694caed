"""llmb: LLM basics. A from-scratch character GPT, a QLoRA-tuned Phi-2 assistant, and an app."""

__version__ = "0.1.0"
