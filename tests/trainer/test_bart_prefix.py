"""The reference BART prefix forward (trainer/bart_prefix.py) against independent facts: plain HF BART, HF BART
with the prefix as its self-attention cache, prefixes that attention cannot see, a hand-computed attention, and the
position embeddings each convention must add."""
from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, DynamicCache, EncoderDecoderCache

from trainer.bart_prefix import apply_prefixes, greedy_generate, prefix_logits

VOCAB = 96


def tiny_bart(seed: int = 0, **over) -> BartForConditionalGeneration:
    """A tiny random BART (3 encoder layers with 4 heads, 2 decoder layers with 2 heads), forced BOS = 0."""
    d = dict(vocab_size=VOCAB, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
             init_std=0.2)
    d.update(over)
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(BartConfig(**d)).eval().requires_grad_(False)
    model.generation_config.forced_bos_token_id = 0
    model.generation_config.forced_eos_token_id = None  # the reference does not force EOS at the length limit
    return model


def random_prefixes(model, p_enc: int = 4, p: int = 3, p_cross: int = 2, scale: float = 1.0, seed: int = 1):
    """Random tensors in the v2 artifact layout for this model."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    enc_hd, dec_hd = c.d_model // c.encoder_attention_heads, c.d_model // c.decoder_attention_heads
    return {
        "encoder_kv": torch.randn(c.encoder_layers, 2, c.encoder_attention_heads, p_enc, enc_hd, generator=g) * scale,
        "kv": torch.randn(c.decoder_layers, 2, c.decoder_attention_heads, p, dec_hd, generator=g) * scale,
        "cross_kv": torch.randn(c.decoder_layers, 2, c.decoder_attention_heads, p_cross, dec_hd, generator=g) * scale,
    }


def batch(seed: int = 2):
    """Encoder ids [2, 7] (row 1 right-padded to 4 tokens) and decoder ids [2, 5]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = 1, 0
    dec = torch.cat([torch.full((2, 1), 2), torch.randint(3, VOCAB, (2, 4), generator=g)], dim=1)
    return ids, mask, dec


def test_no_prefix_equals_plain_hf_logits_and_generate():
    model = tiny_bart()
    ids, mask, dec = batch()
    want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(prefix_logits(model, ids, mask, dec, {}), want, rtol=0, atol=1e-5)
    for row in range(2):
        src = ids[row, :int(mask[row].sum())]
        hf = model.generate(src[None], max_new_tokens=12, do_sample=False, num_beams=1)[0, 1:].tolist()
        assert hf[0] == 0  # forced BOS
        assert greedy_generate(model, src.tolist(), None, max_new_tokens=12) == hf
    assert model.config._attn_implementation == "sdpa"  # restored after each context


def _hf_prefix_cache(model, kv: torch.Tensor, b: int) -> EncoderDecoderCache:
    """PEFT's mechanism: the decoder prefix [layers, 2, heads, P, hd] as the self-attention cache of every row."""
    self_cache = DynamicCache(config=model.config)
    for i in range(kv.shape[0]):
        self_cache.update(kv[i, 0].expand(b, -1, -1, -1), kv[i, 1].expand(b, -1, -1, -1), i)
    return EncoderDecoderCache(self_cache, DynamicCache(config=model.config))


def test_decoder_prefix_after_prefix_equals_hf_with_prefix_as_self_attention_cache():
    model = tiny_bart()
    ids, mask, dec = batch()
    kv = random_prefixes(model)["kv"]
    p = kv.shape[3]
    hf = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
               decoder_attention_mask=torch.ones(2, p + dec.shape[1], dtype=torch.long),
               past_key_values=_hf_prefix_cache(model, kv, 2), use_cache=True).logits
    ours = prefix_logits(model, ids, mask, dec, {"kv": kv}, "after_prefix")
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-5)
    from_zero = prefix_logits(model, ids, mask, dec, {"kv": kv}, "from_zero")
    assert (from_zero - hf).abs().max() > 1e-2  # the position convention matters

    # greedy: HF decoding step by step on the prefix cache (positions follow the cache length) == the reference
    src = ids[0]
    cache, nxt, hf_ids = _hf_prefix_cache(model, kv, 1), 2, []
    enc = model.get_encoder()(input_ids=src[None])
    for step in range(10):
        out = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([[nxt]]), past_key_values=cache,
                    decoder_attention_mask=torch.ones(1, p + step + 1, dtype=torch.long), use_cache=True)
        nxt = 0 if step == 0 else int(out.logits[0, -1].argmax())
        hf_ids.append(nxt)
    assert greedy_generate(model, src.tolist(), {"kv": kv}, "after_prefix", max_new_tokens=10,
                           ignore_eos=True) == hf_ids
    assert hf_ids != greedy_generate(model, src.tolist(), None, max_new_tokens=10, ignore_eos=True)


