"""Adaptive draft length: how many drafts each request sends, given the load.

Three pieces, each a plain object or function so that they can be tested without vLLM:

* ``StepCostModel``: seconds of one target step against the number of tokens it verifies.
  Seeded by a short profile at start-up, refined online from the running engine's own steps.
* ``AcceptanceCalibrator``: the chance that draft ``i`` is accepted given that drafts ``< i``
  were, as a function of the drafter's own confidence in it; learnt online from what vLLM's
  rejection sampler actually accepts.
* ``choose_draft_lengths``: the cut rule. Expected tokens per step over expected seconds per step
  is the throughput; drafts are added in order of expected gain while they raise it.
  ``speculation_pays`` asks the same question before the drafter runs, from the calibrated
  per-position rates alone: when no draft pays at the current load, the step is plain decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

CostFn = Callable[[torch.Tensor], torch.Tensor]


class StepCostModel:
    """Seconds per step as a piecewise-linear function of the tokens in the step.

    Points live in half-octave buckets of the token count. A bucket with enough online
    observations uses them (an exponential moving average); otherwise its profiled value, scaled
    by how far observed steps run from the profile where both are known. Beyond the largest
    known point the cost grows with the slope of the last two points (never less than flat).
    """

    def __init__(self, ema: float = 0.2, min_observations: int = 2):
        self.ema = ema
        self.min_observations = min_observations
        self.profile: dict[int, tuple[float, float]] = {}  # bucket -> (tokens, seconds)
        self.online: dict[int, list[float]] = {}  # bucket -> [tokens, seconds, count]

    @staticmethod
    def bucket(num_tokens: float) -> int:
        return round(2 * math.log2(max(1.0, float(num_tokens))))

    def set_profile(self, points: dict[int, float]) -> None:
        self.profile = {self.bucket(n): (float(n), float(s)) for n, s in points.items() if s > 0}

    def observe(self, num_tokens: int, seconds: float) -> bool:
        """Record one step; an outlier (an idle gap, > 4x the current estimate) is dropped."""
        if num_tokens <= 0 or not seconds > 0:
            return False
        if self.known() and seconds > 4 * float(self.cost(torch.tensor([float(num_tokens)]))[0]):
            return False
        b = self.bucket(num_tokens)
        cur = self.online.get(b)
        if cur is None:
            self.online[b] = [float(num_tokens), seconds, 1.0]
        else:
            a = max(self.ema, 1.0 / (cur[2] + 1))  # plain mean while few, then an EMA
            cur[0] += a * (num_tokens - cur[0])
            cur[1] += a * (seconds - cur[1])
            cur[2] += 1
        return True

    def known(self) -> bool:
        return bool(self.profile) or any(v[2] >= self.min_observations for v in self.online.values())

    def _scale(self) -> float:
        ratios = [v[1] / self.profile[b][1] for b, v in self.online.items()
                  if v[2] >= self.min_observations and b in self.profile]
        return sorted(ratios)[len(ratios) // 2] if ratios else 1.0

    def points(self) -> list[tuple[float, float]]:
        scale = self._scale()
        merged = {b: (n, s * scale) for b, (n, s) in self.profile.items()}
        for b, (n, s, c) in self.online.items():
            if c >= self.min_observations or b not in merged:
                merged[b] = (n, s)
        return sorted(merged.values())

    def cost(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Seconds for steps of ``num_tokens`` tokens (a float tensor of any shape)."""
        pts = self.points()
        n = num_tokens.to(torch.float64)
        if not pts:
            return torch.ones_like(n)  # nothing known: every step costs the same
        xs = torch.tensor([p[0] for p in pts], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in pts], dtype=torch.float64)
        if len(pts) == 1:
            return torch.full_like(n, float(ys[0]))
        # non-decreasing in tokens: a bigger step never costs less
        ys = torch.cummax(ys, 0).values
        idx = torch.searchsorted(xs, n.clamp(min=float(xs[0]))).clamp(1, len(pts) - 1)
        x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
        slope = (y1 - y0) / (x1 - x0).clamp(min=1e-9)
        return (y0 + slope * (n.clamp(min=float(xs[0])) - x0)).clamp(min=float(ys[0]))


