"""Import and export of PEFT prompt-learning adapters (bytes in, bytes out; no device code).

PEFT's prefix tuning saves `prompt_embeddings` of shape [num_virtual_tokens, num_layers * 2 * token_dim], where
token_dim = num_kv_heads * head_dim; it views it as [P, layers*2, kv_heads, head_dim] and permutes to
[layers*2, kv_heads, P, head_dim] (keys at even, values at odd indices). Our layout
[layers, 2, kv_heads, P, head_dim] is therefore a pure reshape of PEFT's, and the round trip is bit-exact.

PEFT's seq2seq prefix tuning (task_type SEQ_2_SEQ_LM, e.g. BART) saves the same table, but serves it differently:
with num_transformer_submodules 2 it duplicates the table along the layer axis and hands each decoder layer four
entries (self-attention keys, values, cross-attention keys, values), then discards the cross-attention part. Decoder
layer i therefore gets the table's layer (2 * i) mod layers, as decoder self-attention prefix, positions starting at P.
Import applies that order (so serving equals PEFT generate); export writes the inverse where one exists.

PEFT's prompt tuning saves input embeddings [P, hidden]; turning them into a KV prefix needs the model, so it is
done by `basemodel.convert.prompt_tuning_to_kv`; this module only reads them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from prefix_store.artifact import DEFAULT_MAX_BYTES, ArtifactError, PrefixArtifact, read_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", ".bin", ".pt", ".pth", ".pkl", ".ckpt")
SUPPORTED = ("PREFIX_TUNING", "PROMPT_TUNING")  # prompt learning, read here
LORA = "LORA"  # read by prefix_store/lora.py
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")
# task type -> PEFT's num_transformer_submodules for it (the only value PEFT serves correctly for that task type)
_SUBMODULES = {"CAUSAL_LM": 1, "SEQ_2_SEQ_LM": 2}


@dataclass
class PeftAdapter:
    """A parsed PEFT prompt-learning adapter: its config and its one tensor."""

    peft_type: str  # PREFIX_TUNING or PROMPT_TUNING
    config: dict[str, Any]
    embeddings: torch.Tensor  # PREFIX_TUNING: [P, layers*2*kv_dim]; PROMPT_TUNING: [P, hidden]

    @property
    def num_virtual_tokens(self) -> int:
        """P."""
        return int(self.embeddings.shape[0])


def is_peft_upload(names: list[str] | set[str]) -> bool:
    """True when the file names look like a PEFT adapter directory."""
    return ADAPTER_CONFIG in set(names)


def read_adapter_config(files: dict[str, bytes]) -> dict[str, Any]:
    """The adapter_config.json of a PEFT adapter's files (name -> bytes), after checking that its weights are a
    safetensors file. Pickle checkpoints are refused, never loaded."""
    if ADAPTER_CONFIG not in files:
        raise ArtifactError("files", ADAPTER_CONFIG, sorted(files))
    if ADAPTER_WEIGHTS not in files:
        pickles = [n for n in files if n.endswith(_PICKLE_NAMES)]
        if pickles:
            raise ArtifactError("files", f"{ADAPTER_WEIGHTS} (safetensors)", f"{pickles}: pickle checkpoints are "
                                "not loaded; save the adapter with safe_serialization=True")
        raise ArtifactError("files", ADAPTER_WEIGHTS, sorted(files))
    try:
        cfg = json.loads(files[ADAPTER_CONFIG])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise ArtifactError(ADAPTER_CONFIG, "valid JSON", f"invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ArtifactError(ADAPTER_CONFIG, "a JSON object", type(cfg).__name__)
    if cfg.get("peft_type") not in (*SUPPORTED, LORA):
        raise ArtifactError("adapter_config.peft_type", [*SUPPORTED, LORA], cfg.get("peft_type"))
    return cfg


def parse_peft(files: dict[str, bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> PeftAdapter:
    """Parse a PEFT prompt-learning adapter from its files (name -> bytes); LoRA: prefix_store/lora.py."""
    cfg = read_adapter_config(files)
    peft_type = cfg.get("peft_type")
    if peft_type not in SUPPORTED:
        raise ArtifactError("adapter_config.peft_type", list(SUPPORTED), peft_type)
    task_type = cfg.get("task_type")
    if task_type not in (None, *TASK_TYPES):
        raise ArtifactError("adapter_config.task_type", f"one of {list(TASK_TYPES)}", task_type)
    tensors = read_safetensors(files[ADAPTER_WEIGHTS], max_bytes)
    key = next((k for k in tensors if k.endswith("prompt_embeddings")), None)
    if key is None:
        raise ArtifactError(f"{ADAPTER_WEIGHTS}.keys", "prompt_embeddings", sorted(tensors))
    emb = tensors[key]
    if emb.dim() != 2:
        raise ArtifactError("prompt_embeddings.ndim", 2, emb.dim())
    n = cfg.get("num_virtual_tokens")
    if n is not None and n != emb.shape[0] and cfg.get("num_transformer_submodules", 1) == 1:
        raise ArtifactError("adapter_config.num_virtual_tokens", int(emb.shape[0]), n)
    if emb.shape[0] < 1:
        raise ArtifactError("prompt_embeddings.shape[0]", ">= 1", 0)
    if not torch.isfinite(emb.float()).all():
        raise ArtifactError("prompt_embeddings", "finite values", "NaN/inf values")
    return PeftAdapter(peft_type=peft_type, config=cfg, embeddings=emb)


def task_type_for(fingerprint: dict[str, Any]) -> str:
    """PEFT's task type for the model a fingerprint describes."""
    return "SEQ_2_SEQ_LM" if "num_encoder_layers" in fingerprint else "CAUSAL_LM"


