"""The assistant: a causal LM (Phi-2 by default) fine-tuned with QLoRA on chat data.

config (settings) -> data -> loading -> train -> merge; engine chats with the result; cli drives them.
"""
