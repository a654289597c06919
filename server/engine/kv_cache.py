"""A preallocated KV cache where each running row owns one batch slot and writes at its own positions.

Row r's slot holds, from position 0: its task's prefix (P_r entries, copied once at admission), its prompt, then
its generated tokens. A token's cache position is therefore its position id (PEFT's convention: the first input
token sits at position P_r), and the attention mask of a query at position s is simply "keys at positions <= s".
Rows of different prefix and prompt lengths share one batch without shifting anything.

The buffers grow by doubling (rows and positions), never past `max_rows` rows and `max_len` positions, and go back
to their initial size when the engine is idle; the last position is a write-only "trash" slot that receives the
keys of left-padding tokens during prefill and is never attended to.

Growing on a CPU costs mostly the page faults of touching fresh memory (far more than zeroing memory already
touched; docs/benchmarks.md, "KV-cache growth"), and a growth stalls every running row. So once more than half the
rows are in use, the next doubling of the rows is allocated and zeroed ahead of time on a background thread (torch
releases the GIL while it zeroes, so this overlaps the engine's forwards on another core), and the growth that
needs it only copies what is stored. The spare is made only if the buffers held now and the spare together fit
`prefetch_limit` bytes (the engine's KV budget), and counts in `nbytes()`.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from server.engine.device_prefix import DevicePrefix


class _SlotLayer(CacheLayerMixin):
    """One decoder layer's view of the shared buffers; `update` scatters keys to per-row positions."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: SlotKVCache, layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers are allocated by the owner; nothing to do."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write [n, H, q, D] keys/values at the rows' write positions; return keys/values up to kv_len."""
        o = self.owner
        b0, b1 = o.rows
        kb, vb = o.k[self.layer_idx, b0:b1], o.v[self.layer_idx, b0:b1]  # [n, H, S, D]
        # advanced indices (rows [n,1], positions [n,q]) around a slice: the indexed view is [n, q, H, D]
        kb[o.row_index, :, o.write_pos, :] = key_states.transpose(1, 2).to(kb.dtype)
        vb[o.row_index, :, o.write_pos, :] = value_states.transpose(1, 2).to(vb.dtype)
        return kb[:, :, : o.kv_len], vb[:, :, : o.kv_len]

    def get_seq_length(self) -> int:
        """Number of key positions attended in the current step."""
        return self.owner.kv_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset); unused because the engine always passes a prepared 4D mask."""
        return self.owner.kv_len, 0

    def get_max_length(self) -> int:
        """Current capacity in positions (the buffers grow on demand)."""
        return self.owner.capacity_len


