"""The one sampling function: CLI, app, tests and benchmarks all call `generate`."""

import torch

from llmb.settings import check
from llmb.story.config import StorySampling
from llmb.story.fast_decode import decode_next, decoder_for


def filter_logits(logits, top_k=None, top_p=None):
    """Keep the top_k most likely tokens and the smallest set whose probability reaches top_p."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits, temperature, top_k, top_p, generator):
    if temperature <= 0:  # greedy
        return int(logits.argmax())
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_ids(model, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                 use_cache=True, should_stop=None):
    """Yield new token ids one at a time after the prompt `ids` (a list of ints).

    With use_cache the model sees each token once (a KV cache sliding past block_size); without
    it every step recomputes all the text from scratch. Both give the same logits. Only the last
    `model.receptive_field` tokens can influence the next one, so that is all either path reads.
    `should_stop()` is checked before every token, so a Stop button takes effect at once.
    """
    if not ids:
        raise ValueError("the prompt must contain at least one token")
    check(StorySampling(max_new_tokens, temperature, top_k, top_p, seed))
    model.eval()
    device = next(model.parameters()).device
    context = model.receptive_field
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    ids = list(ids)
    cache = model.new_cache() if use_cache else None
    decoder = decoder_for(model) if use_cache else None
    for step in range(max_new_tokens):
        if should_stop is not None and should_stop():
            return
        if use_cache and step > 0:  # one new token: the compiled decoder
            logits = decode_next(model, ids[-1], cache, decoder)
        else:  # the prompt, or all the text again without a cache
            logits = model(torch.tensor([ids[-context:]], device=device), cache=cache)[0][0, -1]
        token = next_token(logits.float().cpu(), temperature, top_k, top_p, generator)
        ids.append(token)
        yield token


def generate(model, tokenizer, prompt, max_new_tokens=StorySampling.max_new_tokens,
             temperature=StorySampling.temperature, top_k=None, top_p=None, seed=None, use_cache=True,
             should_stop=None):
    """Stream the continuation of `prompt` as text pieces.

    Characters the tokenizer cannot encode are dropped; `tokenizer.unknown(prompt)` tells
    which, so callers can say so. An empty prompt starts from a newline.
    """
    ids = tokenizer.encode(prompt, drop_unknown=True) or tokenizer.encode("\n", drop_unknown=True)
    if not ids:
        ids = [0]
    new = []
    text_so_far = ""
    for token in generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, use_cache, should_stop):
        new.append(token)
        # decode all of this line so far: subword decoders merge pieces ("##ing")
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # a character split across byte-level tokens: wait for its other bytes
            continue
        if text.startswith(text_so_far):
            piece, text_so_far = text[len(text_so_far):], text
            if piece:
                yield piece
        else:  # the decoder re-spaced earlier text; give the new tail only
            text_so_far = text
        if text_so_far.endswith("\n"):  # start afresh at each new line: decoding costs a line, not all the text
            new, text_so_far = [], ""
    text = tokenizer.decode(new) if new else ""
    if text.startswith(text_so_far) and len(text) > len(text_so_far):  # the end came mid-character
        yield text[len(text_so_far):]
