"""Prompts to token ids for the routes, off the event loop: each prompt's size is checked against
`max_prompt_bytes` before any tokenisation (413 naming the field), then the tokenizer (and a chat template) runs on
this module's own threads, so a long prompt never stalls other requests, /health or the streams being written.

A fast tokenizer releases the GIL while it works; a pure-Python one is preempted every few milliseconds. Either
way the event loop keeps running. The pool is small and its own, so a burst of long prompts waits for it rather
than taking the default executor's threads (store I/O, start-up) or every core from the engine thread."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from server.api.errors import APIError, validation
from server.api.limits import check_text
from server.engine.sampling import StopParts, phrase_spellings

logger = logging.getLogger(__name__)
THREADS = 2
STOP_PARTS_CACHED = 64
T = TypeVar("T")


def prompt_too_large(field: str, nbytes: int, cap: int) -> APIError:
    """The 413 for prompt text over the byte cap, naming the field."""
    return APIError(413, f"{field}: {nbytes} bytes of text, more than the limit of {cap} bytes "
                         "(--max-prompt-bytes)", "too_large")


class Tokenizing:
    """The model's tokenizer behind a byte cap and its own threads."""

    def __init__(self, tokenizer: Any, max_prompt_bytes: int, threads: int = THREADS):
        self.tokenizer, self.max_prompt_bytes = tokenizer, max_prompt_bytes
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
        self._token_texts: list[str] | None = None  # each id's text alone, built on first need
        self._stop_parts: OrderedDict[str, StopParts] = OrderedDict()  # the last STOP_PARTS_CACHED stops' parts
        self._stop_parts_lock = threading.Lock()

    async def must_include(self, phrases: list[list[str]], stops: list[str]) -> dict[str, tuple]:
        """`SamplingParams` fields for must_include: `must_include` (each phrase's alternatives as they tokenise
        alone and after a space, without special tokens), `hold_ids` (the ids whose own text holds a stop string)
        and `stop_parts` (each stop spread over several tokens): a row must not end before its phrases appear."""
        def work():
            tok = self.tokenizer
            fields: dict[str, tuple] = {"must_include": phrase_spellings(tok, phrases), "hold_ids": (),
                                        "stop_parts": ()}
            if stops:
                if self._token_texts is None:
                    self._token_texts = tok.batch_decode([[i] for i in range(len(tok))])
                fields["hold_ids"] = tuple(i for i, t in enumerate(self._token_texts) if any(s in t for s in stops))
                fields["stop_parts"] = tuple(self._parts(s) for s in dict.fromkeys(stops))
            return fields
        return await self._run(work)

    def _parts(self, stop: str) -> StopParts:
        """`StopParts` of one stop string, built once while it stays among the last STOP_PARTS_CACHED used."""
        with self._stop_parts_lock:
            parts = self._stop_parts.pop(stop, None)
        parts = parts or StopParts.build(stop, self._token_texts or [])
        with self._stop_parts_lock:
            self._stop_parts[stop] = parts
            while len(self._stop_parts) > STOP_PARTS_CACHED:
                self._stop_parts.popitem(last=False)
        return parts

    def close(self) -> None:
        """Stop the threads (work still queued is dropped)."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def check(self, texts: list[tuple[str, str]], field: str) -> None:
        """Refuse texts (each (field, text)) that are not valid Unicode (422) or together pass the cap (413)."""
        nbytes = sum(len(check_text(text, name).encode("utf-8")) for name, text in texts)
        if nbytes > self.max_prompt_bytes:
            raise prompt_too_large(field, nbytes, self.max_prompt_bytes)

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: text generation is unavailable", "validation")
        return await asyncio.get_running_loop().run_in_executor(self.pool, work, *args)

    async def encode(self, text: Any, field: str = "inputs", truncate: int | None = None) -> list[int]:
        """Token ids of one prompt (with the tokenizer's default special tokens); the last `truncate` kept."""
        return (await self.encode_many([text], field, truncate))[0]

    async def encode_many(self, texts: list[Any], field: str, truncate: int | None = None) -> list[list[int]]:
        """Token ids of each prompt of one request; their bytes together are capped."""
        for text in texts:
            if not isinstance(text, str) or not text:
                raise validation(f"{field}: must be a non-empty string")
        self.check([(field, t) for t in texts], field)
        out = await self._run(lambda: [self.tokenizer(t)["input_ids"] for t in texts])
        for ids in out:
            if truncate is not None:
                ids[:] = ids[-truncate:]
            if not ids:
                raise validation(f"{field}: must contain at least one token")
        return out

    async def encode_chat(self, convo: list[dict[str, str]], field: str = "messages") -> list[int]:
        """Token ids of a conversation through the chat template (which writes any BOS itself)."""
        tok = self.tokenizer
        if tok is not None and not getattr(tok, "chat_template", None):
            raise validation("model: the base model has no chat template; use /v1/completions")
        self.check([(f"{field}[{i}].content", m["content"]) for i, m in enumerate(convo)], field)
        return await self._run(self._chat_ids, convo, field)

    def _chat_ids(self, convo: list[dict[str, str]], field: str) -> list[int]:
        """On a tokenizer thread: render the template, check what it made (it may add text), tokenise."""
        try:
            text = self.tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject roles or orders (jinja raises its own errors)
            raise validation(f"{field}: the chat template refused them ({e})") from None
        self.check([(field, text)], field)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise validation(f"{field}: the chat template produced no tokens")
        return ids
