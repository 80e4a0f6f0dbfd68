"""The drafter's context for tokens of plain decoding steps.

While drafting does not pay (adaptive drafting under load), steps run as plain decoding and the
drafter's context pass is skipped, so its KV cache misses those tokens. The drafter leans most on
the newest context, so a request that resumes drafting after a stretch of plain steps would draft
badly for a while. ``ContextBacklog`` keeps the target's features of the most recent plain-step
tokens (a copy per step, no compute) in a fixed ring; when drafting resumes, the proposer writes
their context K/V in one pass before it drafts. Tokens older than the ring stay a gap: drafts
attend to whatever those cache slots hold, which costs acceptance, never correctness (the target
verifies every draft).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch


class ContextBacklog:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._features: torch.Tensor | None = None  # [capacity, n_aux * H], vLLM's aux-layer order
        self._positions: torch.Tensor | None = None  # [capacity]
        self._ptr = 0
        # (start, req_ids, tokens of each, their sum)
        self._segments: deque[tuple[int, list[str], np.ndarray, int]] = deque()

    def __len__(self) -> int:
        return sum(seg[3] for seg in self._segments)

    def pending(self) -> bool:
        return bool(self._segments)

    def record(self, aux: list[torch.Tensor], positions: torch.Tensor, req_ids: list[str],
               counts: np.ndarray, num_tokens: int | None = None) -> None:
        """One plain step: ``aux`` vLLM's aux hidden states ([>= T, H] each), ``positions`` [>= T],
        ``counts`` [R] tokens of each request (batch order) with T their sum (``num_tokens``, when
        the caller knows it). ``req_ids`` and ``counts`` are kept as given, never modified: the
        caller hands over ones it does not change afterwards."""
        t = int(counts.sum()) if num_tokens is None else num_tokens
        if t == 0 or self.capacity <= 0:
            return
        if t > self.capacity:  # one step larger than the ring (a long prompt): keep its tail
            skip = t - self.capacity
            cut = np.minimum(np.cumsum(counts), skip) - np.minimum(np.cumsum(counts) - counts, skip)
            counts = counts - cut
            aux = [h[skip:t] for h in aux]
            positions = positions[skip:t]
            t = self.capacity
        h = aux[0].shape[-1]
        if self._features is None:
            self._features = aux[0].new_empty(self.capacity, h * len(aux))
            self._positions = positions.new_empty(self.capacity)
        if self._ptr + t > self.capacity:
            self._ptr = 0
        start, end = self._ptr, self._ptr + t
        while self._segments and self._overlaps(self._segments[0], start, end):
            self._segments.popleft()  # the oldest tokens give way
        # one copy for all layers (rows of the ring are contiguous): this runs every plain step, and
        # a copy per layer made the plain path ~1% of a CPU step dearer at 16 requests
        torch.cat([a if a.shape[0] == t else a[:t] for a in aux], dim=1, out=self._features[start:end])
        self._positions[start:end] = positions if positions.shape[0] == t else positions[:t]
        self._segments.append((start, req_ids, counts, t))
        self._ptr = end

    @staticmethod
    def _overlaps(segment, start: int, end: int) -> bool:
        s = segment[0]
        return s < end and start < s + segment[3]

    def take(self, row_of: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Features [N, n_aux * H], positions [N] and current batch rows [N] of the recorded tokens
        whose request is in ``row_of`` (req_id -> row), oldest first; the backlog is emptied."""
        idx, rows = [], []
        for start, req_ids, counts, _ in self._segments:
            r = np.array([row_of.get(rid, -1) for rid in req_ids], dtype=np.int64)
            tok_rows = np.repeat(r, counts)
            keep = np.flatnonzero(tok_rows >= 0)
            idx.append(start + keep)
            rows.append(tok_rows[keep])
        self.clear()
        if not idx or not sum(len(i) for i in idx):
            return None
        assert self._features is not None and self._positions is not None
        device = self._features.device
        flat = torch.from_numpy(np.concatenate(idx)).to(device)
        return (self._features[flat], self._positions[flat],
                torch.from_numpy(np.concatenate(rows)).to(device))

    def clear(self) -> None:
        self._segments.clear()
        self._ptr = 0
