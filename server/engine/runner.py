"""How the engine runs one kind of model: a runner per architecture kind, picked from a table by the model spec.

The engine's loop (schedule -> execute -> update), its queue and its running batch are the same for every model;
a runner owns what differs: the slot cache, the checks a request must pass, what the decoder is fed first, the
per-row set-up at admission, and the forward pass of a block of rows. Decoder-only models use `CausalRunner`;
encoder-decoder models (BART) use `server.engine.seq2seq.Seq2SeqRunner`.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import torch

from basemodel.lora import module_table
from basemodel.model import LoadedModel
from server.engine.config import EngineConfig
from server.engine.device_prefix import DevicePrefix
from server.engine.kv_cache import SlotKVCache
from server.engine.lora import LoraLayers, LoraSlotCache
from server.engine.packed import serving_model, shared_copy

if TYPE_CHECKING:
    from server.engine.batch import Row
    from server.engine.request import Request

logger = logging.getLogger(__name__)


class Runner(Protocol):
    """Contract between the engine and a model kind.

    `cache` is the decoder's slot KV cache (the engine's batch places rows in it and moves them). `forward` runs
    rows [row_start, row_start + n) on ids [n, q] written at cache positions write_pos [n, q] (the trash position
    for padding), attending to kv_len cache positions, and returns the logits of the last column [n, V]. Nothing
    here knows about HTTP, text or the request queue.
    """

    cache: SlotKVCache

    def check(self, prompt_ids: list[int], prefix: DevicePrefix | None, max_new_tokens: int) -> None:
        """Raise ValueError naming the problem when a request cannot be served."""

    def decoder_prompt(self, prompt_ids: list[int]) -> list[int] | None:
        """What the decoder is fed before generating, when that is not the prompt itself (else None)."""

    def admit(self, rows: list[Row]) -> None:
        """Per-row set-up of newly admitted rows before they are placed (sets `row.state`)."""

    def planned_bytes(self, rows: int, length: int, admitting: list[Request]) -> int:
        """Bytes the cache would hold with `rows` rows of up to `length` decoder positions once the `admitting`
        requests are placed beside the running rows (what admission checks against `kv_cache_bytes`)."""

    def forward(self, ids: torch.Tensor, write_pos: torch.Tensor, row_start: int, kv_len: int) -> torch.Tensor:
        """Logits [n, V] of the last column for a block of rows."""

    def first_token_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits that choose each row's first generated token (where the model forces one, only it)."""


