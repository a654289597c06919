"""The slot cache of an encoder-decoder model: the decoder's self-attention slots plus per-row cross-attention slots.

Next to the self-attention buffers of `SlotKVCache` (row r: its decoder prefix `kv`, the decoder start, generated
tokens), each row owns a slot in the cross-attention buffers

    ck, cv: [layers, rows, kv_heads, cross_positions, head_dim]

holding, from position 0, its task's cross-attention prefix (P_x entries) and then the keys/values that every
decoder layer's cross-attention computes from the row's encoder output (L_r entries). They are written once, at
admission, and read by every decode step; `cross_len[r] = P_x + L_r` gives the row's mask. `pos_offset[r]` is what
is subtracted from a decoder cache position to give its position id (P for "from_zero" prefixes, else 0). Row
moves and swaps carry all of it along, so the engine's batch bookkeeping is the same as for decoder-only models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, EncoderDecoderCache

from server.engine.kv_cache import SlotKVCache

if TYPE_CHECKING:
    from server.engine.device_prefix import DevicePrefix


@dataclass
class CrossState:
    """A row's set-up computed at admission: cross-attention K/V [layers, 2, kv_heads, P_x + L, head_dim]."""

    cross: torch.Tensor
    pos_offset: int


class _CrossLayer(CacheLayerMixin):
    """One decoder layer's cross-attention keys/values for the current block of rows (views, never updated)."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Set by the owner; nothing to do."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Never called: every layer is marked as updated, so attention reads keys/values directly."""
        raise RuntimeError("cross-attention slots are written at admission, not by a forward")

    def get_seq_length(self) -> int:
        """Cross positions attended in this forward."""
        return int(self.keys.shape[2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset); unused: the engine passes a prepared 4D mask."""
        return int(self.keys.shape[2]), 0

    def get_max_length(self) -> int:
        """Cross positions attended in this forward."""
        return int(self.keys.shape[2])


class Seq2SeqSlotCache(SlotKVCache):
    """SlotKVCache plus cross-attention slots, cross lengths and position offsets per row (module docstring)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 max_rows: int, max_len: int, cross_max_len: int, cross_positions: int = 64,
                 prefetch_limit: int | None = None):
        super().__init__(num_layers, num_kv_heads, head_dim, device, dtype, max_rows, max_len,
                         prefetch_limit=prefetch_limit)
        self.cross_max_len = cross_max_len
        self._cross_initial = min(cross_positions, cross_max_len)
        self.ck = self.cv = torch.empty(0)
        self.cross_len: list[int] = []
        self.pos_offset: list[int] = []
        self._resize_cross(self.capacity_rows, self._cross_initial)
        self._cross_layers = [_CrossLayer() for _ in range(num_layers)]
        self.cross_cache = Cache(layers=self._cross_layers)

    @property
    def cross_capacity(self) -> int:
        """Cross positions per row the buffers hold now."""
        return self.ck.shape[3]

    def cross_bytes_per_position(self) -> int:
        """Bytes of cross keys + values for one position of one row, all layers."""
        layers, heads, dim = self._shape
        return 2 * layers * heads * dim * self.ck.element_size()

    def nbytes(self) -> int:
        """Bytes held by the self-attention and cross-attention buffers."""
        return super().nbytes() + 2 * self.ck.numel() * self.ck.element_size()

    def planned_cross(self, positions: int) -> int:
        """Cross positions per row the buffers would have once a row of `positions` is admitted: doubled, capped."""
        want = self.cross_capacity
        while want < positions:
            want = min(want * 2, self.cross_max_len)
        if want < positions:
            raise ValueError(f"{positions} cross-attention positions exceed the limit {self.cross_max_len}")
        return want

    def planned_bytes(self, rows: int, length: int, cross_positions: int = 0) -> int:
        """Bytes after `reserve(rows, length)` and admitting rows of up to `cross_positions` cross positions (the
        slots only grow, so running rows fit the current cross capacity)."""
        r, _ = self.planned_shape(rows, length)
        cross = r * self.planned_cross(cross_positions) * self.cross_bytes_per_position()
        return super().planned_bytes(rows, length) + cross

    def _resize_cross(self, rows: int, length: int) -> None:
        layers, heads, dim = self._shape
        old_k, old_v = self.ck, self.cv
        # [layers, rows, kv_heads, cross_positions, head_dim]
        self.ck = torch.zeros(layers, rows, heads, length, dim, device=self.device, dtype=self.dtype)
        self.cv = torch.zeros_like(self.ck)
        if old_k.dim() == 5:
            n, used = min(old_k.shape[1], rows), min(old_k.shape[3], length)
            self.ck[:, :n, :, :used] = old_k[:, :n, :, :used]
            self.cv[:, :n, :, :used] = old_v[:, :n, :, :used]
        self.cross_len = (self.cross_len + [0] * rows)[:rows]
        self.pos_offset = (self.pos_offset + [0] * rows)[:rows]

    def _grow(self, rows: int, length: int, used_len: int) -> None:
        """Grow the self-attention buffers (SlotKVCache._grow) and the cross slots' rows with them."""
        super()._grow(rows, length, used_len)
        if self.ck.shape[1] != self.capacity_rows:
            self._resize_cross(self.capacity_rows, self.cross_capacity)

    def shrink(self) -> None:
        """Back to the initial size (only with no running rows)."""
        super().shrink()
        if (self.ck.shape[1], self.cross_capacity) != (self.capacity_rows, self._cross_initial):
            self.ck = self.cv = torch.empty(0)
            self.cross_len, self.pos_offset = [], []
            self._resize_cross(self.capacity_rows, self._cross_initial)

    def admit_row(self, row: int, prefix: DevicePrefix | None, state: CrossState | None = None) -> None:
        """Write the row's decoder prefix, its cross-attention slot and its position offset."""
        super().admit_row(row, prefix, state)
        assert state is not None, "an encoder-decoder row needs its cross-attention state"
        s = state.cross.shape[3]
        if s > self.cross_capacity:
            self._resize_cross(self.capacity_rows, self.planned_cross(s))
        self.ck[:, row, :, :s] = state.cross[:, 0]
        self.cv[:, row, :, :s] = state.cross[:, 1]
        self.cross_len[row], self.pos_offset[row] = s, state.pos_offset

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy a row's self-attention positions, cross slot and offsets into row dst."""
        super().move_row(src, dst, length)
        s = self.cross_len[src]
        self.ck[:, dst, :, :s] = self.ck[:, src, :, :s]
        self.cv[:, dst, :, :s] = self.cv[:, src, :, :s]
        self.cross_len[dst], self.pos_offset[dst] = s, self.pos_offset[src]

    def swap_rows(self, a: int, b: int, length: int) -> None:
        """Exchange two rows, cross slots and offsets included."""
        super().swap_rows(a, b, length)
        s = max(self.cross_len[a], self.cross_len[b])
        for buf in (self.ck, self.cv):
            tmp = buf[:, a, :, :s].clone()
            buf[:, a, :, :s] = buf[:, b, :, :s]
            buf[:, b, :, :s] = tmp
        for lst in (self.cross_len, self.pos_offset):
            lst[a], lst[b] = lst[b], lst[a]

    def cross_view(self, row_start: int, n: int, dtype: torch.dtype) -> tuple[EncoderDecoderCache, torch.Tensor]:
        """The cache object for a forward of rows [row_start, row_start + n) (call after `prepare`), and the
        cross-attention mask [n, 1, 1, S] that hides each row's slot beyond its cross length."""
        lengths = self.cross_len[row_start:row_start + n]
        s = max(lengths)
        for i, layer in enumerate(self._cross_layers):
            layer.keys = self.ck[i, row_start:row_start + n, :, :s]  # [n, kv_heads, S, head_dim]
            layer.values = self.cv[i, row_start:row_start + n, :, :s]
        j = torch.arange(s, device=self.device)
        valid = j[None, :] < torch.tensor(lengths, device=self.device)[:, None]  # [n, S]
        mask = torch.where(valid, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
        # every layer's cross keys are in place: attention reads them instead of projecting the encoder states
        return EncoderDecoderCache(self, self.cross_cache), mask
