"""LoRA rows in a mixed batch: each adapted linear layer adds its rows' low-rank updates from per-row factors.

    y = base(x)                                      # every row of the block, as without LoRA
    y[rows] += ((x[rows] @ A[rows]^T) @ B[rows]^T) * scaling[rows]     # only the rows whose task is a LoRA adapter

In the style of Punica's BGMV and S-LoRA's unified batching, built from torch ops: for one forward, each targeted
module gathers its LoRA rows' A [r, in] and B [out, r] (zero-padded to the largest rank among them) into
[m, r_max, in] and [m, out, r_max] and runs two batched matrix products; nothing is merged into the base weights,
and the model runs one forward for the whole block whatever the mix of adapters, prefixes and bare rows. A row
with no LoRA costs one Python check per linear layer; a module no row of the block adapts costs the same.

How it is hooked without forking Hugging Face's code: the runner's serving copy of the model (parameters shared)
has each linear layer wrapped in a `LoraLinear`, which calls the layer and then reads the forward's `LoraBatch`
(set by the runner around each forward from the rows' payloads). The loaded model itself is never changed.

The payload a LoRA task puts in the device tier is a `DeviceLora` (server/tiers/tiers.py counts its bytes and pins
it while rows use it). A forward's gathered factors are a working copy (m rows' factors of each adapted module),
kept while the block's rows stay the same (decode steps of an unchanged batch reuse it).
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from prefix_store.artifact import PrefixArtifact
from prefix_store.lora import lora_scaling, tensor_names
from server.engine.device_prefix import DevicePrefix
from server.engine.kv_cache import SlotKVCache


@dataclass(eq=False)
class DeviceLora:
    """A LoRA adapter on the model's device: per module path, A [r, in] and B [out, r] in the model's dtype."""

    version: str
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    rank: int
    scaling: float  # lora_alpha / r (rsLoRA: / sqrt(r))
    shares_host_memory: bool = False  # the tensors are the artifact's own (nothing was copied)

    @classmethod
    def from_artifact(cls, version: str, art: PrefixArtifact, device: torch.device, dtype: torch.dtype
                      ) -> DeviceLora:
        """Move a LoRA artifact's tensors to the device in the model's dtype (no copy where they already are)."""
        lora = art.manifest.lora
        a, b, shared = {}, {}, True
        for module in lora["modules"]:
            for out, name in zip((a, b), tensor_names(module)):
                src = art.tensors[name]
                out[module] = src.to(device=device, dtype=dtype).contiguous()
                shared = shared and out[module].data_ptr() == src.data_ptr()
        return cls(version, a, b, int(lora["r"]), lora_scaling(lora), shares_host_memory=shared)

    @property
    def modules(self) -> set[str]:
        """The module paths it adapts."""
        return set(self.a)

    @property
    def nbytes(self) -> int:
        """Device bytes held."""
        return sum(t.numel() * t.element_size() for t in itertools.chain(self.a.values(), self.b.values()))


@dataclass
class _ModuleRows:
    """One module's LoRA rows in one forward: their indices in the block and gathered, rank-padded factors."""

    index: torch.Tensor  # [m] rows of the block
    a_t: torch.Tensor  # [m, in, r_max]
    b_t: torch.Tensor  # [m, r_max, out]
    scale: torch.Tensor  # [m, 1, 1]

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y[rows] += (x[rows] A^T) B^T * scaling, for x [n, q, in] or [n, in] and y of the same leading shape."""
        xs = x.index_select(0, self.index)
        xs3 = xs if xs.dim() == 3 else xs.unsqueeze(1)  # [m, q, in]
        delta = torch.bmm(torch.bmm(xs3, self.a_t), self.b_t) * self.scale  # [m, q, out]
        return y.index_add_(0, self.index, delta.view(xs.shape[:-1] + delta.shape[-1:]))


@dataclass
class LoraBatch:
    """The LoRA payloads of one block's rows (None: no LoRA) and, per module, their gathered factors (lazily)."""

    loras: list[DeviceLora | None]
    _modules: dict[str, _ModuleRows | None] = field(default_factory=dict)

    def rows_for(self, module: str) -> _ModuleRows | None:
        """The rows that adapt `module`, with their factors gathered (None when no row does)."""
        if module not in self._modules:
            self._modules[module] = self._gather(module)
        return self._modules[module]

    def _gather(self, module: str) -> _ModuleRows | None:
        rows = [i for i, lora in enumerate(self.loras) if lora is not None and module in lora.a]
        if not rows:
            return None
        adapters = [self.loras[i] for i in rows]
        distinct = list({id(p): p for p in adapters}.values())
        r_max = max(p.rank for p in distinct)
        a_tab = torch.stack([F.pad(p.a[module], (0, 0, 0, r_max - p.rank)) for p in distinct])  # [k, r_max, in]
        b_tab = torch.stack([F.pad(p.b[module], (0, r_max - p.rank)) for p in distinct])  # [k, out, r_max]
        slot = {id(p): j for j, p in enumerate(distinct)}
        pick = torch.tensor([slot[id(p)] for p in adapters], device=a_tab.device)
        a, b = a_tab.index_select(0, pick), b_tab.index_select(0, pick)  # [m, r_max, in], [m, out, r_max]
        scale = torch.tensor([p.scaling for p in adapters], dtype=a.dtype, device=a.device)[:, None, None]
        index = torch.tensor(rows, device=a.device)
        return _ModuleRows(index, a.transpose(1, 2), b.transpose(1, 2), scale)


