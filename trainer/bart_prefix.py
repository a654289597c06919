"""Reference BART forward and greedy decoding with Li & Liang's three prefixes (artifact format v2 tensors).

Tensors (any may be absent), per layer, keys at index 0 and values at index 1 of dim 1:

    encoder_kv: [encoder_layers, 2, encoder_heads, P_enc, head_dim]    prepended to encoder self-attention K/V
    kv:         [decoder_layers, 2, decoder_heads, P, head_dim]        prepended to decoder self-attention K/V
    cross_kv:   [decoder_layers, 2, decoder_heads, P_cross, head_dim]  prepended to the K/V computed from the encoder

Every query attends to every prefix entry (no mask over prefixes); the real tokens keep their own masks (padding in
the encoder, causal in the decoder). Decoder positions: "from_zero" (Li & Liang's code) starts the decoder's learned
positions at 0; "after_prefix" (PEFT, where the prefix sits in the self-attention cache) starts them at P, the length
of `kv`. Encoder positions always start at 0.

Mechanism: `apply_prefixes(model, ...)` is a context manager that (1) switches the model's attention implementation
to `prefixserve_prefix`, an attention function registered through transformers' `AttentionInterface` (and its mask
function through `AttentionMaskInterface`) under a new name — no existing transformers function is replaced — and
(2) for "after_prefix" adds a forward pre-hook to the decoder's position embedding that shifts its position ids by
P. The attention function looks the calling module up in a `ContextVar` (module -> prefix K/V); modules without a
prefix run sdpa attention with the same (materialised) mask; outside the context the model is untouched. The
prefixes are never written into Hugging Face caches, so the same mechanism serves a training forward (gradients flow
into the prefix tensors), cached greedy decoding and HF `generate` (beam search) inside the context. On exit the
previous attention implementation is restored and the hook removed. The model must not be run by another thread
while a context is open.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache, EncoderDecoderCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from prefix_store.artifact import POSITIONS  # "after_prefix" | "from_zero"

ATTN_NAME = "prefixserve_prefix"
PREFIX_TENSORS = ("encoder_kv", "kv", "cross_kv")

# tensor name -> (the attention modules it is prepended to, one per layer; config fields: layers, heads)
_ROLES: dict[str, tuple[Callable[[nn.Module], list[nn.Module]], str, str]] = {
    "encoder_kv": (lambda m: [layer.self_attn for layer in m.get_encoder().layers], "encoder_layers",
                   "encoder_attention_heads"),
    "kv": (lambda m: [layer.self_attn for layer in m.get_decoder().layers], "decoder_layers",
           "decoder_attention_heads"),
    "cross_kv": (lambda m: [layer.encoder_attn for layer in m.get_decoder().layers], "decoder_layers",
                 "decoder_attention_heads"),
}

_ACTIVE: ContextVar[dict[int, tuple[torch.Tensor, torch.Tensor]] | None] = ContextVar("prefixserve_bart_prefix",
                                                                                      default=None)


def _prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa attention with this module's prefix K/V (if any) prepended to key/value and visible to every query."""
    active = _ACTIVE.get()
    prefix = active.get(id(module)) if active else None
    if prefix is not None:
        b = query.shape[0]
        pk = prefix[0].to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1)  # [B, heads, P, head_dim]
        pv = prefix[1].to(value.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if attention_mask is None:  # never the case with our mask function; kept for safety
            attention_mask = torch.ones(b, 1, query.shape[2], key.shape[2] - pk.shape[2], dtype=torch.bool,
                                        device=query.device)
        visible = torch.ones(*attention_mask.shape[:3], pk.shape[2], device=query.device,
                             dtype=attention_mask.dtype)  # [B, 1, Q, P]: True (bool) or 0.0 (additive)
        if attention_mask.dtype != torch.bool:
            visible = torch.zeros_like(visible)
        attention_mask = torch.cat([visible, attention_mask], dim=-1)  # [B, 1, Q, P + K]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _prefix_mask(**kwargs: Any) -> torch.Tensor | None:
    """sdpa's boolean mask [B, 1, Q, K], always materialised inside a prefix context (a prefix is prepended to it)."""
    if _ACTIVE.get() is not None:
        kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(**kwargs)


AttentionInterface.register(ATTN_NAME, _prefix_attention)
AttentionMaskInterface.register(ATTN_NAME, _prefix_mask)


def check_prefixes(config: Any, prefixes: Mapping[str, torch.Tensor], positions: str) -> None:
    """Raise ValueError naming the tensor whose name or shape does not fit this BART config."""
    if positions not in POSITIONS:
        raise ValueError(f"positions: expected one of {POSITIONS}, found {positions!r}")
    for name, t in prefixes.items():
        if name not in _ROLES:
            raise ValueError(f"prefix tensor {name!r}: expected one of {PREFIX_TENSORS}")
        _, layers_key, heads_key = _ROLES[name]
        layers, heads = getattr(config, layers_key), getattr(config, heads_key)
        want = [layers, 2, heads, "P", config.d_model // heads]
        if t.dim() != 5 or [t.shape[0], t.shape[1], t.shape[2], t.shape[4]] != [want[0], 2, heads, want[4]]:
            raise ValueError(f"{name}.shape: expected {want}, found {list(t.shape)}")


def decoder_position_offset(prefixes: Mapping[str, torch.Tensor], positions: str) -> int:
    """Where the decoder's first position id lies: P of `kv` for "after_prefix", else 0."""
    kv = prefixes.get("kv")
    return int(kv.shape[3]) if positions == "after_prefix" and kv is not None else 0


@contextmanager
def apply_prefixes(model: nn.Module, prefixes: Mapping[str, torch.Tensor] | None = None,
                   positions: str = "from_zero") -> Iterator[None]:
    """Run `model` (a BartForConditionalGeneration) with the given prefixes inside the `with` block."""
    prefixes = {k: v for k, v in (prefixes or {}).items() if v is not None}
    check_prefixes(model.config, prefixes, positions)
    table: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, kv in prefixes.items():
        for i, module in enumerate(_ROLES[name][0](model)):
            table[id(module)] = (kv[i, 0], kv[i, 1])  # [heads, P, head_dim] each
    shift = decoder_position_offset(prefixes, positions)

    def shift_positions(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["position_ids"] = kwargs["position_ids"] + shift
        return args, kwargs

    previous = model.config._attn_implementation
    token = _ACTIVE.set(table)
    hook = model.get_decoder().embed_positions.register_forward_pre_hook(shift_positions, with_kwargs=True) \
        if shift else None
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        if hook is not None:
            hook.remove()
        _ACTIVE.reset(token)


def prefix_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  decoder_input_ids: torch.Tensor, prefixes: Mapping[str, torch.Tensor] | None = None,
                  positions: str = "from_zero", decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, V] for decoder_input_ids [B, T] given encoder input_ids [B, S]; all rows share the prefixes."""
    shift = decoder_position_offset(prefixes or {}, positions)
    limit = model.config.max_position_embeddings
    if shift + decoder_input_ids.shape[1] > limit or input_ids.shape[1] > limit:
        raise ValueError(f"positions beyond max_position_embeddings={limit}: encoder {input_ids.shape[1]}, "
                         f"decoder {shift}+{decoder_input_ids.shape[1]}")
    with apply_prefixes(model, prefixes, positions):
        return model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                     decoder_attention_mask=decoder_attention_mask, use_cache=False).logits


def _token_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def generation_ids(model: nn.Module) -> tuple[int, int | None, set[int]]:
    """(decoder_start_token_id, forced_bos_token_id or None, EOS ids) from the generation config, else the config."""
    gen, cfg = getattr(model, "generation_config", None), model.config
    start = getattr(gen, "decoder_start_token_id", None)
    start = start if start is not None else cfg.decoder_start_token_id
    forced = getattr(gen, "forced_bos_token_id", None)
    forced = forced if forced is not None else getattr(cfg, "forced_bos_token_id", None)
    eos = _token_ids(getattr(gen, "eos_token_id", None)) | _token_ids(cfg.eos_token_id)
    return int(start), forced, eos


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: list[int], prefixes: Mapping[str, torch.Tensor] | None = None,
                    positions: str = "from_zero", max_new_tokens: int = 32, ignore_eos: bool = False) -> list[int]:
    """Greedy decoding of one request; returns the generated ids after the decoder start token, EOS included.

    As HF generate does for BART: the decoder starts from `decoder_start_token_id`; when the generation config has a
    `forced_bos_token_id`, the first generated token is that token. Not applied: `forced_eos_token_id` (HF forces
    EOS as the last token when the length limit is reached; here the request ends with `max_new_tokens` tokens),
    and the beam/sampling/repetition settings of the generation config.
    """
    start, forced_bos, eos = generation_ids(model)
    dev = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=dev)
    mask = torch.ones_like(ids)
    out: list[int] = []
    with apply_prefixes(model, prefixes, positions):
        encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=mask)  # the encoder runs once
        cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
        nxt = start
        for step in range(max_new_tokens):
            logits = model(encoder_outputs=encoder_outputs, attention_mask=mask,
                           decoder_input_ids=torch.tensor([[nxt]], device=dev), past_key_values=cache,
                           use_cache=True).logits[0, -1]  # [V]
            nxt = forced_bos if step == 0 and forced_bos is not None else int(logits.argmax())
            out.append(nxt)
            if nxt in eos and not ignore_eos:
                break
    return out