class _Spare:
    """Zeroed key and value buffers of one shape, made on a background thread."""

    def __init__(self, shape: tuple[int, int], make):
        self.shape = shape
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._thread = threading.Thread(target=self._make, args=(make,), name="kv-prefetch", daemon=True)
        self._thread.start()

    def _make(self, make) -> None:
        try:
            self.buffers = make(*self.shape)
        except RuntimeError:  # out of memory: the growth allocates (and reports) on the engine thread instead
            self.buffers = None

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The buffers once made (waits for the thread), or None if making them failed."""
        self._thread.join()
        return self.buffers


class SlotKVCache(Cache):
    """Buffers k, v: [layers, rows, kv_heads, positions, head_dim] on the model's device."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype, max_rows: int, max_len: int, rows: int = 1, positions: int = 256,
                 prefetch_limit: int | None = None):
        self._shape = (num_layers, num_kv_heads, head_dim)
        # bytes: a spare is made ahead of time only if it and the buffers held fit this (None: never)
        self.prefetch_limit = prefetch_limit
        self.device, self.dtype = device, dtype
        self.max_rows, self.max_len = max_rows, max_len
        self._initial = (min(rows, max_rows), min(positions, max_len))
        # bytes of keys + values for one position of one row, all layers
        self.bytes_per_position = 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
        self.k = self.v = torch.empty(0)
        self._spare: _Spare | None = None
        self.prefetched_growths = 0  # growths served by a spare made ahead of time
        self._allocate(*self._initial)
        super().__init__(layers=[_SlotLayer(self, i) for i in range(num_layers)])
        self.rows: tuple[int, int] = (0, 0)
        self.row_index = torch.zeros(0, 1, dtype=torch.long, device=device)
        self.write_pos = torch.zeros(0, 1, dtype=torch.long, device=device)
        self.kv_len = 0

    @property
    def capacity_rows(self) -> int:
        """Rows the buffers hold now."""
        return self.k.shape[1]

    @property
    def capacity_len(self) -> int:
        """Positions per row the buffers hold now, the trash slot included."""
        return self.k.shape[3]

    @property
    def trash_pos(self) -> int:
        """The write-only position that left-padding tokens are written to."""
        return self.capacity_len - 1

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (a spare made ahead of time included)."""
        spare = self._spare.shape[0] * self._spare.shape[1] * self.bytes_per_position if self._spare else 0
        return 2 * self.k.numel() * self.k.element_size() + spare

    def _zeros(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        layers, heads, dim = self._shape
        # [layers, rows, kv_heads, positions, head_dim]
        k = torch.zeros(layers, rows, heads, length, dim, device=self.device, dtype=self.dtype)
        return k, torch.zeros_like(k)

    def _allocate(self, rows: int, length: int) -> None:
        spare, self._spare = self._spare, None
        made = spare.take() if spare is not None and spare.shape == (rows, length) else None
        self.prefetched_growths += made is not None
        self.k = self.v = torch.empty(0)  # shrinking: the old buffers' memory can go before the new ones are made
        self.k, self.v = made if made is not None else self._zeros(rows, length)

    def _prefetch(self, rows: int) -> None:
        """Start making the next doubling of the rows when more than half are in use (module docstring)."""
        cap = self.capacity_rows
        if (self._spare is not None or self.prefetch_limit is None or self.device.type != "cpu"
                or cap >= self.max_rows or 2 * rows <= cap):
            return
        shape = (min(2 * cap, self.max_rows), self.capacity_len)
        if self.nbytes() + shape[0] * shape[1] * self.bytes_per_position <= self.prefetch_limit:
            self._spare = _Spare(shape, self._zeros)

    def planned_shape(self, rows: int, length: int) -> tuple[int, int]:
        """(rows, positions) the buffers would have after `reserve(rows, length)`: doubled, capped."""
        want_rows, want_len = self.capacity_rows, self.capacity_len
        while want_rows < rows:
            want_rows = min(want_rows * 2, self.max_rows)
        while want_len < length + 1:
            want_len = min(want_len * 2, self.max_len)
        if want_rows < rows or want_len < length + 1:
            raise ValueError(f"{rows} rows of {length} positions exceed the cache limits "
                             f"({self.max_rows} rows, {self.max_len - 1} positions)")
        return want_rows, want_len

    def planned_bytes(self, rows: int, length: int) -> int:
        """Bytes the buffers would take after `reserve(rows, length)`."""
        r, n = self.planned_shape(rows, length)
        return r * n * self.bytes_per_position

    def reserve(self, rows: int, length: int, used_len: int) -> None:
        """Grow so that `rows` rows of `length` positions plus the trash slot fit, keeping what is stored."""
        self._grow(rows, length, used_len)
        self._prefetch(rows)

    def _grow(self, rows: int, length: int, used_len: int) -> None:
        want = self.planned_shape(rows, length)
        if want != (self.capacity_rows, self.capacity_len):
            old_k, old_v = self.k, self.v
            self._allocate(*want)
            n, used = old_k.shape[1], min(used_len, old_k.shape[3] - 1)
            self.k[:, :n, :, :used] = old_k[:, :, :, :used]
            self.v[:, :n, :, :used] = old_v[:, :, :, :used]

    def shrink(self) -> None:
        """Return to the initial size (only call with no running rows); a spare made ahead of time is dropped."""
        self._spare = None
        if (self.capacity_rows, self.capacity_len) != self._initial:
            self._allocate(*self._initial)

    def write_prefix(self, row: int, kv: torch.Tensor) -> None:
        """Copy a prefix [layers, 2, kv_heads, P, head_dim] into positions 0..P-1 of a row (once, at admission)."""
        p = kv.shape[3]
        self.k[:, row, :, :p] = kv[:, 0]
        self.v[:, row, :, :p] = kv[:, 1]

    def admit_row(self, row: int, prefix: DevicePrefix | None, state: Any = None) -> None:
        """Set up a newly placed row: its decoder self-attention prefix (if any). `state` is the runner's per-row
        set-up (none for decoder-only models; see Seq2SeqSlotCache)."""
        if prefix is not None and prefix.kv is not None:
            self.write_prefix(row, prefix.kv)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` positions into row dst (used to keep running rows contiguous)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def swap_rows(self, a: int, b: int, length: int) -> None:
        """Exchange the first `length` positions of rows a and b."""
        for buf in (self.k, self.v):
            tmp = buf[:, a, :, :length].clone()
            buf[:, a, :, :length] = buf[:, b, :, :length]
            buf[:, b, :, :length] = tmp

    def prepare(self, row_start: int, write_pos: torch.Tensor, kv_len: int) -> None:
        """Set up the next forward: rows [row_start, row_start+n) write at write_pos [n, q]; attend kv_len keys."""
        n = write_pos.shape[0]
        self.rows = (row_start, row_start + n)
        self.row_index = torch.arange(n, device=self.device).unsqueeze(1)  # [n, 1]
        self.write_pos = write_pos
        self.kv_len = kv_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of key positions attended in the current step."""
        return self.kv_len