class AcceptanceCalibrator:
    """P(draft ``i`` accepted | drafts ``< i`` accepted) from the drafter's confidence in it.

    Counts per (position, confidence bin), shrunk toward the confidence itself while a bin has
    few observations. Old counts are halved when a position has seen ``horizon`` attempts, so the
    estimate follows the traffic.
    """

    def __init__(self, num_positions: int, bins: int = 10, prior_strength: float = 4.0,
                 prior_rate: float = 0.7, horizon: float = 20_000.0):
        self.bins = bins
        self.prior_strength = prior_strength
        self.prior_rate = prior_rate
        self.horizon = horizon
        self.attempts = torch.zeros(num_positions, bins, dtype=torch.float64)
        self.accepts = torch.zeros(num_positions, bins, dtype=torch.float64)

    def _bin(self, conf: torch.Tensor) -> torch.Tensor:
        return (conf.to(torch.float64).clamp(0, 1) * self.bins).long().clamp(max=self.bins - 1)

    def estimate(self, conf: torch.Tensor) -> torch.Tensor:
        """``conf`` [R, K] drafter probabilities of its drafts -> [R, K] acceptance estimates."""
        k = conf.shape[1]
        b = self._bin(conf)
        pos = torch.arange(k).expand_as(b)
        att, acc = self.attempts[pos, b], self.accepts[pos, b]
        s = self.prior_strength
        return ((acc + s * conf.to(torch.float64)) / (att + s)).clamp(0.0, 0.999)

    def position_rates(self, k: int) -> torch.Tensor:
        """[k] per-position conditional acceptance, all confidences pooled (the pre-draft view)."""
        att, acc = self.attempts[:k].sum(1), self.accepts[:k].sum(1)
        s = self.prior_strength
        return ((acc + s * self.prior_rate) / (att + s)).clamp(0.0, 0.999)

    def observe(self, conf: torch.Tensor, lengths: torch.Tensor, accepted: torch.Tensor) -> None:
        """``conf`` [R, K] confidences of the drafts sent, ``lengths`` [R] how many were sent,
        ``accepted`` [R] how many vLLM accepted. Draft ``i`` was tried iff ``i <= accepted`` and
        ``i < length``; it was accepted iff ``i < accepted``."""
        if conf.numel() == 0:
            return
        k = conf.shape[1]
        i = torch.arange(k)[None]
        tried = (i <= accepted[:, None]) & (i < lengths[:, None])
        ok = i < accepted[:, None]
        b = self._bin(conf)
        pos = i.expand_as(b)
        flat = (pos * self.bins + b)[tried]
        self.attempts.view(-1).index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64))
        self.accepts.view(-1).index_add_(0, (pos * self.bins + b)[tried & ok],
                                         torch.ones(int((tried & ok).sum()), dtype=torch.float64))
        full = self.attempts.sum(1) > self.horizon
        if bool(full.any()):
            self.attempts[full] *= 0.5
            self.accepts[full] *= 0.5


def _best_prefix(gains: torch.Tensor, num_reqs: int, base_tokens: int, step_cost: CostFn,
                 draft_cost: float) -> tuple[torch.Tensor, float]:
    """Sort the flattened gains; the throughput after each prefix; the best prefix length."""
    order = torch.sort(gains.flatten(), descending=True, stable=True).indices
    g = gains.flatten()[order]
    m = int((g > 0).sum())
    order, g = order[:m], g[:m]
    expected = num_reqs + torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(g, 0)])
    tokens = base_tokens + torch.arange(m + 1, dtype=torch.float64)
    rate = expected / (step_cost(tokens).to(torch.float64) + draft_cost)
    best = int(torch.argmax(rate))  # first maximum: the fewest drafts among equals
    return order[:best], float(rate[best])