def _blind_queries(modules, value: float = 10.0) -> None:
    """Make dimension 0 of every head's query a constant `value` (weight row zeroed, bias set)."""
    for m in modules:
        hd = m.head_dim
        m.q_proj.weight[0::hd] = 0.0
        m.q_proj.bias[0::hd] = value


ROLE_MODULES = {
    "encoder_kv": lambda m: [layer.self_attn for layer in m.get_encoder().layers],
    "kv": lambda m: [layer.self_attn for layer in m.get_decoder().layers],
    "cross_kv": lambda m: [layer.encoder_attn for layer in m.get_decoder().layers],
}


@pytest.mark.parametrize("name", ["encoder_kv", "kv", "cross_kv"])
def test_prefix_that_attention_cannot_see_changes_nothing(name):
    model = tiny_bart()
    _blind_queries(ROLE_MODULES[name](model))
    ids, mask, dec = batch()
    want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    t = random_prefixes(model)[name]
    keys = torch.zeros_like(t[:, 0])
    keys[..., 0] = -1e4  # q . k = 10 * -1e4 * scale: softmax weight exactly 0; the values are random
    hidden = torch.stack([keys, t[:, 1]], dim=1)
    torch.testing.assert_close(prefix_logits(model, ids, mask, dec, {name: hidden}), want, rtol=0, atol=1e-5)
    seen = torch.stack([-keys * 1e-3, t[:, 1]], dim=1)  # the same prefix, now dominating the attention
    assert (prefix_logits(model, ids, mask, dec, {name: seen}) - want).abs().max() > 1e-2


def _attention(m, h, kv_src, prefix, visible):
    """One head of attention by hand: h [B, Q, D] queries, kv_src [B, K, D], prefix [2, 1, P, D], visible [B, Q, K]."""
    q = h @ m.q_proj.weight.T + m.q_proj.bias
    k = torch.cat([prefix[0, 0].expand(h.shape[0], -1, -1), kv_src @ m.k_proj.weight.T + m.k_proj.bias], dim=1)
    v = torch.cat([prefix[1, 0].expand(h.shape[0], -1, -1), kv_src @ m.v_proj.weight.T + m.v_proj.bias], dim=1)
    scores = q @ k.transpose(1, 2) / h.shape[-1] ** 0.5  # [B, Q, P + K]
    p = prefix.shape[2]
    allowed = torch.cat([torch.ones(*visible.shape[:2], p, dtype=torch.bool), visible], dim=-1)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return (weights @ v) @ m.out_proj.weight.T + m.out_proj.bias


def test_one_layer_one_head_matches_hand_computed_attention():
    model = tiny_bart(encoder_layers=1, decoder_layers=1, encoder_attention_heads=1, decoder_attention_heads=1)
    ids, mask, dec = batch()
    pre = random_prefixes(model)
    seen = {}

    def grab(name):
        def hook(mod, args, kwargs, out):
            seen[name] = (args[0] if args else kwargs["hidden_states"], kwargs.get("key_value_states"), out[0])
        return hook

    enc_attn, dec_layer = model.get_encoder().layers[0].self_attn, model.get_decoder().layers[0]
    handles = [enc_attn.register_forward_hook(grab("enc"), with_kwargs=True),
               dec_layer.self_attn.register_forward_hook(grab("self"), with_kwargs=True),
               dec_layer.encoder_attn.register_forward_hook(grab("cross"), with_kwargs=True)]
    prefix_logits(model, ids, mask, dec, pre, "after_prefix")
    for h in handles:
        h.remove()
    pad = mask.bool()  # [B, S]
    s, t = ids.shape[1], dec.shape[1]
    h, _, out = seen["enc"]
    torch.testing.assert_close(out, _attention(enc_attn, h, h, pre["encoder_kv"][0], pad[:, None].expand(-1, s, -1)))
    h, _, out = seen["self"]
    causal = torch.ones(t, t).tril().bool().expand(2, -1, -1)
    torch.testing.assert_close(out, _attention(dec_layer.self_attn, h, h, pre["kv"][0], causal))
    h, enc_out, out = seen["cross"]
    torch.testing.assert_close(out, _attention(dec_layer.encoder_attn, h, enc_out, pre["cross_kv"][0],
                                               pad[:, None].expand(-1, t, -1)))


