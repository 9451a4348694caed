"""From corpus to batches: the encoded train and val splits, random training batches, and the fixed
windows the validation loss is measured on (in nats per token, and in bits per character)."""

import math
from dataclasses import dataclass

import torch

from llmb.errors import UserError
from llmb.story.corpus import load_corpus
from llmb.story.tokenizer import build_tokenizer

LN2 = math.log(2)


@dataclass
class Data:
    tokenizer: object
    train: torch.Tensor
    val: torch.Tensor
    val_chars: int  # characters of the val split the tokens stand for (unencodable ones left out)
    unknown_chars: int  # characters of the val split the tokenizer cannot encode
    report: str
    train_unknown: int = 0  # training characters a saved tokenizer cannot encode (the text changed)

    @property
    def val_chars_per_token(self):  # to turn nats/token into bits/character
        return self.val_chars / len(self.val)


def prepare_data(cfg, tokenizer=None):
    """Read the corpus, build (or reuse) the tokenizer, encode the train and val splits.

    A trained subword vocabulary sees the training split only; the character vocabulary is every
    character of the corpus (so every val character counts in bits per character).
    """
    corpus = load_corpus(cfg.data)
    train_text, val_text = corpus.split(cfg.val_fraction)
    train_unknown = 0
    if tokenizer is None:
        text = train_text + val_text if cfg.tokenizer == "char" else train_text
        tokenizer = build_tokenizer(cfg.tokenizer, text, cfg.vocab_size)
    else:
        train_unknown = tokenizer.count_unknown(train_text)
    train = torch.tensor(tokenizer.encode(train_text, drop_unknown=True), dtype=torch.long)
    val = torch.tensor(tokenizer.encode(val_text, drop_unknown=True), dtype=torch.long)
    for name, ids in (("training", train), ("validation", val)):
        if len(ids) <= cfg.block_size:
            raise UserError(
                f"the {name} split has {len(ids)} tokens, fewer than one block ({cfg.block_size} + 1); "
                "give more text or a smaller --block-size"
            )
    unknown = tokenizer.count_unknown(val_text)
    report = corpus.report() + (f"\n  tokens: {len(train):,} train, {len(val):,} val "
                                f"({tokenizer.kind}, vocab {tokenizer.vocab_size})")
    for warning in corpus.warnings + data_warnings(tokenizer.lossless, unknown, len(val_text)):
        report += f"\n  warning: {warning}"
    return Data(tokenizer, train, val, len(val_text) - unknown, unknown, report, train_unknown)


def data_warnings(lossless, unknown, val_chars):
    """What makes bits per character partial (unencodable characters) or not comparable (a lossy tokenizer)."""
    notes = []
    if unknown:
        notes.append(f"{unknown:,} of {val_chars:,} validation characters cannot be encoded; "
                     "bits per character leave them out")
    if not lossless:
        notes.append("this tokenizer is lossy (it drops whitespace): its bits per character are not "
                     "comparable with a character or bpe model's")
    return notes


def get_batch(data, block_size, batch_size, generator, device):
    """batch_size random windows of block_size tokens, and the same shifted by one (the targets)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, data, block_size, batch_size, max_batches=None):
    """Mean loss (nats/token) over non-overlapping windows spread evenly across `data`.

    Deterministic: the same windows every call. With max_batches, only that many batches of
    windows are used, still spread over the whole split (so every book is covered).
    """
    n_windows = (len(data) - 1) // block_size
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    starts = torch.linspace(0, len(data) - 1 - block_size, n_windows).long()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        s = starts[i:i + batch_size]
        x = torch.stack([data[j:j + block_size] for j in s]).to(device)
        y = torch.stack([data[j + 1:j + 1 + block_size] for j in s]).to(device)
        _, loss = model(x, y)
        total += loss.item() * len(s)
        count += len(s)
    model.train(was_training)
    return total / count


def bits_per_char(loss, chars_per_token):
    return loss / chars_per_token / LN2


def bpc_label(tokenizer):
    return "bpc" if tokenizer.lossless else "bpc (lossy tokenizer)"
