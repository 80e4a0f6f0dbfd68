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

import numpy as np

# The rule runs every engine step on a handful of numbers: NumPy on the host, not torch (whose
# per-op overhead would cost more than the whole decision).
CostFn = Callable[[np.ndarray], np.ndarray]


class StepCostModel:
    """Seconds per step as a piecewise-linear function of the tokens in the step.

    Points live in half-octave buckets of the token count. A bucket with enough online
    observations uses them (an exponential moving average); otherwise its profiled value, scaled
    by how far observed steps run from the profile where both are known. Beyond the largest
    known point the cost grows with the slope of the last two points (never less than flat).
    """

    def __init__(self, ema: float = 0.2, min_observations: int = 2, refresh_every: int = 16):
        self.ema = ema
        self.min_observations = min_observations
        self.refresh_every = refresh_every
        self._observed = 0
        self.profile: dict[int, tuple[float, float]] = {}  # bucket -> (tokens, seconds)
        self.online: dict[int, list[float]] = {}  # bucket -> [tokens, seconds, count]
        self._curve: tuple[np.ndarray, np.ndarray] | None = None  # cached points(), None = stale

    @staticmethod
    def bucket(num_tokens: float) -> int:
        return round(2 * math.log2(max(1.0, float(num_tokens))))

    def set_profile(self, points: dict[int, float]) -> None:
        self.profile = {self.bucket(n): (float(n), float(s)) for n, s in points.items() if s > 0}
        self._curve = None

    def observe(self, num_tokens: int, seconds: float) -> bool:
        """Record one step; an outlier (an idle gap, > 4x the current estimate) is dropped."""
        if num_tokens <= 0 or not seconds > 0:
            return False
        b = self.bucket(num_tokens)
        cur = self.online.get(b)
        usual = cur[1] if cur is not None and cur[2] >= self.min_observations else (
            self.cost1(num_tokens) if self.known() else None)
        if usual is not None and seconds > 4 * usual:
            return False
        if cur is None:
            self.online[b] = [float(num_tokens), seconds, 1.0]
        else:
            a = max(self.ema, 1.0 / (cur[2] + 1))  # plain mean while few, then an EMA
            cur[0] += a * (num_tokens - cur[0])
            cur[1] += a * (seconds - cur[1])
            cur[2] += 1
        self._observed += 1
        if cur is None or cur[2] == self.min_observations or self._observed % self.refresh_every == 0:
            self._curve = None  # a new bucket at once; otherwise the EMA moves slowly: refresh now and then
        return True

    def known(self) -> bool:
        return bool(self.profile) or any(v[2] >= self.min_observations for v in self.online.values())

    def _scale(self) -> float:
        ratios = sorted(v[1] / self.profile[b][1] for b, v in self.online.items()
                        if v[2] >= self.min_observations and b in self.profile)
        return ratios[len(ratios) // 2] if ratios else 1.0

    def points(self) -> list[tuple[float, float]]:
        scale = self._scale()
        merged = {b: (n, s * scale) for b, (n, s) in self.profile.items()}
        for b, (n, s, c) in self.online.items():
            if c >= self.min_observations or b not in merged:
                merged[b] = (n, s)
        return sorted(merged.values())

    def _xy(self) -> tuple[np.ndarray, np.ndarray]:
        if self._curve is None:
            pts = self.points()
            xs = np.array([p[0] for p in pts], dtype=np.float64)
            ys = np.maximum.accumulate(np.array([p[1] for p in pts], dtype=np.float64)) if pts else xs
            self._curve = (xs, ys)  # ys non-decreasing: a bigger step never costs less
        return self._curve

    def cost(self, num_tokens) -> np.ndarray:
        """Seconds for steps of ``num_tokens`` tokens (array-like of any shape)."""
        n = np.asarray(num_tokens, dtype=np.float64)
        xs, ys = self._xy()
        if len(xs) == 0:
            return np.ones_like(n)  # nothing known: every step costs the same
        out = np.interp(n, xs, ys)
        if len(xs) > 1:
            slope = max(0.0, (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9))
            out = np.where(n > xs[-1], ys[-1] + slope * (n - xs[-1]), out)
        return out

    def cost1(self, num_tokens: float) -> float:
        return float(self.cost(float(num_tokens)))


class AcceptanceCalibrator:
    """P(draft ``i`` accepted | drafts ``< i`` accepted) from the drafter's confidence in it.

    Counts per (position, confidence bin), shrunk toward the same bin pooled over positions, and
    that toward the confidence itself, while they have few observations. Old counts are halved when a position has seen ``horizon`` attempts, so the
    estimate follows the traffic.
    """

    def __init__(self, num_positions: int, bins: int = 10, prior_strength: float = 4.0,
                 prior_rate: float = 0.7, horizon: float = 20_000.0):
        self.bins = bins
        self.prior_strength = prior_strength
        self.prior_rate = prior_rate
        self.horizon = horizon
        self.attempts = np.zeros((num_positions, bins), dtype=np.float64)
        self.accepts = np.zeros((num_positions, bins), dtype=np.float64)

    def _bin(self, conf: np.ndarray) -> np.ndarray:
        return np.minimum((np.clip(conf, 0, 1) * self.bins).astype(np.int64), self.bins - 1)

    def estimate(self, conf) -> np.ndarray:
        """``conf`` [R, K] drafter probabilities of its drafts -> [R, K] acceptance estimates."""
        conf = np.asarray(conf, dtype=np.float64)
        b = self._bin(conf)
        pos = np.broadcast_to(np.arange(conf.shape[1]), b.shape)
        s = self.prior_strength
        # shrink each (position, bin) cell toward its bin pooled over positions, and that toward the
        # confidence itself: the calibration is learnt from every position at once
        pooled = (self.accepts.sum(0)[b] + s * conf) / (self.attempts.sum(0)[b] + s)
        est = (self.accepts[pos, b] + s * pooled) / (self.attempts[pos, b] + s)
        return np.clip(est, 0.0, 0.999)

    def position_rates(self, k: int) -> np.ndarray:
        """[k] per-position conditional acceptance, all confidences pooled (the pre-draft view)."""
        att, acc = self.attempts[:k].sum(1), self.accepts[:k].sum(1)
        s = self.prior_strength
        return np.clip((acc + s * self.prior_rate) / (att + s), 0.0, 0.999)

    def observe(self, conf, lengths, accepted) -> None:
        """``conf`` [R, K] confidences of the drafts sent, ``lengths`` [R] how many were sent,
        ``accepted`` [R] how many vLLM accepted. Draft ``i`` was tried iff ``i <= accepted`` and
        ``i < length``; it was accepted iff ``i < accepted``."""
        conf = np.asarray(conf, dtype=np.float64)
        if conf.size == 0:
            return
        lengths, accepted = np.asarray(lengths)[:, None], np.asarray(accepted)[:, None]
        i = np.arange(conf.shape[1])[None]
        tried = (i <= accepted) & (i < lengths)
        ok = tried & (i < accepted)
        cell = np.broadcast_to(i, conf.shape) * self.bins + self._bin(conf)
        np.add.at(self.attempts.reshape(-1), cell[tried], 1.0)
        np.add.at(self.accepts.reshape(-1), cell[ok], 1.0)
        full = self.attempts.sum(1) > self.horizon
        if full.any():
            self.attempts[full] *= 0.5
            self.accepts[full] *= 0.5


def _best_prefix(gains: np.ndarray, num_reqs: int, base_tokens: int, step_cost: CostFn,
                 draft_cost: float) -> tuple[np.ndarray, float]:
    """Sort the flattened gains; the throughput after each prefix; the best prefix length."""
    flat = gains.reshape(-1)
    order = np.argsort(-flat, kind="stable")
    g = flat[order]
    m = int((g > 0).sum())
    order, g = order[:m], g[:m]
    expected = num_reqs + np.concatenate(([0.0], np.cumsum(g)))
    tokens = base_tokens + np.arange(m + 1, dtype=np.float64)
    rate = expected / (np.asarray(step_cost(tokens), dtype=np.float64) + draft_cost)
    best = int(np.argmax(rate))  # first maximum: the fewest drafts among equals
    return order[:best], float(rate[best])


def choose_draft_lengths(acceptance, step_cost: CostFn, base_tokens: int | None = None,
                         draft_cost: float = 0.0, caps=None) -> np.ndarray:
    """Per-request draft lengths that maximise expected tokens per second of the next step.

    ``acceptance`` [R, K]: conditional acceptance estimate of each request's draft ``i``; a
    request's expected gain from draft ``i`` is the product up to ``i``. ``step_cost(tokens)``:
    seconds of a target step verifying that many tokens. ``base_tokens``: tokens the step verifies
    besides drafts (default R, one per request). ``draft_cost``: seconds of drafting added to the
    step. ``caps`` [R]: per-request maxima. Returns [R] int64.
    """
    acc = np.clip(np.asarray(acceptance, dtype=np.float64), 0, 1)
    r, k = acc.shape
    gains = np.cumprod(acc, axis=1)
    if caps is not None:
        gains = np.where(np.arange(k)[None] >= np.asarray(caps)[:, None], 0.0, gains)
    chosen, _ = _best_prefix(gains, r, r if base_tokens is None else base_tokens, step_cost, draft_cost)
    return np.bincount(chosen // k, minlength=r).astype(np.int64) if k else np.zeros(r, dtype=np.int64)


def speculation_pays(rates, num_reqs: int, step_cost: CostFn, draft_cost: float,
                     base_tokens: int | None = None, max_len: int | None = None) -> bool:
    """Whether drafting (paying ``draft_cost``) beats a plain step at this load, judged from the
    per-position rates [K] alone (before the drafter has run)."""
    rates = np.asarray(rates, dtype=np.float64)
    if num_reqs <= 0 or rates.size == 0:
        return False
    base = num_reqs if base_tokens is None else base_tokens
    k = rates.size if max_len is None else min(max_len, rates.size)
    if k <= 0:
        return False
    gains = np.broadcast_to(np.cumprod(np.clip(rates[:k], 0, 1)), (num_reqs, k))
    _, spec_rate = _best_prefix(gains, num_reqs, base, step_cost, draft_cost)
    plain_rate = num_reqs / float(np.asarray(step_cost(np.array([float(base)])))[0])
    return spec_rate > plain_rate


class AdaptiveController:
    """The per-engine state behind adaptive drafting; the proposer calls it once per step.

    ``begin_step`` times the target step that just ran (the gap since the last ``end_step``),
    ``observe_outcomes`` learns from how many of last step's drafts vLLM accepted,
    ``should_draft`` decides before the drafter runs, ``cut`` after, ``end_step`` closes the step.
    The pre-draft decision depends on the load and slowly-moving estimates only: it is reused for
    ``recheck_every`` steps at the same batch size.
    """

    def __init__(self, max_drafts: int, recheck_every: int = 8):
        self.max_drafts = max_drafts
        self.recheck_every = recheck_every
        self.step_cost = StepCostModel()
        self.draft_cost = StepCostModel()
        self.calibrator = AcceptanceCalibrator(max_drafts)
        self._last_end: float | None = None
        self._decision: tuple[tuple[int, int, int], bool, int] | None = None  # (key, answer, age)

    def begin_step(self, now: float, num_tokens: int) -> None:
        if self._last_end is not None:
            self.step_cost.observe(num_tokens, now - self._last_end)

    def end_step(self, now: float, num_reqs: int = 0, draft_tokens: int = 0, draft_seconds: float = 0.0) -> None:
        self._last_end = now
        if draft_tokens:
            self.draft_cost.observe(draft_tokens, draft_seconds)

    def observe_outcomes(self, conf, lengths, accepted) -> None:
        self.calibrator.observe(conf, lengths, accepted)

    def _draft_seconds(self, query_tokens: int) -> float:
        return self.draft_cost.cost1(query_tokens) if self.draft_cost.known() else 0.0

    def should_draft(self, num_reqs: int, block_tokens: int, max_len: int) -> bool:
        """Before the drafter runs: does a block of ``block_tokens`` query tokens pay at this load?"""
        if max_len <= 0:
            return False
        if not self.step_cost.known():
            return True  # nothing measured yet: draft, and learn
        key = (num_reqs, block_tokens, max_len)
        if self._decision is not None and self._decision[0] == key and self._decision[2] < self.recheck_every:
            self._decision = (key, self._decision[1], self._decision[2] + 1)
            return self._decision[1]
        rates = self.calibrator.position_rates(self.max_drafts)
        answer = speculation_pays(rates, num_reqs, self.step_cost.cost, self._draft_seconds(block_tokens),
                                  max_len=max_len)
        self._decision = (key, answer, 1)
        return answer

    def cut(self, conf, caps) -> np.ndarray:
        """After the drafter ran (its cost is spent): [R] draft lengths from its confidences [R, K]."""
        conf = np.asarray(conf, dtype=np.float64)
        if not self.step_cost.known():
            return np.minimum(np.asarray(caps), conf.shape[1])
        return choose_draft_lengths(self.calibrator.estimate(conf), self.step_cost.cost, caps=caps)
