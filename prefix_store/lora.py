"""The LoRA task kind: the native artifact (format version 3) and PEFT LoRA import/export. No device code.

A LoRA artifact is the same two files as a prefix (manifest.json + prefix.safetensors), with `kind: "lora"`:

    tensors   "<module>.lora_A": [r, in_features], "<module>.lora_B": [out_features, r]   for each adapted module
    manifest  lora: {"r", "lora_alpha", "use_rslora", "modules": [<module>, ...], "peft_config": {...}}

`<module>` is the module's path in the Hugging Face model (`transformer.h.0.attn.c_attn`, `model.layers.0.self_attn.
q_proj`), the name PEFT saves it under (`base_model.model.<module>.lora_A.weight`), so import and export rename keys
and nothing else: a PEFT adapter round-trips bit-exactly. A module's update is `(x A^T) B^T * scaling`, scaling =
lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), as PEFT computes it; the orientation is the same for GPT-2's Conv1D
(`fan_in_fan_out` only concerns how PEFT merges into the base weight, which the server never does).

Validation needs the model's modules: a `ModuleTable` maps every module path to (in_features, out_features) for a
linear layer (nn.Linear, GPT-2's Conv1D) and to its class name for anything else (basemodel/lora.py builds it).
Variants that compute something else than that update are refused by name (DoRA, biases, modules_to_save, ...).
"""
from __future__ import annotations

import json
import math
from typing import Any

import regex
import torch
from safetensors.torch import save as st_save

from prefix_store.artifact import (DEFAULT_MAX_BYTES, LORA_KIND, ArtifactError, Manifest, PrefixArtifact,
                                   dtype_name, read_safetensors, tensors_sha256)

LORA_FORMAT_VERSION = 3
ModuleTable = dict[str, "tuple[int, int] | str"]  # module path -> (in, out) of a linear layer, else its class name
_PEFT_PREFIX, _PEFT_SUFFIX = "base_model.model.", ".weight"
_REGEX_TIMEOUT_S = 1.0  # a regex target_modules is matched against every module name within this (no ReDoS)

# adapter_config keys whose non-default value makes the adapter compute something the server does not: what it is
REFUSED: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "bias": "trained biases of the base model's layers",
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "fully trained modules saved beside the adapter",
    "layers_to_transform": "LoRA on some layers only",
    "layers_pattern": "LoRA on some layers only",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "exclude_modules": "excluded modules",
    "megatron_config": "Megatron's parallel layers",
    "trainable_token_indices": "trained token embeddings",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on parameters (MoE experts)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}


def _is_off(key: str, value: Any) -> bool:
    if key == "bias":
        return value in (None, "none")
    return value is None or value is False or value == [] or value == {}


def tensor_names(module: str) -> tuple[str, str]:
    """The native tensor names of a module's A and B."""
    return f"{module}.lora_A", f"{module}.lora_B"


def lora_scaling(lora: dict[str, Any]) -> float:
    """PEFT's scaling of a manifest's `lora`: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    r = lora["r"]
    return lora["lora_alpha"] / (math.sqrt(r) if lora["use_rslora"] else r)


# ---------------------------------------------------------------------------------------------- PEFT import
def check_lora_config(cfg: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Refuse what an adapter_config.json of peft_type LORA says the server cannot serve, naming the field."""
    if "num_encoder_layers" in fingerprint:
        raise ArtifactError("adapter_config.peft_type", "PREFIX_TUNING for an encoder-decoder model (LoRA is "
                            "served for decoder-only models)", "LORA")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ArtifactError("adapter_config.task_type", "CAUSAL_LM", cfg.get("task_type"))
    for key, what in REFUSED.items():
        if not _is_off(key, cfg.get(key)):
            raise ArtifactError(f"adapter_config.{key}", "off (plain LoRA)",
                                f"{cfg[key]!r}: {what} is not served; only plain LoRA (and rsLoRA) is")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ArtifactError("adapter_config.r", "an integer >= 1", r)
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ArtifactError("adapter_config.lora_alpha", "a finite number", alpha)
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(key, False), bool):
            raise ArtifactError(f"adapter_config.{key}", "true or false", cfg.get(key))
    target = cfg.get("target_modules")
    if target == "all-linear":
        raise ArtifactError("adapter_config.target_modules", "the module names (PEFT saves all-linear expanded)",
                            target)
    if not (isinstance(target, str) and target) and not (
            isinstance(target, list) and target and all(isinstance(t, str) and t for t in target)):
        raise ArtifactError("adapter_config.target_modules", "a non-empty list of module names or a regex", target)


def targeted_modules(target: str | list[str], names: list[str]) -> list[str]:
    """The module paths PEFT adapts for `target_modules`: a regex matching the whole path, or names matching a
    path or its end after a dot (PEFT's rule)."""
    if isinstance(target, list):
        return [n for n in names if any(n == t or n.endswith("." + t) for t in target)]
    try:
        pattern = regex.compile(target)
        return [n for n in names if pattern.fullmatch(n, timeout=_REGEX_TIMEOUT_S)]
    except regex.error as e:
        raise ArtifactError("adapter_config.target_modules", "a valid regex", f"{target!r} ({e})") from None
    except TimeoutError:
        raise ArtifactError("adapter_config.target_modules", f"a regex that matches within {_REGEX_TIMEOUT_S} s",
                            repr(target)) from None


