from llmb.story.batches import prepare_data
from llmb.story.config import TrainConfig


def test_a_trained_subword_vocabulary_sees_the_training_split_only(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("The quick brown fox jumps over the lazy dog.\n" * 400 + "\u2603 snowman \u2603\n" * 40)
    cfg = TrainConfig(data=[str(book)], val_fraction=0.1, block_size=16)
    assert prepare_data(cfg).unknown_chars == 0  # characters: the vocabulary is the whole corpus
    cfg.tokenizer, cfg.vocab_size = "wordpiece", 100
    wordpiece = prepare_data(cfg)
    assert wordpiece.unknown_chars == 80  # the snowmen are only in the validation split
    assert "\u2603" not in wordpiece.tokenizer.tok.get_vocab()