@pytest.mark.parametrize("positions", ["from_zero", "after_prefix"])
def test_position_embeddings_follow_the_convention(positions):
    model = tiny_bart()
    ids, mask, dec = batch()
    pre = random_prefixes(model)
    got = {}
    enc, decoder = model.get_encoder(), model.get_decoder()
    hooks = [m.layernorm_embedding.register_forward_pre_hook(lambda mod, args, k=k: got.__setitem__(k, args[0]))
             for k, m in (("enc", enc), ("dec", decoder))]
    prefix_logits(model, ids, mask, dec, pre, positions)
    for h in hooks:
        h.remove()
    first = pre["kv"].shape[3] if positions == "after_prefix" else 0
    offset = 2  # BartLearnedPositionalEmbedding's offset
    want_dec = decoder.embed_tokens(dec) + decoder.embed_positions.weight[offset + first + torch.arange(dec.shape[1])]
    want_enc = enc.embed_tokens(ids) + enc.embed_positions.weight[offset + torch.arange(ids.shape[1])]
    torch.testing.assert_close(got["dec"], want_dec)
    torch.testing.assert_close(got["enc"], want_enc)


@pytest.mark.parametrize("positions", ["from_zero", "after_prefix"])
def test_cached_greedy_equals_full_recompute_and_hf_generate_in_context(positions):
    model = tiny_bart()
    pre = random_prefixes(model, scale=2.0)
    src = batch()[0][0]
    ids = greedy_generate(model, src.tolist(), pre, positions, max_new_tokens=12, ignore_eos=True)
    seq = [2]
    for step in range(12):  # no cache: the whole decoder sequence every step
        logits = prefix_logits(model, src[None], None, torch.tensor([seq]), pre, positions)[0, -1]
        seq.append(0 if step == 0 else int(logits.argmax()))
    assert ids == seq[1:]
    assert ids != greedy_generate(model, src.tolist(), None, max_new_tokens=12, ignore_eos=True)
    with apply_prefixes(model, pre, positions):
        hf = model.generate(src[None], max_new_tokens=12, do_sample=False, num_beams=1, eos_token_id=None)
    assert hf[0, 1:].tolist() == ids


def test_padded_batch_rows_equal_rows_alone_with_prefixes():
    model = tiny_bart()
    ids, mask, dec = batch()
    pre = random_prefixes(model)
    both = prefix_logits(model, ids, mask, dec, pre, "from_zero")
    n = int(mask[1].sum())
    alone = prefix_logits(model, ids[1:, :n], None, dec[1:], pre, "from_zero")
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)


def test_gradients_reach_every_prefix_and_not_the_model():
    model = tiny_bart()
    ids, mask, dec = batch()
    pre = {k: v.requires_grad_(True) for k, v in random_prefixes(model).items()}
    prefix_logits(model, ids, mask, dec, pre, "from_zero").logsumexp(-1).mean().backward()
    for name, t in pre.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())


def test_bad_prefixes_are_named_and_the_model_is_restored():
    model = tiny_bart()
    ids, mask, dec = batch()
    pre = random_prefixes(model)
    with pytest.raises(ValueError, match="encoder_kv.shape"):
        prefix_logits(model, ids, mask, dec, {"encoder_kv": pre["kv"]})
    with pytest.raises(ValueError, match="'prompt'"):
        prefix_logits(model, ids, mask, dec, {"prompt": pre["kv"]})
    with pytest.raises(ValueError, match="positions"):
        prefix_logits(model, ids, mask, dec, pre, "sideways")
    with pytest.raises(RuntimeError, match="boom"):
        with apply_prefixes(model, pre, "after_prefix"):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not model.get_decoder().embed_positions._forward_pre_hooks
    want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(prefix_logits(model, ids, mask, dec, None), want, rtol=0, atol=1e-5)