def _module_of(key: str) -> tuple[str, str]:
    """(module path, "lora_A" | "lora_B") of a PEFT weight key; ArtifactError naming what else it is."""
    for part in ("lora_A", "lora_B"):
        tail = f".{part}{_PEFT_SUFFIX}"
        if key.startswith(_PEFT_PREFIX) and key.endswith(tail) and len(key) > len(_PEFT_PREFIX) + len(tail):
            return key[len(_PEFT_PREFIX):-len(tail)], part
    what = ("embedding LoRA (lora_embedding_A/B) is not served" if "lora_embedding_" in key
            else "DoRA's magnitude vector: DoRA is not served" if "lora_magnitude_vector" in key
            else "a bias on lora_B (lora_bias) is not served" if ".lora_B." in key
            else "not a LoRA weight (base_model.model.<module>.lora_A.weight or .lora_B.weight)")
    raise ArtifactError(f"adapter_model.safetensors.{key}", "LoRA A/B weights of linear layers", what)


def lora_from_peft(cfg: dict[str, Any], weights: bytes, fingerprint: dict[str, Any], table: ModuleTable, *,
                   max_bytes: int = DEFAULT_MAX_BYTES, description: str = "", input_format: str = "",
                   ) -> PrefixArtifact:
    """A PEFT LoRA adapter (its parsed config and adapter_model.safetensors bytes) -> a validated LoRA artifact."""
    check_lora_config(cfg, fingerprint)
    tensors = read_safetensors(weights, max_bytes)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, part = _module_of(key)
        found.setdefault(module, {})[part] = t
    wanted = targeted_modules(cfg["target_modules"], list(table))
    for module in wanted:
        if isinstance(table[module], str):
            raise ArtifactError("adapter_config.target_modules", "linear layers (nn.Linear, GPT-2's Conv1D)",
                                f"{module}, a {table[module]}")
    if not wanted:
        raise ArtifactError("adapter_config.target_modules", "names of this model's linear layers",
                            f"{cfg['target_modules']!r} matches none")
    extra = sorted(set(found) - set(wanted))
    if extra:
        raise ArtifactError("adapter_model.safetensors", f"weights of the modules target_modules names in this "
                            f"model ({len(wanted)})", f"weights of other modules: {extra[:5]}")
    for module in wanted:
        for part in ("lora_A", "lora_B"):
            if part not in found.get(module, {}):
                raise ArtifactError("adapter_model.safetensors", f"{_PEFT_PREFIX}{module}.{part}{_PEFT_SUFFIX}",
                                    "missing")
    native = {}
    for module in wanted:
        a, b = tensor_names(module)
        native[a], native[b] = found[module]["lora_A"], found[module]["lora_B"]
    lora = {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("use_rslora", False)),
            "modules": wanted, "peft_config": cfg}
    art = build_lora_artifact(native, lora, fingerprint, description=description, input_format=input_format,
                              source="peft:lora", extra={"peft_base_model": cfg.get("base_model_name_or_path") or ""})
    validate_lora(art, fingerprint, table)
    return art


