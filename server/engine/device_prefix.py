"""A task's prefix on the model's device: what the engine and its runners read for a row (the prefix task kind's
payload in the tiers, server/tiers/tiers.py, which decide where it lives and for how long)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prefix_store.artifact import PrefixArtifact


@dataclass(eq=False)
class DevicePrefix:
    """A prefix resident on the model's device (tensors as in the artifact, each [layers, 2, kv_heads, P, head_dim]).

    kv: decoder self-attention (None in an encoder-decoder artifact without one); encoder_kv, cross_kv: the encoder's
    self-attention and the decoder's cross-attention prefixes of encoder-decoder models; positions: where decoder
    position ids start ("after_prefix": at P, "from_zero": at 0); shares_host_memory: the tensors are the artifact's
    own (a CPU model in the artifact's dtype: nothing was copied).
    """

    version: str
    kv: torch.Tensor | None
    encoder_kv: torch.Tensor | None = None
    cross_kv: torch.Tensor | None = None
    positions: str = "after_prefix"
    shares_host_memory: bool = False

    @classmethod
    def from_artifact(cls, version: str, art: PrefixArtifact, device: torch.device, dtype: torch.dtype
                      ) -> DevicePrefix:
        """Copy an artifact's tensors to the device in the model's dtype (no copy where they already are)."""
        on = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in art.tensors.items()}
        shared = all(on[k].data_ptr() == v.data_ptr() for k, v in art.tensors.items())
        return cls(version, on.get("kv"), encoder_kv=on.get("encoder_kv"), cross_kv=on.get("cross_kv"),
                   positions=art.manifest.positions, shares_host_memory=shared)

    @property
    def length(self) -> int:
        """Prefix length P of the decoder self-attention prefix (0 without one)."""
        return int(self.kv.shape[3]) if self.kv is not None else 0

    @property
    def cross_length(self) -> int:
        """Length of the cross-attention prefix (0 without one)."""
        return int(self.cross_kv.shape[3]) if self.cross_kv is not None else 0

    @property
    def nbytes(self) -> int:
        """Device bytes held."""
        return sum(t.numel() * t.element_size() for t in (self.kv, self.encoder_kv, self.cross_kv) if t is not None)
