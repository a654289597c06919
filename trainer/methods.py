"""Trainable task modules over a frozen base model: prefix-tuning (MLP or direct), prompt tuning, LoRA, fine-tuning.

Every method exposes the same three things to the training loop: `forward(input_ids, attention_mask) -> logits`
over the input positions, the parameters it trains, and `prefix_kv()` — the KV prefix the server serves
([layers, 2, kv_heads, P, head_dim], cache entries as PEFT's prefix tuning injects them), or None for methods that
change the model's weights (LoRA, fine-tuning); `prefix_tensors()` gives it as the artifact's tensors. The BART
(encoder-decoder) task model, with its three prefixes, is `trainer.seq2seq.Seq2SeqTaskModel`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from basemodel.convert import prompt_tuning_to_kv
from basemodel.model import LoadedModel

logger = logging.getLogger(__name__)

METHODS = ("prefix", "prefix-direct", "prompt", "lora", "finetune")
PREFIX_METHODS = ("prefix", "prefix-direct", "prompt")


@dataclass
class MethodConfig:
    """How the task module is built."""

    method: str = "prefix"
    prefix_length: int = 10  # decoder self-attention prefix (`kv`); for BART 0 leaves it out
    encoder_prefix_length: int | None = None  # BART only: encoder self-attention prefix; None = prefix_length
    cross_prefix_length: int | None = None  # BART only: cross-attention prefix; None = prefix_length
    mid_dim: int = 512  # width of the reparametrisation MLP (prefix only; the paper used 800 for summarisation)
    dropout: float = 0.0  # dropout on the prefix KV during training (prefix, prefix-direct)
    init: str = "random"  # random | words: start from the activations (embeddings) of `init_text`
    init_text: str = "table-to-text:"
    lora_r: int = 8
    lora_alpha: int = 16


def prefix_cache(model: nn.Module, kv: torch.Tensor, batch_size: int) -> DynamicCache:
    """A DynamicCache holding the prefix kv [layers, 2, kv_heads, P, head_dim] for every row of a batch."""
    cache = DynamicCache(config=model.config)
    for i in range(kv.shape[0]):
        k = kv[i, 0].unsqueeze(0).expand(batch_size, -1, -1, -1)  # [B, kv_heads, P, head_dim]
        v = kv[i, 1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        cache.update(k, v, i)
    return cache


def forward_with_prefix(model: nn.Module, kv: torch.Tensor | None, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] with the prefix at cache positions 0..P-1 and the inputs from position P, as served."""
    b, length = input_ids.shape
    p = 0 if kv is None else kv.shape[3]
    cache = prefix_cache(model, kv, b) if kv is not None else None
    mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)  # [B, P+L]
    pos = torch.arange(p, p + length, device=input_ids.device).unsqueeze(0).expand(b, -1)  # [B, L]
    return model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                 use_cache=cache is not None).logits


def _words_kv(loaded: LoadedModel, text: str, length: int) -> torch.Tensor:
    """The frozen model's cache entries for `text`, cycled or cut to `length`: [layers, 2, kv_heads, P, head_dim]."""
    ids = _word_ids(loaded, text, length)
    emb = loaded.model.get_input_embeddings()(ids).detach()  # [P, hidden]
    return prompt_tuning_to_kv(loaded, emb).to(loaded.device)


def _word_ids(loaded: LoadedModel, text: str, length: int) -> torch.Tensor:
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init text {text!r} has no tokens")
    return torch.tensor([ids[i % len(ids)] for i in range(length)], device=loaded.device)


class PrefixMLP(nn.Module):
    """Per-layer key/value prefixes, optionally reparametrised by Embedding(P, hidden) -> MLP (Li & Liang 2021)."""

    def __init__(self, length: int, layers: int, kv_heads: int, head_dim: int, hidden: int, cfg: MethodConfig,
                 reparam: bool):
        super().__init__()
        self.shape = (length, layers, 2, kv_heads, head_dim)
        out = layers * 2 * kv_heads * head_dim
        self.reparam = reparam
        if reparam:
            self.embedding = nn.Embedding(length, hidden)
            self.mlp = nn.Sequential(nn.Linear(hidden, cfg.mid_dim), nn.Tanh(), nn.Linear(cfg.mid_dim, out))
        else:
            self.kv = nn.Parameter(torch.randn(length, out) * 0.02)  # [P, layers*2*kv_dim]
        self.dropout = nn.Dropout(cfg.dropout)

    def flat(self) -> torch.Tensor:
        """[P, layers*2*kv_dim], PEFT's prompt_embeddings layout."""
        if self.reparam:
            return self.mlp(self.embedding.weight)
        return self.kv

    def forward(self) -> torch.Tensor:
        """The prefix as served: [layers, 2, kv_heads, P, head_dim]."""
        # [P, layers*2*kv_dim] -> [P, layers, 2, kv_heads, head_dim] -> [layers, 2, kv_heads, P, head_dim]
        return self.dropout(self.flat().view(self.shape).permute(1, 2, 3, 0, 4))

    def _init_from(self, kv: torch.Tensor, steps: int = 300) -> None:
        # [layers, 2, kv_heads, P, head_dim] -> [P, layers*2*kv_dim]
        target = kv.permute(3, 0, 1, 2, 4).reshape(self.shape[0], -1)
        if not self.reparam:
            self.kv.data.copy_(target)
            return
        # the MLP cannot be set in closed form: regress its output onto the real-word activations
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        for _ in range(steps):
            opt.zero_grad()
            loss = (self.flat() - target).pow(2).mean()
            loss.backward()
            opt.step()
        logger.info("prefix MLP fitted to the activations of the init words (mse %.4g)", loss.item())