def causal_mask(write_pos: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, 1, q, kv_len] additive mask: a query at cache position s sees the keys at positions <= s."""
    j = torch.arange(kv_len, device=write_pos.device)
    mask = torch.where(j[None, None, None, :] <= write_pos[:, None, :, None], 0.0, torch.finfo(dtype).min)
    return mask.to(dtype)


def check_decoder_lengths(prompt_len: int, prefix_len: int, max_new_tokens: int, max_seq_len: int,
                          bytes_per_position: int, budget: int, extra_bytes: int = 0, what: str = "inputs") -> None:
    """Raise ValueError when prefix + prompt + max_new_tokens do not fit the context or the KV-cache budget."""
    if prompt_len < 1:
        raise ValueError(f"{what} must contain at least one token")
    total = prompt_len + prefix_len + max_new_tokens
    if total > max_seq_len:
        raise ValueError(f"{what} ({prompt_len} tokens) + prefix ({prefix_len}) + max_new_tokens "
                         f"({max_new_tokens}) = {total} exceeds the maximum sequence length {max_seq_len}")
    alone = (total + 1) * bytes_per_position + extra_bytes
    if alone > budget:
        raise ValueError(f"{what} ({prompt_len} tokens) + prefix ({prefix_len}) + max_new_tokens "
                         f"({max_new_tokens}) need {alone} bytes of KV cache, more than the {budget} configured")


class CausalRunner:
    """Decoder-only models: the prompt is prefilled into the row's cache after its prefix, then decoded. Rows whose
    task is a LoRA adapter add their low-rank updates in the same forward (server/engine/lora.py)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, max_seq_len: int):
        self.loaded, self.spec, self.device = loaded, loaded.spec, loaded.device
        self.config, self.max_seq_len = config, max_seq_len
        # the module tree forwards run on: a copy of the model sharing its parameters, or its copy with prepacked
        # weights (packed.py), with every linear layer wrapped for LoRA rows (lora.py)
        served = serving_model(loaded.model, loaded.device, loaded.dtype, config.packed_weights)
        self.model = shared_copy(served) if served is loaded.model else served
        linear = [name for name, shape in module_table(loaded.model).items() if isinstance(shape, tuple)]
        self.lora_layers = LoraLayers(self.model, linear)
        self.cache = LoraSlotCache(self.lora_layers, self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim,
                                   self.device, loaded.dtype, max_rows=config.row_capacity, max_len=max_seq_len + 1,
                                   prefetch_limit=config.kv_cache_bytes)  # rows grown ahead of time (kv_cache.py)
        self.body, self.head = self._split_head()

    def check(self, prompt_ids: list[int], prefix: DevicePrefix | None, max_new_tokens: int) -> None:
        """Prompt + prefix + max_new_tokens must fit the context and, alone, the KV budget."""
        check_decoder_lengths(len(prompt_ids), prefix.length if prefix else 0, max_new_tokens, self.max_seq_len,
                              self.cache.bytes_per_position, self.config.kv_cache_bytes)

    def decoder_prompt(self, prompt_ids: list[int]) -> list[int] | None:
        """The prompt itself is what the model is fed."""
        return None

    def admit(self, rows: list[Row]) -> None:
        """A row's LoRA adapter (if its task is one) rides along with its cache row; the batch copies prefixes."""
        for r in rows:
            if r.request.lora is not None:
                self.lora_layers.check(r.request.lora)
            r.state = r.request.lora

    def planned_bytes(self, rows: int, length: int, admitting: list[Request]) -> int:
        """The slot cache after `reserve(rows, length)`: prompts live in the decoder slots."""
        return self.cache.planned_bytes(rows, length)

    def first_token_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """No forced tokens."""
        return logits

    def _split_head(self) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
        """(body, head) when logits are just the output embedding of the body's last hidden state, else (None, None).

        Running the body and applying the head to each row's last hidden state (made contiguous) avoids the slow
        batched-matmul path that HF's `logits_to_keep` slice takes for prefill chunks. Whether a model's logits are
        that simple (no soft-capping or scaling) is checked once here on a short input, not assumed per family.
        """
        body, head = getattr(self.model, "base_model", None), self.model.get_output_embeddings()
        if body is None or body is self.model or head is None:
            return None, None
        ids = torch.arange(1, 5, device=self.device)[None] % self.spec.vocab_size
        with torch.inference_mode():
            full = self.model(input_ids=ids).logits[:, -1].float()
            split = head(body(input_ids=ids).last_hidden_state[:, -1]).float()
        if full.shape != split.shape or not torch.allclose(full, split, rtol=1e-3, atol=1e-3 * full.abs().max()):
            logger.info("%s post-processes its logits: using the full forward", self.spec.model_type)
            return None, None
        return body, head

    def forward(self, ids: torch.Tensor, write_pos: torch.Tensor, row_start: int, kv_len: int) -> torch.Tensor:
        """One forward of the model with the slot cache, a 4D mask and explicit position ids (= cache positions)."""
        positions = torch.where(write_pos < self.cache.trash_pos, write_pos, 0)
        mask = causal_mask(write_pos, kv_len, self.loaded.dtype)
        self.cache.prepare(row_start, write_pos, kv_len)
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                      use_cache=True)
        with torch.inference_mode(), self.lora_layers.rows(self.cache.block_loras(row_start, ids.shape[0])):
            if self.head is not None:
                hidden = self.body(**kwargs).last_hidden_state[:, -1, :].contiguous()  # [n, hidden]
                return self.head(hidden)
            return self.model(**kwargs, logits_to_keep=1).logits[:, -1, :]


def _seq2seq(loaded: LoadedModel, config: EngineConfig, max_seq_len: int) -> Runner:
    from server.engine.seq2seq import Seq2SeqRunner  # imported here: decoder-only servers never load it
    return Seq2SeqRunner(loaded, config, max_seq_len)


# model_type -> runner for encoder-decoder families (their encoder, cross-attention and logits differ per family);
# decoder-only models all use CausalRunner
ENCODER_DECODER_RUNNERS = {"bart": _seq2seq}


def make_runner(loaded: LoadedModel, config: EngineConfig, max_seq_len: int) -> Runner:
    """The runner for this model: QuantRunner for a quantised model, by model type for encoder-decoder models,
    CausalRunner otherwise."""
    spec = loaded.spec
    if loaded.quantization == "q4":
        from server.engine.quant_runner import QuantRunner  # imported here: it imports this module
        return QuantRunner(loaded, config, max_seq_len)
    if not spec.is_encoder_decoder:
        return CausalRunner(loaded, config, max_seq_len)
    make = ENCODER_DECODER_RUNNERS.get(spec.model_type)
    if make is None:
        raise ValueError(f"encoder-decoder model type {spec.model_type!r} is not supported "
                         f"(supported: {sorted(ENCODER_DECODER_RUNNERS)})")
    return make(loaded, config, max_seq_len)
