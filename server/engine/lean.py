"""A lean quantised forward for LLaMA-family models: the whole layer loop in one call of the CPU kernels.

`QuantLlama` holds a model's weights as the kernels read them (server/engine/quant.py: Q4_1 matrices, a Q8_0
embedding / head) and runs a block of rows against the engine's slot KV cache (fp16, [layers, rows, kv_heads,
positions, head_dim]) in one call of `q4_forward` (server/engine/kernels/q4.cpp): no Python per layer, no HF module
tree. It computes what HF's LlamaForCausalLM computes (RMSNorm, rotate-half RoPE, grouped-query attention, SiLU MLP)
on the dequantised weights, up to the int8 rounding of activations and the fp16 cache; `reference()` builds that
HF model for tests and for measuring the difference.

Which configs it takes is checked by `LeanConfig.from_hf` (the llama model type without biases, rope scaling or
other variants); anything else is served unquantised.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from server.engine import kernels
from server.engine.quant import GROUP, Q4Packed, Q8Packed, Q8Weight


@dataclass(frozen=True)
class LeanConfig:
    """The shapes and constants of the forward."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    eps: float
    rope_theta: float
    max_positions: int

    @classmethod
    def from_hf(cls, config: Any) -> LeanConfig:
        """From a Hugging Face config; ValueError naming what the lean forward does not compute."""
        if config.model_type != "llama":
            raise ValueError(f"model type {config.model_type!r} (the quantised forward is for 'llama')")
        unsupported = [name for name in ("attention_bias", "mlp_bias") if getattr(config, name, False)]
        scaling = getattr(config, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type != "default":
            unsupported.append(f"rope_scaling {rope_type!r}")
        if getattr(config, "hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act {config.hidden_act!r}")
        if unsupported:
            raise ValueError(f"the quantised forward does not compute {', '.join(unsupported)}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        out = cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                  kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                  ffn=config.intermediate_size, vocab=config.vocab_size, eps=float(config.rms_norm_eps),
                  rope_theta=float(getattr(config, "rope_theta", None) or
                                   (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
                  max_positions=config.max_position_embeddings)
        for name, width in (("hidden_size", out.hidden), ("intermediate_size", out.ffn),
                            ("heads * head_dim", out.heads * out.head_dim)):
            if width % GROUP:
                raise ValueError(f"{name} {width} is not a multiple of {GROUP}")
        if out.head_dim % 16 or out.head_dim > 256 or out.heads % out.kv_heads:
            raise ValueError(f"head_dim {out.head_dim} with {out.heads} heads over {out.kv_heads} KV heads")
        return out


@dataclass
class QuantLayer:
    """One decoder layer: norms fp32 [hidden]; q, k, v stacked by rows (HF's row order), o, gate and up stacked, down."""

    attn_norm: torch.Tensor
    qkv: Q4Packed
    o: Q4Packed
    ffn_norm: torch.Tensor
    gate_up: Q4Packed
    down: Q4Packed

    def tensors(self) -> list[torch.Tensor]:
        """The 14 tensors in the order q4.cpp reads them."""
        return [self.attn_norm, *self.qkv.tensors(), *self.o.tensors(), self.ffn_norm, *self.gate_up.tensors(),
                *self.down.tensors()]


class QuantLlama:
    """The quantised model; `config` is the HF config (what the engine's spec and fingerprint come from)."""

    def __init__(self, config: Any, layers: list[QuantLayer], final_norm: torch.Tensor, head: Q8Weight,
                 embed: Q8Weight | None = None):
        self.config = config
        self.lean = LeanConfig.from_hf(config)
        self.layers, self.final_norm = layers, final_norm.float().contiguous()
        self.head: Q8Packed = head.packed()
        # tied embeddings are looked up in the head's own codes (one copy)
        self.embed: Q8Packed | Q8Weight = self.head if embed is None or embed is head else embed
        # what the engine reads of a model's generation config: its end-of-sequence id(s)
        self.generation_config = SimpleNamespace(eos_token_id=getattr(config, "eos_token_id", None))
        self._lib = kernels.load()
        self.threads = torch.get_num_threads()  # the kernels' own threads (server/engine/kernels/q4.cpp)
        c = self.lean
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
        freqs = torch.outer(torch.arange(c.max_positions, dtype=torch.float32), inv_freq)
        self.rope_cos, self.rope_sin = freqs.cos().contiguous(), freqs.sin().contiguous()
        tensors = [t for layer in layers for t in layer.tensors()]
        for t in tensors:
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("quantised weights must be contiguous CPU tensors")
        self._ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
        self._no_lora = (np.zeros((c.layers, 7, 2), dtype=np.int64), np.zeros((c.layers, 7, 2), dtype=np.float32))
        self._desc = kernels.Q4Model(c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.ffn, self.head.padded_rows,
                                     c.max_positions, c.eps, self._ptrs, self.final_norm.data_ptr(),
                                     self.head.codes.data_ptr(), self.head.d.data_ptr(), self.rope_cos.data_ptr(),
                                     self.rope_sin.data_ptr())

    @property
    def nbytes(self) -> int:
        """Bytes of weights held (the rope tables included)."""
        n = sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())
        n += self.head.nbytes + (self.embed.nbytes if self.embed is not self.head else 0)
        return n + 2 * self.rope_cos.numel() * 4 + self.final_norm.numel() * 4

    def forward(self, ids: torch.Tensor | None, positions: torch.Tensor, write_pos: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, row_start: int, kv_len: int,
                embeds: torch.Tensor | None = None, loras: list | None = None) -> torch.Tensor:
        """Logits [n, vocab] of the last column of rows [row_start, row_start + n).

        ids [n, q] (or embeds [n, q, hidden]) at rope positions `positions` [n, q], their keys and values written at
        cache positions `write_pos` [n, q] (the cache's last position for left padding); a query at position p
        attends to the row's keys 0..p. k_cache, v_cache: fp16 [layers, rows, kv_heads, positions, head_dim].
        loras: each row's LoRA adapter (a DeviceLora, server/engine/lora.py) or None; its low-rank updates are added
        after each adapted module's product, from the module's fp32 input.
        """
        c = self.lean
        n, q = write_pos.shape
        expected = (c.layers, c.kv_heads, c.head_dim)
        for cache in (k_cache, v_cache):
            if (cache.dtype != torch.float16 or not cache.is_contiguous() or cache.dim() != 5
                    or (cache.shape[0], cache.shape[2], cache.shape[4]) != expected):
                raise ValueError(f"the cache must be contiguous fp16 [layers, rows, kv_heads, positions, head_dim] "
                                 f"with {expected}, got {cache.dtype} {tuple(cache.shape)}")
        h = self.embed.lookup(ids) if embeds is None else embeds.float().clone()
        h = h.reshape(n * q, c.hidden).contiguous()
        pos = positions.reshape(-1).to(torch.int64).contiguous()
        wp = write_pos.reshape(-1).to(torch.int64).contiguous()
        logits = torch.empty(n, self.head.padded_rows, dtype=torch.float32)
        ptrs = meta = None
        if loras is not None and any(x is not None for x in loras):
            tables = [self.lora_table(x) if x is not None else self._no_lora for x in loras]
            ptrs = np.ascontiguousarray(np.stack([t[0] for t in tables]))
            meta = np.ascontiguousarray(np.stack([t[1] for t in tables]))
        rc = self._lib.q4_forward(ctypes.byref(self._desc), h.data_ptr(), pos.data_ptr(), wp.data_ptr(), n, q,
                                  k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], k_cache.shape[3],
                                  row_start, kv_len, logits.data_ptr(), self.threads,
                                  None if ptrs is None else ptrs.ctypes.data, None if meta is None else meta.ctypes.data)
        if rc != 0:
            raise ValueError(f"q4_forward refused its arguments (code {rc}): rows {row_start}+{n} of "
                             f"{k_cache.shape[1]}, kv_len {kv_len} of {k_cache.shape[3]}, positions "
                             f"{int(pos.min())}..{int(pos.max())} of {c.max_positions}")
        return logits if logits.shape[1] == c.vocab else logits[:, :c.vocab].contiguous()

    def prefix_kv(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Run a soft prompt [P, hidden] at positions 0..P-1; its keys and values [layers, 2, kv_heads, P, head_dim]
        (fp32 values of the fp16 cache: what a row that attends to them reads)."""
        c = self.lean
        p = embeddings.shape[0]
        k = torch.zeros(c.layers, 1, c.kv_heads, p + 1, c.head_dim, dtype=torch.float16)
        v = torch.zeros_like(k)
        pos = torch.arange(p)[None]
        self.forward(None, pos, pos, k, v, 0, p, embeds=embeddings[None])
        return torch.stack([k[:, 0, :, :p], v[:, 0, :, :p]], dim=1).float()

    # the modules a LoRA adapter may adapt, in the kernels' order, by the suffix of their HF module path
    LORA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                    "mlp.up_proj", "mlp.down_proj")
    MAX_LORA_RANK = 256

    def lora_check(self, lora: Any) -> None:
        """ValueError naming what the kernels cannot add for this adapter (a module outside the decoder layers'
        projections, a rank over 256, factors that are not fp32 CPU tensors)."""
        bad = [m for m in lora.modules if self._lora_slot(m) is None]
        if bad:
            raise ValueError(f"the quantised mode adds LoRA updates to the decoder layers' q/k/v/o/gate/up/down "
                             f"projections only, not {sorted(bad)[:3]}")
        if lora.rank > self.MAX_LORA_RANK:
            raise ValueError(f"the quantised mode takes LoRA ranks up to {self.MAX_LORA_RANK}, not {lora.rank}")
        for t in (*lora.a.values(), *lora.b.values()):
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError("LoRA factors must be contiguous fp32 CPU tensors in the quantised mode")

    def _lora_slot(self, module: str) -> tuple[int, int] | None:
        """(layer, kernel module index) of an HF module path, or None."""
        parts = module.split(".")
        if len(parts) != 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None
        name = ".".join(parts[3:])
        layer = int(parts[2])
        if name not in self.LORA_MODULES or layer >= self.lean.layers:
            return None
        return layer, self.LORA_MODULES.index(name)

    def lora_table(self, lora: Any) -> tuple[np.ndarray, np.ndarray]:
        """What the kernels read of an adapter: A and B pointers [layers, 7, 2] (int64, 0 where not adapted) and
        (rank, scale) [layers, 7, 2] (fp32). Built once per adapter and kept on it."""
        cached = getattr(lora, "_q4_table", None)
        if cached is not None:
            return cached
        ptrs = np.zeros((self.lean.layers, 7, 2), dtype=np.int64)
        meta = np.zeros((self.lean.layers, 7, 2), dtype=np.float32)
        for module, a in lora.a.items():
            layer, idx = self._lora_slot(module)
            ptrs[layer, idx] = (a.data_ptr(), lora.b[module].data_ptr())
            meta[layer, idx] = (a.shape[0], lora.scaling)
        lora._q4_table = (ptrs, meta)  # the tensors it points into live as long as the adapter
        return lora._q4_table

    def hf_config(self) -> Any:
        """The HF config this model's config stands for (a LlamaConfig, built from its fields if need be)."""
        from transformers import LlamaConfig, PretrainedConfig

        if isinstance(self.config, PretrainedConfig):
            return self.config
        return LlamaConfig(**{k: v for k, v in vars(self.config).items() if k != "model_type"})

    def module_table(self) -> dict:
        """The module paths and linear shapes of the HF model this stands for (what a LoRA adapter is checked
        against), read off that model's module tree built on the meta device (no memory)."""
        from transformers import AutoModelForCausalLM

        from basemodel.lora import module_table
        with torch.device("meta"):
            return module_table(AutoModelForCausalLM.from_config(self.hf_config()))

    def reference(self) -> torch.nn.Module:
        """HF's LlamaForCausalLM on the dequantised weights (fp32): what this forward approximates."""
        from transformers import LlamaForCausalLM

        c = self.lean
        model = LlamaForCausalLM(self.hf_config()).eval().requires_grad_(False)
        qw, kvw = c.heads * c.head_dim, c.kv_heads * c.head_dim
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(self.embed.dequantized())
            model.lm_head.weight.copy_(self.head.dequantized())
            model.model.norm.weight.copy_(self.final_norm)
            for layer, hf in zip(self.layers, model.model.layers):
                qkv, gu = layer.qkv.dequantized(), layer.gate_up.dequantized()
                a, m = hf.self_attn, hf.mlp
                a.q_proj.weight.copy_(qkv[:qw])
                a.k_proj.weight.copy_(qkv[qw:qw + kvw])
                a.v_proj.weight.copy_(qkv[qw + kvw:])
                a.o_proj.weight.copy_(layer.o.dequantized())
                m.gate_proj.weight.copy_(gu[:c.ffn])
                m.up_proj.weight.copy_(gu[c.ffn:])
                m.down_proj.weight.copy_(layer.down.dequantized())
                hf.input_layernorm.weight.copy_(layer.attn_norm)
                hf.post_attention_layernorm.weight.copy_(layer.ffn_norm)
        return model
