"""Which request sits in which cache row: a decode block followed by a prefill block, both contiguous.

    cache rows:  [0 ............ n_dec) [n_dec ........ n_dec + n_pre)
                  decoding rows          rows still prefilling their prompt (a chunk per step)

Every forward runs on one contiguous block. Keeping the blocks contiguous when rows come and go costs at most two
row copies (of the positions actually filled) per change, which is small next to a forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.engine.kv_cache import SlotKVCache
from server.engine.request import Request, RequestHandle
from server.engine.sampling import RowSampler


@dataclass(eq=False)
class Row:
    """One admitted request."""

    handle: RequestHandle
    sampler: RowSampler
    length: int  # cache positions filled: prefix + prompt tokens prefilled + generated tokens fed back
    prompt_done: int = 0  # prompt tokens already in the cache
    chunk: int = 0  # prompt tokens fed in the current prefill forward
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    first_token_at: float | None = None
    state: Any = None  # the runner's per-row set-up at admission (seq2seq: cross-attention K/V), until placed

    @property
    def request(self) -> Request:
        """The engine request."""
        return self.handle.request

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet prefilled."""
        return len(self.request.decoder_prompt) - self.prompt_done


class RunningBatch:
    """The rows of the running batch and their places in the slot cache."""

    def __init__(self, cache: SlotKVCache):
        self.cache = cache
        self.decoding: list[Row] = []  # decoding[i] is in cache row i
        self.prefilling: list[Row] = []  # prefilling[j] is in cache row len(decoding) + j

    def __len__(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    def all_rows(self) -> list[Row]:
        """Decoding rows, then prefilling rows."""
        return self.decoding + self.prefilling

    def longest(self) -> int:
        """The largest final length among the rows (what the cache must hold per row)."""
        return max((r.request.final_length for r in self.all_rows()), default=0)

    def used_len(self) -> int:
        """The largest number of filled positions among the rows."""
        return max((r.length for r in self.all_rows()), default=0)

    def add(self, rows: list[Row]) -> None:
        """Place new rows at the end of the prefill block (one cache reservation for all of them) and copy each
        row's prefix (and the runner's per-row state) into its cache row (once); all of them, or none."""
        longest = max([self.longest()] + [r.request.final_length for r in rows])
        self.cache.reserve(len(self) + len(rows), longest, self.used_len())
        placed = len(self.prefilling)
        try:
            for row in rows:
                self.cache.admit_row(len(self), row.request.prefix, row.state)
                self.prefilling.append(row)
        except BaseException:  # all or none: the rows placed so far leave again (they sit at the block's end)
            del self.prefilling[placed:]
            raise
        for row in rows:
            row.state = None

    def promote(self, row: Row) -> None:
        """Move a fully prefilled row to the end of the decode block."""
        j = self.prefilling.index(row)
        first = len(self.decoding)
        if j != 0:  # bring it to the front of the prefill block, which is where the decode block ends
            other = self.prefilling[0]
            self.cache.swap_rows(first, first + j, max(row.length, other.length))
            self.prefilling[0], self.prefilling[j] = row, other
        self.decoding.append(self.prefilling.pop(0))

    def remove(self, row: Row) -> None:
        """Take a row out of whichever block holds it, filling the hole so both blocks stay contiguous."""
        if row in self.prefilling:
            j = self.prefilling.index(row)
            last = len(self.prefilling) - 1
            base = len(self.decoding)
            if j != last:
                moved = self.prefilling[last]
                self.cache.move_row(base + last, base + j, moved.length)
                self.prefilling[j] = moved
            self.prefilling.pop()
            return
        i = self.decoding.index(row)
        last = len(self.decoding) - 1
        if i != last:
            moved = self.decoding[last]
            self.cache.move_row(last, i, moved.length)
            self.decoding[i] = moved
        self.decoding.pop()
        if self.prefilling:  # the prefill block now starts one row earlier: its last row fills the gap
            src = last + len(self.prefilling)
            moved = self.prefilling.pop()
            if src != last:
                self.cache.move_row(src, last, moved.length)
            self.prefilling.insert(0, moved)
