import torch

from llmb.story.model import GPT, GPTConfig, rotary_cos_sin


def tiny(block_size=16, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=23, block_size=block_size, n_layer=2, n_head=2, n_embd=16, **kw)
    return GPT(cfg).to(dtype).eval()


def test_shapes_and_loss():
    model = tiny(dtype=torch.float32)
    idx = torch.randint(0, 23, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 23)
    assert loss.shape == () and abs(loss.item() - torch.log(torch.tensor(23.0)).item()) < 0.5
    logits, loss = model(idx)
    assert loss is None


def test_future_tokens_do_not_change_past_logits():
    model = tiny()
    a = torch.randint(0, 23, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 23
    la, _ = model(a)
    lb, _ = model(b)
    assert torch.equal(la[0, :10], lb[0, :10])
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_kv_cache_matches_full_recompute_past_block_size():
    model = tiny(block_size=8)
    seq = torch.randint(0, 23, (1, 40))
    full, _ = model(seq)  # all 40 tokens at once: sliding-window attention past block_size
    cache = model.new_cache()
    logits, _ = model(seq[:, :11], cache=cache)  # a prompt longer than block_size
    cached = [logits[0]]
    for t in range(11, 40):
        logits, _ = model(seq[:, t:t + 1], cache=cache)
        cached.append(logits[0])
        assert len(cache) == 8  # the cache never holds more than block_size tokens
    torch.testing.assert_close(torch.cat(cached), full[0], rtol=1e-10, atol=1e-10)


def test_kv_cache_takes_chunks_of_several_tokens():
    model = tiny(block_size=8)
    seq = torch.randint(0, 23, (1, 41))
    full, _ = model(seq)
    cache = model.new_cache()
    chunks = [model(seq[:, i:i + 3], cache=cache)[0][0] for i in range(0, 39, 3)]  # wraps the ring many times
    chunks.append(model(seq[:, 39:], cache=cache)[0][0])
    torch.testing.assert_close(torch.cat(chunks), full[0], rtol=1e-10, atol=1e-10)


def test_rope_angles_are_exact_at_large_positions():
    cos, sin = rotary_cos_sin(200_000, 64, 10000.0, "cpu", torch.float32)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    angles = torch.arange(200_000, dtype=torch.float64)[:, None] * inv_freq
    assert torch.equal(cos, angles.cos().float()) and torch.equal(sin, angles.sin().float())
    float32_angles = torch.arange(200_000, dtype=torch.float32)[:, None] * inv_freq.float()
    assert (float32_angles.cos() - cos).abs().max() > 1e-3  # what computing them in float32 would cost


def test_training_after_sampling_past_the_rope_tables():
    model = tiny(block_size=8, dtype=torch.float32)
    with torch.inference_mode():  # as generate does: the tables grow inside inference mode
        cache = model.new_cache()
        for t in range(50):
            model(torch.tensor([[t % 23]]), cache=cache)
    model.train()
    idx = torch.randint(0, 23, (2, 8))
    model(idx, idx)[1].backward()
    assert model.wte.weight.grad is not None


def test_only_the_receptive_field_matters():
    model = tiny(block_size=8)  # 2 layers: the next token sees 2 * 7 + 1 = 15 tokens back
    assert model.receptive_field == 15
    seq = torch.randint(0, 23, (1, 30))
    changed = seq.clone()
    changed[0, :15] = (changed[0, :15] + 1) % 23  # everything but the last 15 tokens
    torch.testing.assert_close(model(seq)[0][0, -1], model(changed)[0][0, -1], rtol=1e-10, atol=1e-10)
    changed[0, 15] = (changed[0, 15] + 1) % 23
    assert not torch.allclose(model(seq)[0][0, -1], model(changed)[0][0, -1])


def test_weight_tying_and_decay_groups():
    model = tiny(dtype=torch.float32)
    assert model.lm_head.weight is model.wte.weight
    opt = model.configure_optimizer(1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()
