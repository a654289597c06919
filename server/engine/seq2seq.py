"""Encoder-decoder models (BART): the encoder runs once per request at admission; decoding is continuously batched.

At admission (`Seq2SeqRunner.admit`), each admitted request's input runs through the encoder (with its task's
encoder prefix prepended to every encoder self-attention layer's keys/values), on its own or beside inputs of the
same length, never in a padded block (see `admit`); every
decoder layer's cross-attention keys/values are projected from the encoder output once, the row's cross prefix is
put in front, and the result goes to the row's cross-attention slot (`seq2seq_cache.py`). The decoder is then fed
`decoder_start_token_id` like a one-token prompt and decoded exactly as decoder-only rows are: one forward per step
for all rows, each attending to its own decoder prefix + tokens and its own cross slot.

How HF's BART forward is used, unchanged: the decoder module is called with a 4D self-attention mask, a 4D
cross-attention mask, and an `EncoderDecoderCache` whose self-attention part is the slot cache and whose
cross-attention part holds the rows' slots with every layer marked as updated (so attention reads them instead of
projecting encoder states). Two things BART's forward cannot take per row are supplied without replacing any of its
code:

- Position ids: `BartDecoder.forward` computes one `arange(past_length, past_length + q)` for the whole batch. A
  forward hook on `decoder.embed_positions` (registered for the duration of one decoder forward) returns the
  learned embedding of each row's own position ids instead, `weight[position + offset]` with BART's offset of 2,
  the same lookup `BartLearnedPositionalEmbedding.forward` does. Position = cache position for "after_prefix"
  (PEFT: the decoder input starts at P), cache position - P for "from_zero" (Li & Liang: at 0).
- The encoder prefix: the encoder's self-attention accepts `past_key_values` through its keyword arguments and
  calls `update(keys, values, layer)`; `_EncoderPrefix.update` returns [prefix | keys] per layer.

As HF `generate` does for BART, a generation config's `forced_bos_token_id` forces the first generated token.
Its `forced_eos_token_id` is not applied: at the length limit the request ends with finish_reason "length" and its
own last token (HF would replace that token by EOS); beam and n-gram settings are the request's business.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from basemodel.model import LoadedModel
from server.engine.config import EngineConfig
from server.engine.device_prefix import DevicePrefix
from server.engine.packed import serving_model
from server.engine.runner import causal_mask, check_decoder_lengths
from server.engine.seq2seq_cache import CrossState, Seq2SeqSlotCache

if TYPE_CHECKING:
    from server.engine.batch import Row
    from server.engine.request import Request


class _EncoderPrefix:
    """Per-layer encoder self-attention prefixes for a block of rows: update() returns [prefix | keys]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # [layers, n, kv_heads, P_max, head_dim]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Prepend this layer's prefix to the block's keys/values [n, kv_heads, L, head_dim]."""
        return (torch.cat([self.k[layer_idx], key_states], dim=2),
                torch.cat([self.v[layer_idx], value_states], dim=2))


