"""Fixtures for engine tests: tiny GPT-2 / LLaMA (GQA) models and PEFT adapters saved to disk."""
from __future__ import annotations

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from tests.tiny import loaded_tiny, tiny_model

# (name, kind of PEFT adapter, number of virtual tokens)
ADAPTERS = [("a3", "prefix", 3), ("b7", "prefix", 7), ("c12", "prefix", 12), ("p5", "prompt", 5)]


def make_peft_adapter(kind: str, method: str, n: int, path, seed: int) -> str:
    """Save a PEFT prefix- or prompt-tuning adapter with random (non-trivial) weights."""
    cfg = (PrefixTuningConfig if method == "prefix" else PromptTuningConfig)(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=n)
    pm = get_peft_model(tiny_model(kind), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def adapters(kind, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp(f"adapters-{kind}")
    return {name: make_peft_adapter(kind, method, n, root / name, seed=i)
            for i, (name, method, n) in enumerate(ADAPTERS)}


@pytest.fixture(scope="session")
def loaded(kind):
    return loaded_tiny(kind)