def peft_layer_order(task_type: str, layers: int) -> list[int]:
    """For each decoder layer, the layer of PEFT's prompt_embeddings table that PEFT serves there."""
    n = _SUBMODULES[task_type]
    return [(n * i) % layers for i in range(layers)]


def prefix_tuning_to_kv(adapter: PeftAdapter, fingerprint: dict[str, Any]) -> torch.Tensor:
    """PEFT prefix-tuning embeddings -> our decoder self-attention `kv` [layers, 2, kv_heads, P, head_dim].

    A pure reshape for CAUSAL_LM; for SEQ_2_SEQ_LM the reshape plus PEFT's layer order (module docstring).
    """
    layers, heads, dim = fingerprint["num_layers"], fingerprint["num_kv_heads"], fingerprint["head_dim"]
    cfg = adapter.config
    task = task_type_for(fingerprint)
    if (cfg.get("task_type") or "CAUSAL_LM") != task:
        raise ArtifactError("adapter_config.task_type", task, cfg.get("task_type"))
    for key, want in (("num_layers", layers), ("token_dim", heads * dim), ("num_attention_heads", heads),
                      ("num_transformer_submodules", _SUBMODULES[task])):
        if cfg.get(key) is not None and cfg[key] != want:
            raise ArtifactError(f"adapter_config.{key}", want, cfg[key])
    emb = adapter.embeddings
    width = layers * 2 * heads * dim
    if emb.shape[1] != width:
        raise ArtifactError("prompt_embeddings.shape[1]", f"{width} (layers*2*kv_heads*head_dim)",
                            int(emb.shape[1]))
    p = emb.shape[0]
    # [P, layers*2*kv_dim] -> [P, layers, 2, kv_heads, head_dim] -> [layers, 2, kv_heads, P, head_dim]
    kv = emb.view(p, layers, 2, heads, dim).permute(1, 2, 3, 0, 4)
    return kv[peft_layer_order(task, layers)].contiguous()


def export_peft(artifact: PrefixArtifact, base_model_name: str = "") -> dict[str, bytes]:
    """Our artifact -> a PEFT prefix-tuning adapter directory (file name -> bytes) that PEFT serves identically.

    PEFT can represent a decoder self-attention prefix (`kv`) with positions "after_prefix" only; anything else is
    refused. Decoder-only artifacts round-trip bit-exactly; for seq2seq see `_seq2seq_table`.
    """
    m = artifact.manifest
    extra = sorted(set(artifact.tensors) - {"kv"})
    if extra or "kv" not in artifact.tensors or m.positions != "after_prefix":
        raise ArtifactError("peft_export", "a decoder self-attention prefix (kv) with positions after_prefix, "
                            "all that PEFT's prefix tuning can represent",
                            f"tensors {sorted(artifact.tensors)}, positions {m.positions}")
    task = task_type_for(m.base_model)
    kv = artifact.kv  # [layers, 2, kv_heads, P, head_dim]
    layers, _, heads, p, dim = kv.shape
    table = kv if task == "CAUSAL_LM" else _seq2seq_table(kv)
    # [layers, 2, kv_heads, P, head_dim] -> [P, layers, 2, kv_heads, head_dim] -> [P, layers*2*kv_dim]
    emb = table.permute(3, 0, 1, 2, 4).reshape(p, layers * 2 * heads * dim).contiguous()
    cfg = {
        "peft_type": "PREFIX_TUNING", "task_type": task, "num_virtual_tokens": p,
        "num_layers": layers, "token_dim": heads * dim, "num_attention_heads": heads,
        "encoder_hidden_size": heads * dim, "prefix_projection": False, "inference_mode": True,
        "num_transformer_submodules": _SUBMODULES[task], "base_model_name_or_path": base_model_name,
        "revision": None, "modules_to_save": None,
    }
    return {ADAPTER_CONFIG: json.dumps(cfg, indent=2).encode(),
            ADAPTER_WEIGHTS: st_save({"prompt_embeddings": emb})}


def _seq2seq_table(kv: torch.Tensor) -> torch.Tensor:
    """The PEFT table whose seq2seq layer order serves `kv` [layers, 2, kv_heads, P, head_dim].

    With an odd number of layers the order is a permutation and the table is exact. With an even number, decoder
    layers i and i + layers/2 read the same table layer, so they must be equal (else PEFT cannot represent the
    prefix: refused); the table layers PEFT never reads are written as zeros.
    """
    layers = kv.shape[0]
    table = torch.zeros_like(kv)
    for i, slot in enumerate(peft_layer_order("SEQ_2_SEQ_LM", layers)):
        if slot in peft_layer_order("SEQ_2_SEQ_LM", layers)[:i] and not torch.equal(table[slot], kv[i]):
            raise ArtifactError("peft_export", f"decoder layers {i - layers // 2} and {i} equal (PEFT's seq2seq "
                                f"prefix tuning serves one table layer to both)", "different prefixes")
        table[slot] = kv[i]
    return table


def read_dir(path: str | Path) -> dict[str, bytes]:
    """Read every regular file of a directory (one level) into memory: name -> bytes."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"not a directory: {p}")
    return {f.name: f.read_bytes() for f in p.iterdir() if f.is_file()}


def write_dir(files: dict[str, bytes], path: str | Path) -> Path:
    """Write name -> bytes into a directory (created if missing)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (p / name).write_bytes(data)
    return p