class Seq2SeqRunner:
    """Runs BART-family models for the engine (see the module docstring and `server.engine.runner.Runner`)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, max_seq_len: int):
        self.loaded, self.spec, self.device = loaded, loaded.spec, loaded.device
        self.config, self.max_seq_len, self.dtype = config, max_seq_len, loaded.dtype
        # the module tree forwards run on: the model, or its copy with prepacked weights (packed.py), whose rows do
        # not depend on how many rows are multiplied together, so that inputs can be encoded together (`admit`)
        self.model = serving_model(loaded.model, loaded.device, loaded.dtype, config.packed_weights)
        self.rows_independent = self.model is not loaded.model
        self.encoder, self.decoder = self.model.get_encoder(), self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        self.bias = getattr(self.model, "final_logits_bias", None)
        s = self.spec
        self.cache = Seq2SeqSlotCache(s.num_layers, s.num_kv_heads, s.head_dim, self.device, self.dtype,
                                      max_rows=config.row_capacity, max_len=max_seq_len + 1,
                                      cross_max_len=2 * max_seq_len, prefetch_limit=config.kv_cache_bytes)
        gen, cfg = getattr(self.model, "generation_config", None), self.model.config
        start = getattr(gen, "decoder_start_token_id", None)
        self.start_ids = [int(start if start is not None else cfg.decoder_start_token_id)]
        self.forced_bos = getattr(gen, "forced_bos_token_id", None)  # where HF generate reads it
        self._check_logits()

    # ------------------------------------------------------------------ requests
    def check(self, prompt_ids: list[int], prefix: DevicePrefix | None, max_new_tokens: int) -> None:
        """Encoder input within the context; decoder prefix + start + max_new_tokens and, alone, the KV budget."""
        if not prompt_ids:
            raise ValueError("inputs must contain at least one token")
        if len(prompt_ids) > self.max_seq_len:
            raise ValueError(f"inputs ({len(prompt_ids)} tokens) exceed the maximum encoder length "
                             f"{self.max_seq_len}")
        cross = self.cross_positions(prompt_ids, prefix)
        if cross > self.cache.cross_max_len:
            raise ValueError(f"cross-attention prefix ({prefix.cross_length if prefix else 0}) + inputs "
                             f"({len(prompt_ids)} tokens) exceed {self.cache.cross_max_len} positions")
        check_decoder_lengths(len(self.start_ids), prefix.length if prefix else 0, max_new_tokens, self.max_seq_len,
                              self.cache.bytes_per_position, self.config.kv_cache_bytes,
                              extra_bytes=cross * self.cache.cross_bytes_per_position(), what="decoder start")

    @staticmethod
    def cross_positions(prompt_ids: list[int], prefix: DevicePrefix | None) -> int:
        """Cross-slot positions of a request: its task's cross prefix, then one per encoder input token."""
        return (prefix.cross_length if prefix else 0) + len(prompt_ids)

    def planned_bytes(self, rows: int, length: int, admitting: list[Request]) -> int:
        """Decoder and cross slots once `admitting` are placed: the cross slots grow to the longest of theirs."""
        cross = max((self.cross_positions(r.prompt_ids, r.prefix) for r in admitting), default=0)
        return self.cache.planned_bytes(rows, length, cross)

    def decoder_prompt(self, prompt_ids: list[int]) -> list[int] | None:
        """The decoder starts from decoder_start_token_id (the prompt goes to the encoder)."""
        return list(self.start_ids)

    def first_token_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """With a forced BOS, only that token can come first (its log-probability is 0), as in HF generate."""
        if self.forced_bos is None:
            return logits
        forced = torch.full_like(logits, torch.finfo(logits.dtype).min)
        forced[:, self.forced_bos] = 0.0
        return forced

    # ------------------------------------------------------------------ admission: the encoder, once per request
    def admit(self, rows: list[Row]) -> None:
        """Encode the rows' inputs and set each row's state.

        Never in a padded block: padding changes the shapes a row's attention and matrix multiplies run at, so
        their rounding, and a random bart-base-shaped model amplifies that last-bit difference into other greedy
        tokens (tests/engine/test_bart.py): a request encoded next to others would not decode as it does alone.
        With prepacked weights, whose rows are computed the same beside any number of others, the inputs of one
        length whose tasks have encoder prefixes of one length are encoded together, unpadded (every row then runs
        at the shapes it would alone); with the model's own layers (the plain CPU GEMM rounds differently for
        different row counts) each input is encoded on its own.
        """
        if not self.rows_independent:
            for r in rows:
                self._encode([r])
            return
        groups: dict[tuple[int, int], list[Row]] = {}  # (input length, encoder prefix length) -> rows
        for r in rows:
            p = r.request.prefix
            enc = int(p.encoder_kv.shape[3]) if p is not None and p.encoder_kv is not None else 0
            groups.setdefault((len(r.request.prompt_ids), enc), []).append(r)
        for group in groups.values():
            self._encode(group)

    def _encode(self, rows: list[Row]) -> None:
        lengths = [len(r.request.prompt_ids) for r in rows]
        prefixes = [r.request.prefix for r in rows]
        n, width = len(rows), max(lengths)
        ids = torch.full((n, width), int(self.model.config.pad_token_id or 0), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: encoder positions start at 0 for every row
            ids[i, :lengths[i]] = torch.tensor(r.request.prompt_ids)
        enc_prefix, mask = self._encoder_prefix(prefixes, lengths, width)
        with torch.inference_mode():
            hidden = self.encoder(input_ids=ids.to(self.device), attention_mask=mask,
                                  past_key_values=enc_prefix).last_hidden_state  # [n, width, d_model]
            cross = self._project(hidden)  # [layers, 2, n, kv_heads, width, head_dim]
        for i, (r, p) in enumerate(zip(rows, prefixes)):
            own = cross[:, :, i, :, :lengths[i]]  # [layers, 2, kv_heads, L, head_dim]
            if p is not None and p.cross_kv is not None:
                own = torch.cat([p.cross_kv, own], dim=3)
            offset = p.length if p is not None and p.positions == "from_zero" else 0
            r.state = CrossState(own.contiguous(), offset)

    def _encoder_prefix(self, prefixes: list[DevicePrefix | None], lengths: list[int], width: int,
                        ) -> tuple[_EncoderPrefix | None, torch.Tensor | None]:
        """The block's encoder prefixes (padded to the longest) and the 4D mask [n, 1, width, P_max + width]."""
        own = [p.encoder_kv if p is not None else None for p in prefixes]
        p_len = [int(t.shape[3]) if t is not None else 0 for t in own]
        p_max = max(p_len)
        if not p_max and len(set(lengths)) == 1:
            return None, None  # nothing to mask: the same call HF makes for one unpadded input
        j = torch.arange(p_max + width, device=self.device)
        keep_p = j[None, :] < torch.tensor(p_len, device=self.device)[:, None]
        keep_t = (j[None, :] >= p_max) & (j[None, :] - p_max < torch.tensor(lengths, device=self.device)[:, None])
        mask = torch.where(keep_p | keep_t, 0.0, torch.finfo(self.dtype).min).to(self.dtype)  # [n, P_max + width]
        mask = mask[:, None, None, :].expand(-1, 1, width, -1)
        if not p_max:
            return None, mask
        s = self.spec
        k = torch.zeros(s.num_encoder_layers, len(own), s.num_encoder_kv_heads, p_max, s.encoder_head_dim,
                        device=self.device, dtype=self.dtype)  # [layers, n, kv_heads, P_max, head_dim]
        v = torch.zeros_like(k)
        for i, t in enumerate(own):
            if t is not None:
                k[:, i, :, :p_len[i]], v[:, i, :, :p_len[i]] = t[:, 0], t[:, 1]
        return _EncoderPrefix(k, v), mask

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every decoder layer's cross-attention keys/values of encoder states [n, L, d_model]."""
        n, length, _ = hidden.shape
        out = []
        for layer in self.decoder.layers:
            attn = layer.encoder_attn
            k = attn.k_proj(hidden).view(n, length, -1, attn.head_dim).transpose(1, 2)  # [n, kv_heads, L, head_dim]
            v = attn.v_proj(hidden).view(n, length, -1, attn.head_dim).transpose(1, 2)
            out.append(torch.stack([k, v]))
        return torch.stack(out)  # [layers, 2, n, kv_heads, L, head_dim]

    # ------------------------------------------------------------------ decoding
    @staticmethod
    def _positions_hook(positions: torch.Tensor) -> Callable[..., torch.Tensor]:
        """A forward hook for `embed_positions` that returns the embeddings of each row's own position ids [n, q]:
        `weight[positions + offset]`, the lookup BartLearnedPositionalEmbedding.forward does ([n, q, d_model])."""
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.embedding(positions + module.offset, module.weight)
        return hook

    def forward(self, ids: torch.Tensor, write_pos: torch.Tensor, row_start: int, kv_len: int) -> torch.Tensor:
        """One decoder forward for rows [row_start, row_start + n): logits of the last column [n, V]."""
        n = ids.shape[0]
        mask = causal_mask(write_pos, kv_len, self.dtype)
        self.cache.prepare(row_start, write_pos, kv_len)
        cache, cross_mask = self.cache.cross_view(row_start, n, self.dtype)
        offsets = torch.tensor(self.cache.pos_offset[row_start:row_start + n], device=self.device)[:, None]
        positions = torch.where(write_pos < self.cache.trash_pos, write_pos - offsets, 0)
        # the encoder states are not read (every cross layer is cached); a zero-copy stand-in gives their shape
        stand_in = torch.zeros(1, 1, self.model.config.d_model, device=self.device, dtype=self.dtype)
        hook = self.decoder.embed_positions.register_forward_hook(self._positions_hook(positions))
        try:
            with torch.inference_mode():
                hidden = self.decoder(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                                      encoder_hidden_states=stand_in.expand(n, cross_mask.shape[-1], -1),
                                      encoder_attention_mask=cross_mask).last_hidden_state
                return self._logits(hidden[:, -1, :].contiguous())  # [n, V]
        finally:
            hook.remove()  # the model is left as it was found

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """BART's head: the output embedding plus final_logits_bias."""
        logits = self.head(hidden)
        return logits + self.bias.to(logits.dtype) if self.bias is not None else logits

    def _check_logits(self) -> None:
        """Once at start-up: encoder + decoder + head as run here equal the model's own forward (no prefix)."""
        ids = torch.arange(4, 9, device=self.device)[None] % self.spec.vocab_size
        dec = torch.tensor([self.start_ids + [5, 6]], device=self.device) % self.spec.vocab_size
        with torch.inference_mode():
            full = self.model(input_ids=ids, decoder_input_ids=dec).logits[:, -1].float()
            enc = self.encoder(input_ids=ids).last_hidden_state
            ours = self._logits(self.decoder(input_ids=dec, encoder_hidden_states=enc).last_hidden_state[:, -1])
        if not torch.allclose(full, ours.float(), rtol=1e-3, atol=1e-3 * full.abs().max()):
            raise ValueError(f"{self.spec.model_type}: logits are not output embedding + final_logits_bias; "
                             "this encoder-decoder family needs its own runner")