class PrefixEncoder(PrefixMLP):
    """The decoder-only model's prefix (`kv`), shaped by its spec; optionally started from real words."""

    def __init__(self, loaded: LoadedModel, cfg: MethodConfig, reparam: bool):
        s = loaded.spec
        super().__init__(cfg.prefix_length, s.num_layers, s.num_kv_heads, s.head_dim, s.hidden_size, cfg, reparam)
        self.to(loaded.device)
        if cfg.init == "words":
            self._init_from(_words_kv(loaded, cfg.init_text, cfg.prefix_length))


class PromptEncoder(nn.Module):
    """Trainable input embeddings [P, hidden] placed before the inputs at positions 0..P-1 (prompt tuning)."""

    def __init__(self, loaded: LoadedModel, cfg: MethodConfig):
        super().__init__()
        emb = loaded.model.get_input_embeddings()
        if cfg.init == "words":
            init = emb(_word_ids(loaded, cfg.init_text, cfg.prefix_length)).detach().clone()
        else:  # random rows of the vocabulary, as in Lester et al.
            rows = torch.randint(0, emb.weight.shape[0], (cfg.prefix_length,), device=loaded.device)
            init = emb.weight[rows].detach().clone()
        self.embeddings = nn.Parameter(init.float())  # [P, hidden]


class TaskModel(nn.Module):
    """A frozen base model plus one method's trainable parameters."""

    positions = "after_prefix"  # the prompt starts at position P, as PEFT and the server place it

    def __init__(self, loaded: LoadedModel, cfg: MethodConfig):
        super().__init__()
        if cfg.method not in METHODS:
            raise ValueError(f"unknown method {cfg.method!r}; choose from {METHODS}")
        if cfg.encoder_prefix_length is not None or cfg.cross_prefix_length is not None:
            raise ValueError("encoder/cross prefix lengths apply to encoder-decoder models (BART) only")
        self.loaded, self.cfg = loaded, cfg
        self.model = loaded.model
        self.model.requires_grad_(False)
        self.encoder: nn.Module | None = None
        if cfg.method in ("prefix", "prefix-direct"):
            self.encoder = PrefixEncoder(loaded, cfg, reparam=cfg.method == "prefix")
        elif cfg.method == "prompt":
            self.encoder = PromptEncoder(loaded, cfg)
        elif cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.05, task_type="CAUSAL_LM")
            self.model = get_peft_model(self.model, lora)
        else:  # finetune
            self.model.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimiser updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] for the input positions."""
        if isinstance(self.encoder, PromptEncoder):
            b, p = input_ids.shape[0], self.encoder.embeddings.shape[0]
            tok = self.model.get_input_embeddings()(input_ids)  # [B, L, hidden]
            soft = self.encoder.embeddings.to(tok.dtype).unsqueeze(0).expand(b, -1, -1)  # [B, P, hidden]
            mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)  # [B, P+L]
            return self.model(inputs_embeds=torch.cat([soft, tok], dim=1), attention_mask=mask).logits[:, p:]
        kv = self.encoder() if isinstance(self.encoder, PrefixEncoder) else None
        return forward_with_prefix(self.model, kv, input_ids, attention_mask)

    @torch.no_grad()
    def prefix_kv(self) -> torch.Tensor | None:
        """The KV prefix to serve [layers, 2, kv_heads, P, head_dim] (float32, CPU), or None for weight methods."""
        if isinstance(self.encoder, PrefixEncoder):
            was = self.encoder.training
            self.encoder.eval()  # no dropout in what is saved
            kv = self.encoder().float().cpu().contiguous()
            self.encoder.train(was)
            return kv
        if isinstance(self.encoder, PromptEncoder):
            return prompt_tuning_to_kv(self.loaded, self.encoder.embeddings.detach())
        return None

    def prefix_tensors(self) -> dict[str, torch.Tensor] | None:
        """The artifact's tensors ({"kv": ...}), or None for weight methods."""
        kv = self.prefix_kv() if self.encoder is not None else None
        return None if kv is None else {"kv": kv}


def parameter_counts(task: nn.Module) -> dict[str, int | float]:
    """Trained parameters (MLP included), parameters stored in the artifact, base-model size, and their shares."""
    base = sum(p.numel() for n, p in task.model.named_parameters() if "lora_" not in n)
    trained = sum(p.numel() for p in task.trainable_parameters())
    tensors = task.prefix_tensors()
    stored = sum(t.numel() for t in tensors.values()) if tensors else trained
    return {"base_params": base, "trained_params": trained, "stored_params": stored,
            "trained_share": trained / base, "stored_share": stored / base}
