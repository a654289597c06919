"""Prepacked weight matrices for fp32 inference on CPU (oneDNN's blocked layout), in a serving copy of the model.

A decode step multiplies every weight matrix by a few rows. The plain CPU GEMM re-packs the weight matrix into its
blocked panel layout on every call, which at 1-64 rows costs about as much as the multiplication itself; oneDNN
can take the weight already packed (`torch.ops.mkldnn._reorder_linear_weight`, the layout torch.compile's CPU
freezing and vLLM's CPU backend use), which can make a decode step's matrix work faster, by how much depending on
the matrices' shapes and the CPU (docs/benchmarks.md has the measurements).

The packed matrices live in a *serving copy* of the model: the module tree is copied with every parameter shared
(no weight is duplicated except into its packed form), and each `nn.Linear` / GPT-2 `Conv1D` of the copy is
replaced by a `PackedLinear`. The loaded model itself is left as it was, so everything else that runs it (PEFT in
the tests and benchmarks, prompt-tuning conversion, the trainer) computes exactly what Hugging Face computes.

Numerics: the packed kernel accumulates in another order than the plain GEMM, so results differ from it in the
last bits (relative ~1e-6 in fp32), as the plain GEMM's already differ between batch sizes. The packed kernel's
rows do not depend on how many rows are multiplied together, as long as there are at least two: a single row is
padded to two, so a row computes the same bits alone or in any batch (which lets the BART runner encode inputs
of one length together). Greedy equality with HF PEFT generate is token for token, as the exactness tests check
(with the default, auto; tests/engine/test_packed.py compares on and off), except on a model that amplifies
last-bit differences into other tokens: a random bart-base-shaped model drawn at std 0.1 does, and there only
'off' equals the unpacked reference (tests/engine/test_bart.py).
"""
from __future__ import annotations

import copy
import ctypes
import gc
import itertools
import logging
import time
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

PACK_BATCH_HINT = 32  # rows oneDNN tunes the packed layout for (any row count works)
MIN_SPEEDUP = 1.1  # 'auto' keeps the packed copy only when its matrix work is at least this much faster


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True when oneDNN's prepacked fp32 linear can be used: CPU, fp32, a torch build with mkldnn."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """y = x W^T + b with W [out, in] held in oneDNN's packed layout (inference only, no autograd)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [rows, in]
        rows = x2.shape[0]
        if rows == 1:  # one row would take oneDNN's matrix-vector path, whose bits differ from the batched one
            x2 = x2.expand(2, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.packed, self.bias, "none", [], "")
        return y[:rows].view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed (oneDNN)"


def _as_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a module that computes x W^T + b, or None."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # GPT-2: x W + b, W [in, out]
        return module.weight.t(), module.bias
    return None


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter and buffer (replacing its modules leaves `model` as is)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def packed_copy(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` sharing every parameter and buffer, its linear layers replaced by `PackedLinear`s;
    returns (copy, number of layers packed). The model itself is not changed."""
    clone = shared_copy(model)
    packed = 0
    for parent in list(clone.modules()):
        for name, child in list(parent.named_children()):
            wb = _as_linear(child)
            if wb is not None and wb[0].dtype == torch.float32 and wb[0].device.type == "cpu":
                setattr(parent, name, PackedLinear(*wb))
                packed += 1
    return clone, packed


def give_back_memory() -> None:
    """Return freed heap memory to the OS (glibc would keep the pages of a dropped trial copy as the process's own);
    a no-op where there is no glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, PackedLinear) or _as_linear(m) is not None]


def best_pass_seconds(calls: list[Callable[[], object]], repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` passes over `calls` (after one warm-up pass), each call once per pass:
    how a decode step streams its weight matrices."""
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for call in calls:
                call()
            if i:  # the first pass only warms up
                best = min(best, time.perf_counter() - t0)
    return best


def measured_speedup(model: nn.Module, clone: nn.Module, rows: int = PACK_BATCH_HINT, repeats: int = 3) -> float:
    """How much faster the clone's packed layers run a decode step's matrix work than the model's own layers: every
    linear layer once on a [rows, in] input (as a decode step streams them), best of `repeats` passes each."""
    def seconds(layers: list[nn.Module]) -> float:
        xs = [torch.randn(rows, getattr(m, "in_features", None) or m.weight.shape[0]) for m in layers]
        return best_pass_seconds([lambda m=m, x=x: m(x) for m, x in zip(layers, xs)], repeats)
    return seconds(_linears(model)) / seconds(_linears(clone))


def serving_model(model: nn.Module, device: torch.device, dtype: torch.dtype, mode: str = "auto") -> nn.Module:
    """The module the engine runs: `model` itself, or its packed copy. 'on': the packed copy (required); 'off': the
    model; 'auto': the packed copy where packing is available and measured at least MIN_SPEEDUP faster on this
    model's own matrices, else the model, so no memory is spent on a copy that does not pay."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"packed weights: expected auto, on or off, got {mode!r}")
    if mode == "off" or (mode == "auto" and not packing_available(device, dtype)):
        return model
    if not packing_available(device, dtype):
        raise ValueError(f"packed weights need fp32 on a CPU with oneDNN (model: {dtype} on {device})")
    clone, n = packed_copy(model)
    extra = sum(m.packed.numel() * m.packed.element_size() for m in clone.modules() if isinstance(m, PackedLinear))
    if mode == "auto":
        gain = measured_speedup(model, clone)
        if gain < MIN_SPEEDUP:
            logger.info("packed weights: x%.2f on this model's matrices (< x%.1f), not worth %.0f MiB: running the "
                        "model's own layers", gain, MIN_SPEEDUP, extra / 2**20)
            del clone
            give_back_memory()
            return model
        logger.info("packed weights: x%.2f on this model's matrices", gain)
    logger.info("packed %d weight matrices for CPU decoding (+%.0f MiB)", n, extra / 2**20)
    return clone