class LoraLinear(nn.Module):
    """A linear layer of the serving copy that adds the current forward's LoRA rows' updates to its output."""

    def __init__(self, base: nn.Module, name: str, layers: LoraLayers):
        super().__init__()
        self.base, self.lora_name = base, name
        self._layers = layers  # not a module: read for the forward's LoraBatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self._layers.batch
        rows = batch.rows_for(self.lora_name) if batch is not None else None
        return y if rows is None else rows.add_to(y, x)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (for code that reads it)."""
        return self.base.weight

    def extra_repr(self) -> str:
        return f"lora: {self.lora_name}"


class LoraLayers:
    """The serving model's wrapped linear layers and the LoraBatch of the forward running now (one thread: the
    engine's). The last few batches are kept, so decode steps of an unchanged block gather nothing again."""

    KEEP = 2  # a decode block and a prefill block alternate

    def __init__(self, model: nn.Module, names: list[str]):
        self.names = frozenset(names)
        self.batch: LoraBatch | None = None
        self._recent: dict[tuple[int, ...], LoraBatch] = {}
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoraLinear(getattr(parent, child), name, self))

    def check(self, lora: DeviceLora) -> None:
        """Raise ValueError when an adapter names a module that is not a wrapped linear layer."""
        missing = sorted(lora.modules - self.names)
        if missing:
            raise ValueError(f"LoRA adapter {lora.version[:12]} adapts modules this model does not have as linear "
                             f"layers: {missing[:3]}")

    @contextmanager
    def rows(self, loras: list[DeviceLora | None]) -> Iterator[None]:
        """Within: the block's rows carry `loras` (row i's adapter, or None)."""
        key = tuple(id(p) if p is not None else 0 for p in loras)
        if not any(key):
            yield
            return
        batch = self._recent.pop(key, None) or LoraBatch(list(loras))
        self._recent[key] = batch
        while len(self._recent) > self.KEEP:
            self._recent.pop(next(iter(self._recent)))
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None

    def forget(self) -> None:
        """Drop the kept batches (and so their hold on payloads)."""
        self._recent.clear()


class LoraSlotCache(SlotKVCache):
    """The slot cache of a runner that serves LoRA rows: beside each row's keys and values, its adapter (or None),
    carried along when rows move. Entries past the running rows are overwritten when their slot is used again
    and dropped when the cache shrinks (the engine is idle)."""

    def __init__(self, layers: LoraLayers, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lora_layers = layers  # (`layers` is the Cache's own)
        self.loras: dict[int, DeviceLora] = {}

    def admit_row(self, row: int, prefix: DevicePrefix | None, state: Any = None) -> None:
        """Write the row's prefix (if any) and remember its adapter (`state`: a DeviceLora or None)."""
        super().admit_row(row, prefix, state)
        self._set(row, state if isinstance(state, DeviceLora) else None)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Move a row's positions and its adapter."""
        super().move_row(src, dst, length)
        self._set(dst, self.loras.get(src))

    def swap_rows(self, a: int, b: int, length: int) -> None:
        """Exchange two rows, adapters included."""
        super().swap_rows(a, b, length)
        la, lb = self.loras.get(a), self.loras.get(b)
        self._set(a, lb)
        self._set(b, la)

    def shrink(self) -> None:
        """Back to the initial size (no running rows): no adapter is remembered, no gathered factor kept."""
        super().shrink()
        self.loras.clear()
        self.lora_layers.forget()

    def block_loras(self, row_start: int, n: int) -> list[DeviceLora | None]:
        """The adapters of rows [row_start, row_start + n)."""
        return [self.loras.get(i) for i in range(row_start, row_start + n)]

    def _set(self, row: int, lora: DeviceLora | None) -> None:
        if lora is None:
            self.loras.pop(row, None)
        else:
            self.loras[row] = lora
