"""The story model: a character-level GPT written from scratch, trained on a folder of books.

config (settings) -> corpus, tokenizer -> model -> train (lr_finder, checkpoint) -> sample; cli drives them.
"""
