"""Encoder-decoder (BART) training and decoding: Li & Liang's three prefixes, fine-tuning, batches, beam search.

The linearised input goes to the encoder (tokenised as the server tokenises `inputs`: the tokenizer's default
special tokens, `<s> ... </s>` for BART); the target is the decoder's text, `<s> text </s>`, fed shifted right
behind `decoder_start_token_id` (the Hugging Face BART fine-tuning recipe). Loss is on every target token.

Prefix-tuning learns three independent prefixes, each with its own length and its own reparametrisation
(Embedding(P, d_model) -> Linear(d_model, mid) -> Tanh -> Linear(mid, layers*2*kv_dim)), as in Li & Liang's BART
code: `encoder_kv` (encoder self-attention), `kv` (decoder self-attention), `cross_kv` (cross-attention). They are
applied by `trainer.bart_prefix` with decoder positions starting at 0 ("from_zero", as in their code) and saved
without the MLPs as a format-2 artifact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from basemodel.model import LoadedModel
from prefix_store.artifact import PrefixArtifact
from trainer.bart_prefix import apply_prefixes, generation_ids, prefix_logits
from trainer.data import Example, prompt_for
from trainer.generate import search_many
from trainer.methods import MethodConfig, PrefixMLP

SEQ2SEQ_METHODS = ("prefix", "prefix-direct", "finetune")
TRAINED_POSITIONS = "from_zero"  # where the trainer's BART prefixes put the decoder's first position


def prefix_lengths(cfg: MethodConfig) -> dict[str, int]:
    """Tensor name -> prefix length (the encoder and cross lengths default to `prefix_length`); 0 = no tensor."""
    enc = cfg.prefix_length if cfg.encoder_prefix_length is None else cfg.encoder_prefix_length
    cross = cfg.prefix_length if cfg.cross_prefix_length is None else cfg.cross_prefix_length
    return {"encoder_kv": enc, "kv": cfg.prefix_length, "cross_kv": cross}


def _prefix_shape(config: Any, name: str) -> tuple[int, int, int]:
    """(layers, heads, head_dim) of one prefix tensor for this BART config."""
    side = "encoder" if name == "encoder_kv" else "decoder"
    layers, heads = getattr(config, f"{side}_layers"), getattr(config, f"{side}_attention_heads")
    return layers, heads, config.d_model // heads


class Seq2SeqTaskModel(nn.Module):
    """A BART model plus one method's trainable parameters: prefixes (frozen model) or all weights (finetune)."""

    positions = TRAINED_POSITIONS

    def __init__(self, loaded: LoadedModel, cfg: MethodConfig):
        super().__init__()
        if cfg.method not in SEQ2SEQ_METHODS:
            raise ValueError(f"method {cfg.method!r} is not available for encoder-decoder models; "
                             f"choose from {SEQ2SEQ_METHODS}")
        if cfg.init != "random":
            raise ValueError("--init words is implemented for decoder-only models only; use --init random")
        start = generation_ids(loaded.model)[0]
        if loaded.tokenizer is not None and start != tokenizer_start_id(loaded.tokenizer):
            raise ValueError(f"decoder_start_token_id {start} is not the tokenizer's EOS "
                             f"{tokenizer_start_id(loaded.tokenizer)}: the batches follow BART's convention")
        self.loaded, self.cfg, self.model = loaded, cfg, loaded.model
        self.model.requires_grad_(cfg.method == "finetune")
        self.prefixes = nn.ModuleDict()
        if cfg.method != "finetune":
            lengths = prefix_lengths(cfg)
            if any(n < 0 for n in lengths.values()) or not any(lengths.values()):
                raise ValueError(f"prefix lengths must be >= 0 with at least one > 0, got {lengths}")
            c = self.model.config
            for name, length in lengths.items():
                if length:
                    self.prefixes[name] = PrefixMLP(length, *_prefix_shape(c, name), c.d_model, cfg,
                                                    reparam=cfg.method == "prefix")
            self.prefixes.to(loaded.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimiser updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for the decoder inputs; every row gets the same prefixes."""
        tensors = {name: enc() for name, enc in self.prefixes.items()}
        return prefix_logits(self.model, input_ids, attention_mask, decoder_input_ids, tensors, self.positions)

    @torch.no_grad()
    def prefix_tensors(self) -> dict[str, torch.Tensor] | None:
        """The artifact's tensors (MLP outputs in eval mode, float32, CPU), or None for fine-tuning."""
        if not len(self.prefixes):
            return None
        was = self.prefixes.training
        self.prefixes.eval()  # no dropout in what is saved
        out = {name: enc().float().cpu().contiguous() for name, enc in self.prefixes.items()}
        self.prefixes.train(was)
        return out


# ---------------------------------------------------------------- batches

def encode_seq2seq(tokenizer: Any, examples: list[Example], max_len: int) -> list[tuple[list[int], ...]]:
    """(encoder ids, decoder input ids, labels) per example; the decoder input is the target shifted right."""
    start = tokenizer_start_id(tokenizer)
    out = []
    for e in examples:
        src = tokenizer(prompt_for(e.input))["input_ids"][:max_len]
        target = tokenizer(e.output)["input_ids"][:max_len]
        out.append((src, [start] + target[:-1], target))
    return out


def tokenizer_start_id(tokenizer: Any) -> int:
    """BART's decoder start token: its EOS (`</s>`), as in every BART config (`decoder_start_token_id` 2)."""
    return tokenizer.eos_token_id


def collate_seq2seq(rows: list[tuple[list[int], ...]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded encoder ids, their mask, decoder inputs and labels (-100 on padding): [B, S], [B, S], [B, T] x2."""
    s, t = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    ids = torch.full((len(rows), s), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), s), dtype=torch.long)
    dec = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    for i, (x, d, y) in enumerate(rows):
        ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
        dec[i, :len(d)], labels[i, :len(y)] = torch.tensor(d), torch.tensor(y)
    return ids.to(device), mask.to(device), dec.to(device), labels.to(device)


def seq2seq_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against labels [B, T] (already aligned; -100 ignored)."""
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


# ---------------------------------------------------------------- decoding

@dataclass
class Seq2SeqPrefix:
    """What BART decoding needs from an artifact: its tensors by name and the decoder position convention."""

    tensors: dict[str, torch.Tensor]
    positions: str

    @classmethod
    def from_artifact(cls, art: PrefixArtifact) -> Seq2SeqPrefix:
        """The tensors and positions of a (validated) format-2 artifact."""
        return cls(dict(art.tensors), art.manifest.positions)


class Seq2SeqSteps:
    """Steps for BART (`trainer.generate.search_many`): the encoder once over the inputs (right-padded, masked),
    then one decoder token per row (cached self/cross K/V).

    Must run inside `apply_prefixes` for the prefixes to apply. Forces the generation config's
    `forced_bos_token_id` as the first token, as HF generate does for BART.
    """

    def __init__(self, model: nn.Module, inputs: list[list[int]]):
        from transformers import DynamicCache, EncoderDecoderCache

        self.model = model
        dev = next(model.parameters()).device
        longest = max(len(q) for q in inputs)
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        ids = torch.full((len(inputs), longest), pad, dtype=torch.long, device=dev)
        self.mask = torch.zeros_like(ids)  # [n, S]
        for i, q in enumerate(inputs):
            ids[i, :len(q)] = torch.tensor(q, device=dev)
            self.mask[i, :len(q)] = 1
        self.enc = model.get_encoder()(input_ids=ids, attention_mask=self.mask).last_hidden_state  # [n, S, D]
        self.cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
        self.start, self.forced_bos, _ = generation_ids(model)
        self.dev = dev

    def _logp(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(encoder_outputs=(self.enc,), attention_mask=self.mask, decoder_input_ids=tokens[:, None],
                         past_key_values=self.cache, use_cache=True)
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [n, V]

    def start_logp(self) -> torch.Tensor:
        """Log-probs of each input's first token [n, V] (all mass on the forced BOS when the config forces one)."""
        logp = self._logp(torch.full((self.enc.shape[0],), self.start, device=self.dev))
        if self.forced_bos is not None:
            logp = torch.full_like(logp, float("-inf"))
            logp[:, self.forced_bos] = 0.0
        return logp

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Log-probs [m, V] after appending one token to each row."""
        return self._logp(torch.tensor(tokens, device=self.dev))

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep / duplicate / drop rows: the caches, encoder states and masks follow."""
        self.cache.reorder_cache(rows)
        self.enc, self.mask = self.enc[rows], self.mask[rows]


@torch.no_grad()
def generate_seq2seq(model: nn.Module, input_ids: list[int], prefix: Seq2SeqPrefix | None, stop_ids: set[int],
                     num_beams: int = 1, max_new_tokens: int = 64, length_penalty: float = 1.0) -> list[int]:
    """Generated ids (stop token excluded) for one encoder input; greedy when num_beams=1, else beam search."""
    return generate_seq2seq_many(model, [input_ids], prefix, stop_ids, num_beams, max_new_tokens, length_penalty)[0]


@torch.no_grad()
def generate_seq2seq_many(model: nn.Module, inputs: list[list[int]], prefix: Seq2SeqPrefix | None,
                          stop_ids: set[int], num_beams: int = 1, max_new_tokens: int = 64,
                          length_penalty: float = 1.0, batch_size: int = 16,
                          progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """`generate_seq2seq` for many encoder inputs, `batch_size` at a time, their beams sharing each decoder step
    (`trainer.generate.search_many`): each input's result is the one it gets alone."""
    tensors, positions = (prefix.tensors, prefix.positions) if prefix else ({}, TRAINED_POSITIONS)
    dev = next(model.parameters()).device
    tensors = {k: v.to(dev) for k, v in tensors.items()}
    with apply_prefixes(model, tensors, positions):
        return search_many(lambda batch: Seq2SeqSteps(model, batch), inputs, stop_ids, num_beams, max_new_tokens,
                           length_penalty, batch_size, progress)
