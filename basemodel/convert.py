"""Turning uploaded files into a validated prefix artifact for the loaded model (needs the model for prompt tuning).

Running the model is left to whoever owns it: `artifact_from_files(..., run_model=...)` hands the one piece of
model work (a prompt-tuning soft prompt through the frozen model) to `run_model`, which in the server runs it on
the engine's thread between two steps (`Engine.run_exclusive`); tools that own the model alone run it in place.
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers import DynamicCache

from basemodel.lora import module_table
from basemodel.model import LoadedModel
from prefix_store.artifact import (DEFAULT_MAX_BYTES, LORA_KIND, MANIFEST_FILE, TENSORS_FILE, ArtifactError,
                                   PrefixArtifact, build_artifact, validate)
from prefix_store.lora import lora_from_peft, validate_lora
from prefix_store.peft_io import (ADAPTER_WEIGHTS, LORA, is_peft_upload, parse_peft, prefix_tuning_to_kv,
                                  read_adapter_config)


def prompt_tuning_to_kv(loaded: LoadedModel, embeddings: torch.Tensor) -> torch.Tensor:
    """Run a soft prompt [P, hidden] through the frozen model at positions 0..P-1; return its KV prefix.

    Returns [layers, 2, kv_heads, P, head_dim]. Causal attention means the soft prompt's keys and values do not
    depend on what follows, so serving them as a prefix (with the input continuing at position P) is exactly
    PEFT's prompt tuning.
    """
    spec = loaded.spec
    if spec.is_encoder_decoder:  # PEFT's seq2seq prompt tuning feeds the encoder: not a KV prefix
        raise ArtifactError("adapter_config.peft_type", "PREFIX_TUNING for an encoder-decoder model", "PROMPT_TUNING")
    if embeddings.dim() != 2 or embeddings.shape[1] != spec.hidden_size:
        raise ArtifactError("prompt_embeddings.shape", f"[P, {spec.hidden_size}]", list(embeddings.shape))
    if hasattr(loaded.model, "prefix_kv"):  # the quantised model (server/engine/lean.py) runs it itself
        return loaded.model.prefix_kv(embeddings.float()).cpu()
    emb = embeddings.to(device=loaded.device, dtype=loaded.dtype)[None]  # [1, P, hidden]
    cache = DynamicCache(config=loaded.model.config)
    with torch.inference_mode():
        loaded.model(inputs_embeds=emb, past_key_values=cache, use_cache=True,
                     position_ids=torch.arange(emb.shape[1], device=loaded.device)[None], logits_to_keep=1)
    # per layer [1, kv_heads, P, head_dim] -> [layers, 2, kv_heads, P, head_dim]
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    return kv.float().cpu()


ModelWork = Callable[[], torch.Tensor]


def run_here(work: ModelWork) -> torch.Tensor:
    """Run model work in the calling thread (for callers that are the model's only user)."""
    return work()


def artifact_from_files(files: dict[str, bytes], loaded: LoadedModel, *, max_bytes: int = DEFAULT_MAX_BYTES,
                        description: str = "", input_format: str = "",
                        run_model: Callable[[ModelWork], torch.Tensor] = run_here) -> PrefixArtifact:
    """Accept a PEFT adapter (prefix or prompt tuning, LoRA) or the native format; validate against the model. Model
    work (prompt tuning only) goes through `run_model` (see the module docstring)."""
    fp = loaded.spec.fingerprint()
    if is_peft_upload(files) and read_adapter_config(files)["peft_type"] == LORA:
        return lora_from_peft(read_adapter_config(files), files[ADAPTER_WEIGHTS], fp, module_table(loaded.model),
                              max_bytes=max_bytes, description=description, input_format=input_format)
    if is_peft_upload(files):
        adapter = parse_peft(files, max_bytes)
        if adapter.peft_type == "PREFIX_TUNING":
            kv = prefix_tuning_to_kv(adapter, fp)
        else:
            embeddings = adapter.embeddings.float()
            kv = run_model(lambda: prompt_tuning_to_kv(loaded, embeddings))
        base = adapter.config.get("base_model_name_or_path") or ""
        art = build_artifact(kv, fp, description=description, input_format=input_format,
                             source=f"peft:{adapter.peft_type.lower()}", extra={"peft_base_model": base})
    elif MANIFEST_FILE in files and TENSORS_FILE in files:
        art = PrefixArtifact.from_bytes(files[MANIFEST_FILE], files[TENSORS_FILE], max_bytes)
        if description:
            art.manifest.description = description
        if input_format:
            art.manifest.input_format = input_format
    else:
        raise ArtifactError("files", f"a PEFT adapter (adapter_config.json + adapter_model.safetensors) or "
                            f"the native format ({MANIFEST_FILE} + {TENSORS_FILE})", sorted(files))
    if art.manifest.kind == LORA_KIND:
        validate_lora(art, fp, module_table(loaded.model))
    else:
        validate(art, fp)
    return art