def choose_draft_lengths(acceptance: torch.Tensor, step_cost: CostFn, base_tokens: int | None = None,
                         draft_cost: float = 0.0, caps: torch.Tensor | None = None) -> torch.Tensor:
    """Per-request draft lengths that maximise expected tokens per second of the next step.

    ``acceptance`` [R, K]: conditional acceptance estimate of each request's draft ``i``; a
    request's expected gain from draft ``i`` is the product up to ``i``. ``step_cost(tokens)``:
    seconds of a target step verifying that many tokens. ``base_tokens``: tokens the step verifies
    besides drafts (default R, one per request). ``draft_cost``: seconds of drafting added to the
    step. ``caps`` [R]: per-request maxima. Returns [R] int64.
    """
    r, k = acceptance.shape
    gains = torch.cumprod(acceptance.to(torch.float64).clamp(0, 1), dim=1)
    if caps is not None:
        gains = gains.masked_fill(torch.arange(k)[None] >= caps.to(torch.long)[:, None], 0.0)
    chosen, _ = _best_prefix(gains, r, r if base_tokens is None else base_tokens, step_cost, draft_cost)
    return torch.bincount(chosen // k, minlength=r) if k else torch.zeros(r, dtype=torch.long)


def speculation_pays(rates: torch.Tensor, num_reqs: int, step_cost: CostFn, draft_cost: float,
                     base_tokens: int | None = None, max_len: int | None = None) -> bool:
    """Whether drafting (paying ``draft_cost``) beats a plain step at this load, judged from the
    per-position rates [K] alone (before the drafter has run)."""
    if num_reqs <= 0 or rates.numel() == 0:
        return False
    base = num_reqs if base_tokens is None else base_tokens
    k = rates.numel() if max_len is None else min(max_len, rates.numel())
    if k <= 0:
        return False
    gains = torch.cumprod(rates[:k].to(torch.float64).clamp(0, 1), 0).expand(num_reqs, k)
    _, spec_rate = _best_prefix(gains, num_reqs, base, step_cost, draft_cost)
    plain_rate = num_reqs / float(step_cost(torch.tensor([float(base)], dtype=torch.float64))[0])
    return spec_rate > plain_rate


class AdaptiveController:
    """The per-engine state behind adaptive drafting; the proposer calls it once per step.

    ``begin_step`` times the target step that just ran (the gap since the last ``end_step``),
    ``observe_outcomes`` learns from how many of last step's drafts vLLM accepted,
    ``should_draft`` decides before the drafter runs, ``cut`` after, ``end_step`` closes the step.
    """

    def __init__(self, max_drafts: int):
        self.max_drafts = max_drafts
        self.step_cost = StepCostModel()
        self.draft_cost = StepCostModel()
        self.calibrator = AcceptanceCalibrator(max_drafts)
        self._last_end: float | None = None
        self.steps = 0
        self.plain_steps = 0

    def begin_step(self, now: float, num_tokens: int) -> None:
        if self._last_end is not None:
            self.step_cost.observe(num_tokens, now - self._last_end)

    def end_step(self, now: float, num_reqs: int = 0, draft_tokens: int = 0, draft_seconds: float = 0.0) -> None:
        self._last_end = now
        self.steps += 1
        if draft_tokens:
            self.draft_cost.observe(draft_tokens, draft_seconds)
        else:
            self.plain_steps += 1

    def observe_outcomes(self, conf: torch.Tensor, lengths: torch.Tensor, accepted: torch.Tensor) -> None:
        self.calibrator.observe(conf, lengths, accepted)

    def _draft_seconds(self, query_tokens: int) -> float:
        if not self.draft_cost.known():
            return 0.0
        return float(self.draft_cost.cost(torch.tensor([float(query_tokens)]))[0])

    def should_draft(self, num_reqs: int, block_tokens: int, max_len: int) -> bool:
        """Before the drafter runs: does a block of ``block_tokens`` query tokens pay at this load?"""
        if max_len <= 0:
            return False
        if not self.step_cost.known():
            return True  # nothing measured yet: draft, and learn
        rates = self.calibrator.position_rates(self.max_drafts)
        return speculation_pays(rates, num_reqs, self.step_cost.cost, self._draft_seconds(block_tokens),
                                max_len=max_len)

    def cut(self, conf: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
        """After the drafter ran (its cost is spent): [R] draft lengths from its confidences [R, K]."""
        if not self.step_cost.known():
            return caps.clamp(max=conf.shape[1])
        return choose_draft_lengths(self.calibrator.estimate(conf), self.step_cost.cost, caps=caps)
