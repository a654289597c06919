"""Text on the API side of the engine: incremental detokenisation and stop strings (the engine sees token ids only)."""
from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas whose concatenation is the decoded text.

    Decodes a short window around the newest token (TGI's prefix/read offsets) so multi-token characters and
    tokenizers that merge spaces come out right; a delta is held back while it ends in an incomplete character.
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.special = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (special tokens as their name, e.g. '<|endoftext|>')."""
        return self.tok.convert_ids_to_tokens(token_id) if token_id in self.special else self.tok.decode([token_id])

    def add(self, token_id: int) -> str:
        """Add a token; return the new text it completes (special tokens add no text)."""
        if token_id in self.special:
            return ""
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tok.decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tok.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class StopMatcher:
    """Accumulates generated text, finds the first stop string, and holds back text that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add text; return what can be shown now. After a stop string is found, `stopped` is True."""
        if self.stopped or not delta:
            return ""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self.flush()
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        """Return everything not shown yet (at the end of generation)."""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out