def build_lora_artifact(tensors: dict[str, torch.Tensor], lora: dict[str, Any], fingerprint: dict[str, Any], *,
                        description: str = "", source: str = "native", input_format: str = "",
                        extra: dict[str, Any] | None = None) -> PrefixArtifact:
    """A LoRA artifact from its native tensors (moved to CPU, contiguous) and its `lora` manifest entry."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if not tensors:
        raise ArtifactError("tensors", "LoRA weights", "none")
    first = next(iter(tensors.values()))
    m = Manifest(base_model=dict(fingerprint), prefix_length=0, dtype=dtype_name(first),
                 sha256=tensors_sha256(tensors), format_version=LORA_FORMAT_VERSION, kind=LORA_KIND,
                 description=description, source=source, input_format=input_format,
                 nbytes=sum(t.numel() * t.element_size() for t in tensors.values()), extra=dict(extra or {}),
                 lora=dict(lora))
    return PrefixArtifact(m, tensors)


# ---------------------------------------------------------------------------------------------- validation
def _check_lora_entry(lora: dict[str, Any]) -> None:
    for key in ("r", "lora_alpha", "use_rslora", "modules"):
        if key not in lora:
            raise ArtifactError(f"lora.{key}", "present", "missing")
    unknown = sorted(set(lora) - {"r", "lora_alpha", "use_rslora", "modules", "peft_config"})
    if unknown:
        raise ArtifactError("lora", "only r, lora_alpha, use_rslora, modules, peft_config", f"also {unknown}")
    r, alpha, modules = lora["r"], lora["lora_alpha"], lora["modules"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ArtifactError("lora.r", "an integer >= 1", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ArtifactError("lora.lora_alpha", "a finite number", alpha)
    if not isinstance(lora["use_rslora"], bool):
        raise ArtifactError("lora.use_rslora", "true or false", lora["use_rslora"])
    if (not isinstance(modules, list) or not modules or not all(isinstance(x, str) and x for x in modules)
            or len(set(modules)) != len(modules)):
        raise ArtifactError("lora.modules", "a non-empty list of distinct module paths", modules)
    if not isinstance(lora.get("peft_config", {}), dict):
        raise ArtifactError("lora.peft_config", "an object", type(lora["peft_config"]).__name__)


def validate_lora(artifact: PrefixArtifact, fingerprint: dict[str, Any], table: ModuleTable | None = None, *,
                  check_hash: bool = True) -> None:
    """Check a LoRA artifact against the loaded model (its fingerprint; with `table`, every module's shape too);
    raise ArtifactError naming the first mismatch."""
    m = artifact.manifest
    for key, want in fingerprint.items():
        if m.base_model.get(key) != want:
            raise ArtifactError(f"base_model.{key}", want, m.base_model.get(key))
    if "num_encoder_layers" in fingerprint:
        raise ArtifactError("kind", "prefix_kv for an encoder-decoder model (LoRA is served for decoder-only "
                            "models)", m.kind)
    for name in ("prefix_length", "encoder_prefix_length", "cross_prefix_length"):
        if getattr(m, name) != 0:
            raise ArtifactError(name, "0 in a LoRA adapter", getattr(m, name))
    _check_lora_entry(m.lora)
    r, modules = m.lora["r"], m.lora["modules"]
    want = {n for module in modules for n in tensor_names(module)}
    if set(artifact.tensors) != want:
        missing, extra = sorted(want - set(artifact.tensors)), sorted(set(artifact.tensors) - want)
        raise ArtifactError("tensors", "<module>.lora_A and <module>.lora_B for each of lora.modules",
                            f"missing {missing[:4]}, unexpected {extra[:4]}")
    for module in modules:
        _check_module(artifact, module, r, m.dtype, table)
    if check_hash and tensors_sha256(artifact.tensors) != m.sha256:
        raise ArtifactError("sha256", m.sha256, tensors_sha256(artifact.tensors))


def _check_module(artifact: PrefixArtifact, module: str, r: int, dtype: str, table: ModuleTable | None) -> None:
    a_name, b_name = tensor_names(module)
    a, b = artifact.tensors[a_name], artifact.tensors[b_name]
    shape = None if table is None else table.get(module)
    if table is not None and not isinstance(shape, tuple):
        raise ArtifactError(f"lora.modules.{module}", "a linear layer of the model (nn.Linear, GPT-2's Conv1D)",
                            "no such module" if shape is None else f"a {shape}")
    want_a = [r, shape[0] if shape else (a.shape[1] if a.dim() == 2 else -1)]
    want_b = [shape[1] if shape else (b.shape[0] if b.dim() == 2 else -1), r]
    for name, t, w in ((a_name, a, want_a), (b_name, b, want_b)):
        if list(t.shape) != w:
            raise ArtifactError(f"tensors.{name}.shape", f"{w} (r = {r})", list(t.shape))
        found = dtype_name(t)
        if found != dtype:
            raise ArtifactError(f"tensors.{name}.dtype", dtype, found)
        if not torch.isfinite(t).all():
            raise ArtifactError(f"tensors.{name}", "finite values", f"{int((~torch.isfinite(t)).sum())} NaN/inf")


# ---------------------------------------------------------------------------------------------- PEFT export
def export_peft_lora(artifact: PrefixArtifact, base_model_name: str = "") -> dict[str, bytes]:
    """A LoRA artifact -> a PEFT LoRA adapter directory (file name -> bytes): the same tensors under PEFT's keys
    (bit-exact), the adapter_config it was imported with (else one written from the manifest)."""
    lora = artifact.manifest.lora
    cfg = dict(lora.get("peft_config") or {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["r"], "lora_alpha": lora["lora_alpha"],
        "use_rslora": lora["use_rslora"], "target_modules": list(lora["modules"]), "lora_dropout": 0.0,
        "bias": "none", "inference_mode": True, "revision": None, "modules_to_save": None})
    if base_model_name:
        cfg["base_model_name_or_path"] = base_model_name
    weights = {}
    for module in lora["modules"]:
        a, b = tensor_names(module)
        weights[f"{_PEFT_PREFIX}{module}.lora_A{_PEFT_SUFFIX}"] = artifact.tensors[a].contiguous()
        weights[f"{_PEFT_PREFIX}{module}.lora_B{_PEFT_SUFFIX}"] = artifact.tensors[b].contiguous()
    return {"adapter_config.json": json.dumps(cfg, indent=2).encode(), "adapter_model.safetensors": st_save(weights)}
