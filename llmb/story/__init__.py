"""The story model: a character-level GPT written from scratch, trained on a folder of books.

config (settings) -> corpus, tokenizer -> batches -> model -> train (schedule, lr_finder, checkpoint)
-> sample (fast_decode); cli drives them.
"""
