"""Building a `QuantLlama` (server/engine/lean.py): from a GGUF file's own quantised blocks, or from float weights.

From GGUF, the Q4_1 / Q4_0 matrices and the Q8_0 embedding are taken as the file holds them, bit for bit: serving
the file's own weights is what llama.cpp does with it. llama.cpp's converter permutes the rows of the query and key
matrices (its RoPE pairs neighbouring values, HF's rotate-half pairs value i with i + head_dim/2); whole rows move,
so the permutation is undone on the quantised rows (`unpermute_order`) and the forward keeps HF's layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.engine.lean import LeanConfig, QuantLayer, QuantLlama
from server.engine.quant import Q4Weight, Q8Weight


def unpermute_order(rows: int, heads: int) -> torch.Tensor:
    """For each row of HF's layout, the GGUF row it came from (llama.cpp's q/k permutation, per head
    [2, head_dim/2] -> [head_dim/2, 2])."""
    hd = rows // heads
    h, j, i = torch.meshgrid(torch.arange(heads), torch.arange(2), torch.arange(hd // 2), indexing="ij")
    return (h * hd + i * 2 + j).reshape(-1)


class GGUFTensors:
    """The tensors of a GGUF file by name, as `Q4Weight`, `Q8Weight` or float."""

    def __init__(self, path: str | Path):
        import gguf

        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def _get(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"the GGUF file has no tensor {name!r}") from None

    def float(self, name: str) -> torch.Tensor:
        """An F32 tensor."""
        t = self._get(name)
        if t.tensor_type.name != "F32":
            raise ValueError(f"{name}: expected F32, found {t.tensor_type.name}")
        return torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(-1)

    def q4(self, name: str) -> Q4Weight:
        """A Q4_1 or Q4_0 matrix [N, K]."""
        t = self._get(name)
        k, n = (int(x) for x in t.shape)
        kind = t.tensor_type.name
        if kind == "Q4_1":
            return Q4Weight.from_q4_1(t.data, n, k)
        if kind == "Q4_0":
            return Q4Weight.from_q4_0(t.data, n, k)
        raise ValueError(f"{name}: the quantised forward reads Q4_1 or Q4_0 matrices, found {kind}")

    def q8(self, name: str) -> Q8Weight:
        """A Q8_0 matrix [N, K] (F32 / F16 ones are quantised to Q8_0)."""
        t = self._get(name)
        k, n = (int(x) for x in t.shape)
        kind = t.tensor_type.name
        if kind == "Q8_0":
            return Q8Weight.from_q8_0(t.data, n, k)
        if kind in ("F32", "F16"):
            return Q8Weight.from_float(torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(n, k))
        raise ValueError(f"{name}: expected Q8_0, F16 or F32, found {kind}")


def quant_llama_from_gguf(path: str | Path, config: Any) -> QuantLlama:
    """The GGUF file's own quantised weights, for the HF `config` read from the same file."""
    c = LeanConfig.from_hf(config)
    g = GGUFTensors(path)
    q_order, k_order = unpermute_order(c.heads * c.head_dim, c.heads), unpermute_order(c.kv_heads * c.head_dim,
                                                                                      c.kv_heads)
    layers = []
    for i in range(c.layers):
        b = f"blk.{i}."
        qkv = Q4Weight.cat([g.q4(b + "attn_q.weight").rows(q_order), g.q4(b + "attn_k.weight").rows(k_order),
                            g.q4(b + "attn_v.weight")])
        layers.append(QuantLayer(attn_norm=g.float(b + "attn_norm.weight"), qkv=qkv.packed(),
                                 o=g.q4(b + "attn_output.weight").packed(), ffn_norm=g.float(b + "ffn_norm.weight"),
                                 gate_up=Q4Weight.cat([g.q4(b + "ffn_gate.weight"), g.q4(b + "ffn_up.weight")]).packed(),
                                 down=g.q4(b + "ffn_down.weight").packed()))
    embed = g.q8("token_embd.weight")
    head = g.q8("output.weight") if "output.weight" in g else embed
    return QuantLlama(config, layers, g.float("output_norm.weight"), head, embed=embed)


def quant_llama_from_hf(model: torch.nn.Module) -> QuantLlama:
    """Quantise a float LlamaForCausalLM (Q4_1 matrices, Q8_0 embedding and head)."""
    config = model.config
    LeanConfig.from_hf(config)
    layers = []
    for hf in model.model.layers:
        a, m = hf.self_attn, hf.mlp
        layers.append(QuantLayer(
            attn_norm=hf.input_layernorm.weight.detach().float().contiguous(),
            qkv=Q4Weight.from_float(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])).packed(),
            o=Q4Weight.from_float(a.o_proj.weight).packed(),
            ffn_norm=hf.post_attention_layernorm.weight.detach().float().contiguous(),
            gate_up=Q4Weight.from_float(torch.cat([m.gate_proj.weight, m.up_proj.weight])).packed(),
            down=Q4Weight.from_float(m.down_proj.weight).packed()))
    embed = Q8Weight.from_float(model.model.embed_tokens.weight)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    head = embed if tied else Q8Weight.from_float(model.lm_head.weight)
    return QuantLlama(config, layers, model.model.norm.weight.detach(), head, embed=embed)
