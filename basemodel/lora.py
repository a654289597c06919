"""The loaded model's side of LoRA adapters: which of its modules are linear layers an adapter may target, and
of what shape (prefix_store/lora.py validates an adapter against that table; the engine wraps those modules)."""
from __future__ import annotations

from torch import nn

from prefix_store.lora import ModuleTable


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer PEFT's LoRA adapts (nn.Linear, GPT-2's Conv1D), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # x W + b, W [in, out]
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def module_table(model: nn.Module) -> ModuleTable:
    """Every module path of the model: (in, out) for a linear layer, else the module's class name. A model that is
    not a module tree (the quantised model, server/engine/lean.py) gives the table of the HF model it stands for."""
    if not isinstance(model, nn.Module):
        return model.module_table()
    table: ModuleTable = {}
    for name, module in model.named_modules():
        if name:
            table[name] = linear_shape(module) or type(module).__name__
    return table
