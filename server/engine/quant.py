"""Quantised weight matrices as the kernels read them (server/engine/kernels/q4.cpp).

`Q4Weight` holds a matrix [N, K] as Q4_1 groups of 32 values along K: 4-bit codes q, a scale d and a minimum m per
group, w = d * q + m (GGUF's Q4_1; Q4_0, w = d * (q - 8), is the same with m = -8 d). The codes are stored as GGUF
stores them: [N, K/32, 16] bytes, byte j holding value j in its low nibble and value j + 16 in its high nibble.
`Q8Weight` holds Q8_0 groups: int8 codes and a scale per group (the embedding / output head).

Both are built from a GGUF tensor's raw blocks (what the file holds, bit for bit) or from float weights (for models
that come as safetensors, and tests), and give their float values back (`dequantized`) for the reference model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 values from raw bytes [..., 2] as fp32."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0])


@dataclass
class Q4Weight:
    """A Q4_1 matrix: codes uint8 [N, K/32, 16], scales d and minimums m fp32 [N, K/32]."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
        return self.codes.shape[0], self.codes.shape[1] * GROUP

    @classmethod
    def from_q4_1(cls, raw: np.ndarray, n: int, k: int) -> Q4Weight:
        """From GGUF Q4_1 blocks: raw uint8 [n, k/32 * 20] (per block: d fp16, m fp16, 16 bytes of codes)."""
        blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // GROUP, 20)
        return cls(torch.from_numpy(blocks[..., 4:].copy()), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]))

    @classmethod
    def from_q4_0(cls, raw: np.ndarray, n: int, k: int) -> Q4Weight:
        """From GGUF Q4_0 blocks: raw uint8 [n, k/32 * 18] (per block: d fp16, 16 bytes of codes; w = d (q - 8))."""
        blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // GROUP, 18)
        d = _f16(blocks[..., 0:2])
        return cls(torch.from_numpy(blocks[..., 2:].copy()), d, -8.0 * d)

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Q4Weight:
        """Quantise float weights [N, K] (K a multiple of 32) per group between its minimum and maximum."""
        n, k = w.shape
        if k % GROUP:
            raise ValueError(f"Q4 needs an input width that is a multiple of {GROUP}, got {k}")
        g = w.detach().float().reshape(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        d = (hi - lo) / 15
        q = torch.where(d[..., None] > 0, ((g - lo[..., None]) / d[..., None].clamp_min(1e-30)).round(), 0)
        q = q.clamp(0, 15).to(torch.uint8)
        return cls((q[..., :16] | (q[..., 16:] << 4)).contiguous(), d.contiguous(), lo.contiguous())

    def values(self) -> torch.Tensor:
        """The 4-bit codes [N, K] (0..15)."""
        lo, hi = self.codes & 0x0F, self.codes >> 4
        return torch.cat([lo, hi], dim=-1).reshape(self.codes.shape[0], -1)

    def dequantized(self) -> torch.Tensor:
        """The float weights [N, K] these codes stand for (what the reference model computes with)."""
        n, k = self.shape
        q = self.values().float().reshape(n, k // GROUP, GROUP)
        return (q * self.d[..., None] + self.m[..., None]).reshape(n, k)

    def rows(self, order: torch.Tensor | list[int]) -> Q4Weight:
        """The matrix with its rows taken in `order` (groups run along K, so rows move whole)."""
        idx = torch.as_tensor(order, dtype=torch.long)
        return Q4Weight(self.codes[idx].contiguous(), self.d[idx].contiguous(), self.m[idx].contiguous())

    @staticmethod
    def cat(parts: list[Q4Weight]) -> Q4Weight:
        """Matrices of one input width stacked by rows (q, k, v into one; gate and up into one)."""
        return Q4Weight(torch.cat([p.codes for p in parts]).contiguous(), torch.cat([p.d for p in parts]).contiguous(),
                        torch.cat([p.m for p in parts]).contiguous())

    def packed(self) -> Q4Packed:
        """The same codes, scales and minimums in the kernels' layout (`Q4Packed`)."""
        n, k = self.shape
        if n % 8:
            raise ValueError(f"the kernels take matrices of a multiple of 8 rows, got {n}")
        g = k // GROUP
        v = self.values().reshape(n // 8, 8, g, 8, 4)  # [block, row, group, quad, value]
        quads = v.permute(0, 2, 3, 1, 4).reshape(n // 8, g, 8, 32)  # [block, group, quad, row * 4 + value]
        codes = quads[:, :, 0::2] | (quads[:, :, 1::2] << 4)  # quads 2j (low nibbles) and 2j+1 (high nibbles)
        by_block = lambda t: t.reshape(n // 8, 8, g).transpose(1, 2).contiguous()  # noqa: E731
        return Q4Packed(codes.contiguous(), by_block(self.d), by_block(self.m))


@dataclass
class Q4Packed:
    """A Q4_1 matrix in the kernels' layout, blocks of 8 rows: codes uint8 [N/8, K/32, 4, 32] (vector j of a block's
    group holds quad 2j of each row's 32 codes in its low nibbles, quad 2j+1 in its high nibbles, row r at bytes
    4r..4r+3), d and m fp32 [N/8, K/32, 8]. One 32-byte vector of codes meets one broadcast quad of activations."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
        return self.codes.shape[0] * 8, self.codes.shape[1] * GROUP

    def dequantized(self) -> torch.Tensor:
        """The float weights [N, K]."""
        nb, g = self.codes.shape[:2]
        lo, hi = self.codes & 0x0F, self.codes >> 4
        quads = torch.stack([lo, hi], dim=3).reshape(nb, g, 8, 8, 4)  # [block, group, quad, row, value]
        v = quads.permute(0, 3, 1, 2, 4).reshape(nb, 8, g, GROUP).float()  # [block, row, group, 32]
        w = v * self.d.transpose(1, 2)[..., None] + self.m.transpose(1, 2)[..., None]
        return w.reshape(nb * 8, g * GROUP)

    def tensors(self) -> list[torch.Tensor]:
        """codes, d, m: what the kernels take, in that order."""
        return [self.codes, self.d, self.m]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class Q8Weight:
    """A Q8_0 matrix: int8 codes [N, K], scales fp32 [N, K/32]."""

    codes: torch.Tensor
    d: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
        return tuple(self.codes.shape)

    @classmethod
    def from_q8_0(cls, raw: np.ndarray, n: int, k: int) -> Q8Weight:
        """From GGUF Q8_0 blocks: raw uint8 [n, k/32 * 34] (per block: d fp16, 32 int8 codes)."""
        blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // GROUP, 34)
        codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k)
        return cls(torch.from_numpy(codes.copy()), _f16(blocks[..., 0:2]))

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Q8Weight:
        """Quantise float weights [N, K] symmetrically per group of 32 (codes in -127..127)."""
        n, k = w.shape
        if k % GROUP:
            raise ValueError(f"Q8 needs an input width that is a multiple of {GROUP}, got {k}")
        g = w.detach().float().reshape(n, k // GROUP, GROUP)
        d = g.abs().amax(-1) / 127
        q = torch.where(d[..., None] > 0, g / d[..., None].clamp_min(1e-30), 0).round().clamp(-127, 127)
        return cls(q.to(torch.int8).reshape(n, k).contiguous(), d.contiguous())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) as floats [..., K]: the embedding of those token ids."""
        flat = ids.reshape(-1)
        n, k = flat.numel(), self.codes.shape[1]
        rows = self.codes[flat].float().reshape(n, k // GROUP, GROUP) * self.d[flat][..., None]
        return rows.reshape(*ids.shape, k)

    def dequantized(self) -> torch.Tensor:
        """The float weights [N, K]."""
        return self.lookup(torch.arange(self.codes.shape[0]))

    def packed(self) -> Q8Packed:
        """The same codes and scales in the kernels' layout (`Q8Packed`), rows padded with zeros to a multiple of 8."""
        n, k = self.shape
        pad = -n % 8
        codes = torch.cat([self.codes, self.codes.new_zeros(pad, k)]) if pad else self.codes
        d = torch.cat([self.d, self.d.new_zeros(pad, k // GROUP)]) if pad else self.d
        np_, g = n + pad, k // GROUP
        quads = codes.reshape(np_ // 8, 8, g, 8, 4).permute(0, 2, 3, 1, 4).reshape(np_ // 8, g, 8, 32)
        return Q8Packed(quads.contiguous(), d.reshape(np_ // 8, 8, g).transpose(1, 2).contiguous(), rows=n)

    def tensors(self) -> list[torch.Tensor]:
        """codes, d."""
        return [self.codes, self.d]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class Q8Packed:
    """A Q8_0 matrix in the kernels' layout, blocks of 8 rows: codes int8 [N/8, K/32, 8, 32] (vector j of a block's
    group holds quad j of each row's 32 codes, row r at bytes 4r..4r+3), d fp32 [N/8, K/32, 8]. `rows`: the matrix's
    own rows (the last block may be padded with zero rows)."""

    codes: torch.Tensor
    d: torch.Tensor
    rows: int

    @property
    def padded_rows(self) -> int:
        """Rows including the padding (what the kernels compute)."""
        return self.codes.shape[0] * 8

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) as floats [..., K]: the embedding of those token ids."""
        flat = ids.reshape(-1)
        nb, g = self.codes.shape[:2]
        blk, r = flat // 8, flat % 8
        codes = self.codes.view(nb, g, 8, 8, 4)[blk, :, :, r, :]  # [n, group, quad, value]
        scales = self.d[blk, :, r]  # [n, group]
        rows = codes.reshape(flat.numel(), g, GROUP).float() * scales[..., None]
        return rows.reshape(*ids.shape, g * GROUP)

    def dequantized(self) -> torch.Tensor:
        """The float weights [rows, K]."""
        return self.lookup(torch.arange(self.rows))

    def tensors(self) -> list[torch.Tensor]:
        """codes, d."""
        return [self.codes, self.d]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self.tensors())
