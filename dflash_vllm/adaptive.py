"""Adaptive draft length: how many drafts each request sends, given the load.

Three pieces, each a plain object or function so that they can be tested without vLLM:

* ``StepCostModel``: seconds of one target step against the number of tokens it verifies.
  Seeded by a short profile at start-up, refined online from the running engine's own steps.
* ``AcceptanceCalibrator``: the chance that draft ``i`` is accepted given that drafts ``< i``
  were, as a function of the drafter's own confidence in it; learnt online from what vLLM's
  rejection sampler actually accepts.
* ``choose_draft_lengths``: the cut rule. Expected tokens per step over expected seconds per step
  is the throughput; drafts are added in order of expected gain while they raise it.
  ``choose_requests`` asks the same question before the drafter runs, per request, from the
  calibrated per-position rates and how each request has fared so far (``RequestFactors``): the
  drafter runs only for requests whose drafts pay at the current load, and when none does the
  step is plain decoding.

Whole steps run plain or drafting by measured rates (``PlainOrDraft``); at one to four requests,
once both are measured, by the requests' own recent yields (``FewRequests``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# The rule runs every engine step on a handful of numbers: NumPy on the host, not torch (whose
# per-op overhead would cost more than the whole decision).
CostFn = Callable[[np.ndarray], np.ndarray]
# ...except the cut of a few requests' drafts, which runs right after the drafter's pass: the caches
# are cold then and each NumPy call costs several times its warm cost, so up to this many drafts
# (R x K) it runs in plain Python (``estimate_rows``, ``choose_draft_lengths_rows``; after a large
# matmul, at 2-16 requests x 7 drafts: 125-250 us against NumPy's ~360 us).
ROWS_CUT_MAX_DRAFTS = 128


def monotone_fit(ys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``ys`` in weighted least squares (pool adjacent
    violators). A bucket seen twice that happened to catch a slow step is averaged into its
    well-measured neighbours instead of raising every larger step's cost, as a running maximum would."""
    blocks: list[list[float]] = []  # [weighted mean, weight, points]
    for y, w in zip(ys.tolist(), weights.tolist(), strict=True):
        blocks.append([y, max(w, 1e-9), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            y2, w2, n2 = blocks.pop()
            y1, w1, n1 = blocks[-1]
            blocks[-1] = [(y1 * w1 + y2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
    return np.array([b[0] for b in blocks for _ in range(b[2])], dtype=np.float64)


class StepCostModel:
    """Seconds per step as a piecewise-linear function of the tokens in the step.

    Points live in half-octave buckets of the token count. A bucket with enough online
    observations uses them (an exponential moving average); otherwise its profiled value plus the
    fixed overhead that observed steps show over the profile where both are known (the profile
    times the model alone; a live step adds the scheduler, the sampler and the drafter's context
    pass, which barely grow with the tokens). Beyond the largest known point the cost grows with
    the slope of the last two points (never less than flat). The points are fitted non-decreasing,
    weighted by how often each was measured (``monotone_fit``).
    """

    def __init__(self, ema: float = 0.2, min_observations: int = 2, refresh_every: int = 16,
                 max_weight: float = 32.0):
        self.ema = ema
        self.max_weight = max_weight
        self.min_observations = min_observations
        self.refresh_every = refresh_every
        self._observed = 0
        self.profile: dict[int, tuple[float, float]] = {}  # bucket -> (tokens, seconds)
        self.online: dict[int, list[float]] = {}  # bucket -> [tokens, seconds, count]
        # cached fit of points(): (tokens, seconds, slope beyond the last point); None = stale
        self._curve: tuple[np.ndarray, np.ndarray, float] | None = None
        self._table: tuple[tuple, list[float]] | None = None  # (the curve it came from, cost_table)

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
        if cur is not None and cur[2] < self.min_observations and cur[1] > 4 * seconds:
            cur = None  # the bucket's few earlier samples were the outliers (a first call, a stall)
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

    def _offset(self) -> float:
        gaps = sorted(v[1] - self.profile[b][1] for b, v in self.online.items()
                      if v[2] >= self.min_observations and b in self.profile)
        return gaps[len(gaps) // 2] if gaps else 0.0

    def points(self) -> list[tuple[float, float]]:
        return [(n, s) for n, s, _ in self._weighted_points()]

    def _weighted_points(self) -> list[tuple[float, float, float]]:
        """(tokens, seconds, weight): a profiled point weighs as ``min_observations`` steps, an
        observed bucket as its step count (up to ``max_weight``)."""
        offset = self._offset()
        merged = {b: (n, max(s + offset, 1e-6), float(self.min_observations)) for b, (n, s) in self.profile.items()}
        for b, (n, s, c) in self.online.items():
            # a lone sample is no point of the curve: it may be a stall, and a bucket the cut then
            # avoids is never measured again to correct it (neighbours interpolate it meanwhile)
            if c >= self.min_observations:
                merged[b] = (n, s, min(c, self.max_weight))
        return sorted(merged.values())

    def _xy(self) -> tuple[np.ndarray, np.ndarray, float]:
        if self._curve is None:
            pts = self._weighted_points()
            xs = np.array([p[0] for p in pts], dtype=np.float64)
            ys = monotone_fit(np.array([p[1] for p in pts], dtype=np.float64),
                              np.array([p[2] for p in pts], dtype=np.float64))
            # ys non-decreasing: a bigger step never costs less
            slope = max(0.0, float(ys[-1] - ys[-2]) / max(float(xs[-1] - xs[-2]), 1e-9)) if len(xs) > 1 else 0.0
            self._curve = (xs, ys, slope)
        return self._curve

    def cost(self, num_tokens) -> np.ndarray:
        """Seconds for steps of ``num_tokens`` tokens (array-like of any shape)."""
        n = np.asarray(num_tokens, dtype=np.float64)
        xs, ys, slope = self._xy()
        if len(xs) == 0:
            return np.ones_like(n)  # nothing known: every step costs the same
        out = np.interp(n, xs, ys)  # ys[-1] beyond the last point, which then grows with the slope
        if slope > 0.0:
            out += slope * np.maximum(n - xs[-1], 0.0)
        return out

    def cost1(self, num_tokens: float) -> float:
        return float(self.cost(float(num_tokens)))

    def cost_table(self, upto: int) -> list[float]:
        """``cost`` at 0, 1, 2, ... tokens, at least through ``upto``, as a list (the small cut's
        lookups; the same values as ``cost``). Kept until the fit changes; callers never write to it."""
        curve = self._xy()
        table = self._table
        if table is None or table[0] is not curve or len(table[1]) <= upto:
            size = max(64, 1 << int(upto).bit_length())
            table = self._table = (curve, self.cost(np.arange(size, dtype=np.float64)).tolist())
        return table[1]


class AcceptanceCalibrator:
    """P(draft ``i`` accepted | drafts ``< i`` accepted) from the drafter's confidence in it.

    Counts per (position, confidence bin), shrunk toward the same bin pooled over positions, and
    that toward the confidence itself, while they have few observations. Old counts are halved when
    a position has seen ``horizon`` attempts, so the estimate follows the traffic. Drafts sent with
    no confidence (a lone drafting request: no cut reads them, so none is computed) count toward
    their position's pooled rate (``position_rates``) and no bin.
    """

    def __init__(self, num_positions: int, bins: int = 10, prior_strength: float = 4.0,
                 prior_rate: float = 0.7, horizon: float = 20_000.0):
        self.bins = bins
        self.prior_strength = prior_strength
        self.prior_rate = prior_rate
        self.horizon = horizon
        self.attempts = np.zeros((num_positions, bins), dtype=np.float64)
        self.accepts = np.zeros((num_positions, bins), dtype=np.float64)
        # drafts sent without a confidence (NaN: none was computed, as no cut would read it) count
        # toward their position's rate only
        self.unbinned_attempts = np.zeros(num_positions, dtype=np.float64)
        self.unbinned_accepts = np.zeros(num_positions, dtype=np.float64)
        self._rates: dict[int, np.ndarray] = {}  # position_rates(k) until the next observe()
        self._lists: tuple[list, list, list, list] | None = None  # estimate_rows' tables, until then too

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

    def estimate_rows(self, conf: list[list[float]]) -> list[list[float]]:
        """``estimate`` on nested lists, in plain Python, for a few requests' drafts: the same
        arithmetic in the same order, so the same floats. The cut runs right after the drafter's
        pass, which leaves the caches cold: at 4 requests on the 2-core CPU the whole cut took 0.21
        ms a drafting step with NumPy's ~30 calls, 0.10 ms this way (``scripts/profile_parts.py
        plugin --concurrency 4``); warm, the NumPy calls take ~50 us."""
        tables = self._lists
        if tables is None:
            tables = self._lists = (self.accepts.tolist(), self.attempts.tolist(), self.accepts.sum(0).tolist(),
                                    self.attempts.sum(0).tolist())
        accepts, attempts, pooled_accepts, pooled_attempts = tables
        s, top = self.prior_strength, self.bins - 1
        bins = float(self.bins)
        out = []
        for row in conf:
            est = []
            for i, c in enumerate(row):
                b = min(int(min(max(c, 0.0), 1.0) * bins), top)
                pooled = (pooled_accepts[b] + s * c) / (pooled_attempts[b] + s)
                e = (accepts[i][b] + s * pooled) / (attempts[i][b] + s)
                est.append(min(max(e, 0.0), 0.999))
            out.append(est)
        return out

    def position_rates(self, k: int) -> np.ndarray:
        """[k] per-position conditional acceptance, all confidences pooled (the pre-draft view). The
        same array until the next ``observe`` (callers never write to it)."""
        rates = self._rates.get(k)
        if rates is None:
            att = self.attempts[:k].sum(1) + self.unbinned_attempts[:k]
            acc = self.accepts[:k].sum(1) + self.unbinned_accepts[:k]
            s = self.prior_strength
            rates = self._rates[k] = np.clip((acc + s * self.prior_rate) / (att + s), 0.0, 0.999)
        return rates

    def observe(self, conf, lengths, accepted) -> None:
        """``conf`` [R, K] confidences of the drafts sent (NaN where none was computed),
        ``lengths`` [R] how many were sent, ``accepted`` [R] how many vLLM accepted. Draft ``i`` was
        tried iff ``i <= accepted`` and ``i < length``; it was accepted iff ``i < accepted``."""
        conf = np.asarray(conf, dtype=np.float64)
        if conf.size == 0:
            return
        self._rates = {}
        self._lists = None
        k = conf.shape[1]
        lengths, accepted = np.asarray(lengths)[:, None], np.asarray(accepted)[:, None]
        i = np.arange(k)[None]
        tried = (i <= accepted) & (i < lengths)
        ok = tried & (i < accepted)
        # counts by column sums and bincount (np.add.at is several times slower on these sizes)
        unknown = np.isnan(conf)
        if unknown.any():
            self.unbinned_attempts[:k] += (tried & unknown).sum(0)
            self.unbinned_accepts[:k] += (ok & unknown).sum(0)
            if unknown.all():
                tried = None
            else:
                tried, ok = tried & ~unknown, ok & ~unknown
                conf = np.where(unknown, 0.0, conf)
        if tried is not None:
            cell = i * self.bins + self._bin(conf)
            size = self.attempts.size
            self.attempts += np.bincount(cell[tried], minlength=size).reshape(self.attempts.shape)
            self.accepts += np.bincount(cell[ok], minlength=size).reshape(self.accepts.shape)
        full = self.attempts.sum(1) + self.unbinned_attempts > self.horizon
        if full.any():
            self.attempts[full] *= 0.5
            self.accepts[full] *= 0.5
            self.unbinned_attempts[full] *= 0.5
            self.unbinned_accepts[full] *= 0.5


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


def choose_draft_lengths_rows(acceptance: list[list[float]], cost_table: Callable[[int], list[float]],
                              caps: list[int], base_tokens: int | None = None, draft_cost: float = 0.0) -> list[int]:
    """``choose_draft_lengths`` on nested lists, in plain Python (a few requests: see
    ``AcceptanceCalibrator.estimate_rows``), with the same result: ``cost_table(n)`` lists the step
    cost at 0..n tokens (``StepCostModel.cost_table``)."""
    r, k = len(acceptance), len(acceptance[0]) if acceptance else 0
    ranked = []  # (-gain, flat index): ascending is the stable descending order of gains
    for j, row in enumerate(acceptance):
        cap, g = caps[j], 1.0
        for i, a in enumerate(row):
            g *= min(max(a, 0.0), 1.0)
            if i < cap and g > 0:
                ranked.append((-g, j * k + i))
    ranked.sort()
    base = r if base_tokens is None else base_tokens
    costs = cost_table(base + len(ranked))
    best, best_rate, expected = 0, r / (costs[base] + draft_cost), 0.0
    for m, (neg, _) in enumerate(ranked, start=1):
        expected -= neg
        rate = (r + expected) / (costs[base + m] + draft_cost)
        if rate > best_rate:  # first maximum: the fewest drafts among equals
            best, best_rate = m, rate
    lengths = [0] * r
    for _, idx in ranked[:best]:
        lengths[idx // k] += 1
    return lengths


def choose_requests(gains, step_cost: CostFn, draft_cost: CostFn, block_tokens: int,
                    base_tokens: int | None = None) -> np.ndarray:
    """Which requests the drafter runs for this step, before it runs: [R] bool, all False for a
    plain decoding step.

    ``gains`` [R, K]: each request's expected gain from its draft ``i`` (the product of acceptances
    up to ``i``; 0 past a cap). ``draft_cost(query_tokens)``: seconds of a block pass over that
    many query tokens, ``block_tokens`` per request. A draft is counted when it pays for its own
    verification at the plain step's rate; requests are then taken in order of expected gain for
    as long as they raise the step's expected tokens per second, drafter included.
    """
    gains = np.asarray(gains, dtype=np.float64)
    r, k = gains.shape
    sel = np.zeros(r, dtype=bool)
    if r == 0 or k == 0:
        return sel
    base = float(r if base_tokens is None else base_tokens)
    if r == 1:  # a lone request, where a step is shortest: the same rule on floats, one cost call
        costs = np.asarray(step_cost(base + np.arange(k + 1, dtype=np.float64)), dtype=np.float64).tolist()
        plain = costs[0]
        price = max(costs[k] - plain, 0.0) / (plain * k)
        counted = [x for x in gains[0].tolist() if x > price]
        g = sum(counted)
        if g > 0 and (1.0 + g) / (costs[len(counted)] + float(np.asarray(draft_cost(block_tokens)))) > 1.0 / plain:
            sel[0] = True
        return sel
    plain, full = (float(c) for c in np.asarray(step_cost(np.array([base, base + r * k])), dtype=np.float64))
    price = (r / plain) * max(full - plain, 0.0) / (r * k)  # tokens/s forgone per verified token
    counted = gains > price
    g, n = (gains * counted).sum(1), counted.sum(1)
    order = np.argsort(-g, kind="stable")
    order = order[g[order] > 0]
    if order.size == 0:
        return sel
    m = np.arange(order.size + 1)
    tokens = r + np.concatenate(([0.0], np.cumsum(g[order])))
    verified = base + np.concatenate(([0.0], np.cumsum(n[order])))
    drafting = np.where(m > 0, np.asarray(draft_cost(block_tokens * np.maximum(m, 1)), dtype=np.float64), 0.0)
    rate = tokens / (np.asarray(step_cost(verified), dtype=np.float64) + drafting)
    sel[order[: int(np.argmax(rate))]] = True  # first maximum: plain decoding among equals
    return sel


class RequestFactors:
    """How each running request fares against the pooled per-position rates: its accepted drafts
    over the drafts the rates expected of it, both decaying, shrunk toward 1 while evidence is thin.

    A request whose drafts keep failing (text the drafter cannot predict) drops out of the block
    pass. While it is left out its evidence fades (``idle_decay`` per step), so it is retried now
    and then and comes back when the text turns predictable.
    """

    def __init__(self, decay: float = 0.7, idle_decay: float = 0.93, prior: float = 1.0):
        self.decay = decay
        self.idle_decay = idle_decay
        self.prior = prior
        self._state: dict[str, list[float]] = {}  # req_id -> [accepted, expected]

    def factors(self, req_ids: list[str]) -> np.ndarray:
        out = np.ones(len(req_ids))
        for i, rid in enumerate(req_ids):
            st = self._state.get(rid)
            if st is not None:
                out[i] = (st[0] + self.prior) / (st[1] + self.prior)
        return out

    def observe(self, req_id: str, accepted: float, expected: float) -> None:
        st = self._state.setdefault(req_id, [0.0, 0.0])
        st[0] = self.decay * st[0] + accepted
        st[1] = self.decay * st[1] + expected

    def idle(self, req_ids, steps: int = 1) -> None:
        fade = self.idle_decay ** steps
        for rid in req_ids:
            st = self._state.get(rid)
            if st is not None:
                st[0] *= fade
                st[1] *= fade

    def prune(self, live: list[str]) -> None:
        if len(self._state) > 4 * max(64, len(live)):
            keep = set(live)
            self._state = {r: v for r, v in self._state.items() if r in keep}


class PlainOrDraft:
    """What the engine actually delivers: tokens per second of drafting steps and of plain steps,
    measured per batch-size bucket over whole step cycles (drafter, target, scheduler, sampler and
    output processing alike), so costs the step model does not see still count.

    A mode's rate is a ratio of decayed sums, tokens over seconds of its cycles: a drafting cycle
    yields anywhere from 1 to K+1 tokens per request, so a mean of per-cycle rates would follow the
    luck of the last few. The sums of both modes decay with every cycle of the bucket (``decay``,
    ~200 cycles of memory), so the figures of the mode that is not running go stale and a retry's
    fresh cycles gain weight. The memory is long because the mode follows the load (each
    batch-size bucket has its own rates) and averages over the text; a stretch of text the drafter
    cannot predict is the cut's business, per request. With ~10 or ~50 cycles of memory, one
    request on CPU spent about half its steps plain while drafting ran at 1.5-1.7x the plain rate
    over the same run: each hard stretch priced drafting out, and as a clear loser it was retried
    only a few hundred steps later.

    While a mode has fewer than ``min_observations`` cycles, one 4x faster than its estimate
    replaces it (the first cycles at a new batch size pay one-off costs). The engine's first
    ``warmup_drafts`` drafting cycles are not counted at all: at one request on CPU, a fresh
    engine's first three yielded 6 tokens in 35 ms, a quarter of what drafting delivers there, and
    priced drafting out.

    The better mode is used; the other is retried now and then for ``explore_cycles`` cycles in a
    row, at a cost capped by ``explore_budget``: one cycle of the loser costs its cycle time times
    the share of that cycle the winner would have spent less (``1 - loser_rate / winner_rate``), so
    the winner runs ``explore_cycles * cost / (budget * winner_cycle)`` cycles between retries (at
    least ``explore_min``, at most ``explore_max``; at most ``4 * explore_min`` while the loser
    has fewer than ``2 * min_observations`` cycles, as an early judgement rests on few; above a few
    requests, not when its few already put it clearly behind: its rate plus ``clear_z`` standard
    errors of its per-cycle rates still under the winner's, ``clearly_behind``). A close call is
    re-checked often and cheaply, a clear loser rarely. Out of lockstep at 64 requests on CPU
    (``max_tokens`` 64-192), drafting measured 0.4-0.7x the plain rate on its first 8 cycles there,
    and each quick re-check (4 cycles of ~45 ms against ~11 ms plain steps, every 32 steps) cost
    ~20% of the time it covered until drafting had 16 cycles: ~3% of a 30-second run.

    Drafting's rate depends on the text, plain decoding's does not, and at a few requests
    (``turnover_max_reqs``) the batch's rate is one or a few texts'. There, when plain decoding wins
    and at least half the batch's requests are new since drafting last ran (``new_text``), drafting
    is retried up to ``turnover_factor`` times sooner than the budget allows, if its per-cycle rates
    spread widely enough for new text to flip the choice (mean plus one standard deviation at or
    above the plain rate). On CPU a fresh engine judged drafting on a hard warm-up text and ran 900
    of 1,283 steps at one request plain, each new request retried only ~270 steps later, while
    drafting delivered 1.3x the plain rate over the run. Under load the rate averages many texts,
    and new requests arrive every few steps: early retries there would cost more than they find.

    At a few requests this choice runs only until both modes are measured at the batch's size:
    from then on ``FewRequests`` decides there, on the requests' own yields (``AdaptiveController``).

    Above ``turnover_max_reqs``, a retry of drafting that falls due while the batch runs in
    lockstep (``prefer_draft``'s ``lockstep``: its requests would end within a few steps of each
    other decoding plainly) is held, and starts at the first step out of lockstep. In a closed loop
    of equal-length requests at 16 on CPU (``scripts/ab_interleaved.py --concurrency 16``), each
    4-cycle retry spread the requests' ends, and every batch of them ended in a tail of ~10 steps
    at 13 requests and fewer, 0.15-0.2 s of a ~3.5 s unit: with retries, adaptive ran 0.90-0.94x
    plain decoding; with none above 8 requests, 1.00x. The budget above prices a retry by its
    own cycles only.
    """

    MODES = ("plain", "draft")

    def __init__(self, decay: float = 0.995, min_observations: int = 8, explore_budget: float = 0.01,
                 explore_cycles: int = 4, explore_min: int = 8, explore_max: int = 1024, max_step_s: float = 2.0,
                 warmup_drafts: int = 3, turnover_factor: int = 5,
                 turnover_max_reqs: int = 4, clear_z: float = 2.0):
        self.decay = decay
        self.min_observations = min_observations
        self.explore_budget = explore_budget
        self.explore_cycles = explore_cycles
        self.explore_min = explore_min
        self.explore_max = explore_max
        self.max_step_s = max_step_s
        self.warmup_drafts = warmup_drafts
        self.turnover_factor = turnover_factor
        self.turnover_max_reqs = turnover_max_reqs
        self.clear_z = clear_z
        self._drafts_seen = 0
        # bucket -> mode -> [tokens/s, count, tokens, seconds, cycles, sum of per-cycle rates, sum of
        # their squares] (all but the first two decayed sums)
        self.rates: dict[int, dict[str, list[float]]] = {}
        self._since: dict[int, int] = {}
        self._retry: dict[int, tuple[bool, int]] = {}  # bucket -> (mode retried: draft?, cycles left)
        self.held = 0  # steps that held a due retry of drafting while the batch ran in lockstep
        self.retrying = False  # the last prefer_draft answered for a retry of the losing mode
        # the last prefer_draft answered a retry's last cycle: the next answer judges what the retry
        # found, so what it learnt must be in (the proposer's batched outcomes; it clears this)
        self.retry_done = False
        self.settled = False  # the last prefer_draft answered with the winner of two known modes
        # the last prefer_draft held a due retry (lockstep): it holds while the batch keeps its
        # requests (plain steps advance each by one token, so its lockstep stands)
        self.holding = False

    @staticmethod
    def bucket(num_reqs: int) -> int:
        return round(2 * math.log2(max(1, num_reqs)))

    def _known(self, b: int) -> dict[str, list[float]]:
        return {m: v for m, v in self.rates.get(b, {}).items() if v[1] >= self.min_observations}

    @staticmethod
    def cycle_seconds(v: list[float]) -> float:
        """Seconds per cycle of a mode (an entry of ``rates``: decayed seconds over decayed cycles)."""
        return v[3] / v[4]

    def explore_interval(self, loser: list[float], winner: list[float], num_reqs: int | None = None) -> int:
        """Winner cycles between two retries of the loser (entries of ``rates``) at ``num_reqs``
        requests (None: as at a few)."""
        loser_cycle, winner_cycle = self.cycle_seconds(loser), self.cycle_seconds(winner)
        cost = self.explore_cycles * loser_cycle * max(0.0, 1.0 - loser[0] / max(winner[0], 1e-9))
        n = max(self.explore_min, math.ceil(cost / max(self.explore_budget * winner_cycle, 1e-12)))
        if loser[1] < 2 * self.min_observations and (num_reqs is None or self.few(num_reqs)
                                                     or not self.clearly_behind(loser, winner)):
            n = min(n, 4 * self.explore_min)
        return int(min(self.explore_max, n))

    def clearly_behind(self, loser: list[float], winner: list[float]) -> bool:
        """Whether a mode judged on few cycles trails the other beyond doubt: its rate plus
        ``clear_z`` standard errors of its per-cycle rates (entries of ``rates``) under the winner's."""
        stderr = self.spread(loser) / math.sqrt(max(loser[4], 1.0))
        return loser[0] + self.clear_z * stderr < winner[0]

    def few(self, num_reqs: int) -> bool:
        """A batch small enough that its drafting rate is one or a few texts' (``turnover_max_reqs``)."""
        return num_reqs <= self.turnover_max_reqs

    @staticmethod
    def spread(v: list[float]) -> float:
        """Standard deviation of a mode's per-cycle rates (an entry of ``rates``)."""
        mean = v[5] / v[4]
        return math.sqrt(max(0.0, v[6] / v[4] - mean * mean))

    def prefer_draft(self, num_reqs: int, new_text: bool = False, draft_yield: float | None = None,
                     lockstep: Callable[[], bool] | None = None) -> bool:
        """Whether this step drafts. ``new_text``: at least half the batch's requests are new since
        drafting last ran in this bucket. ``draft_yield``: tokens a drafting cycle is expected to
        yield on this batch's text; at a few requests it replaces the measured yield
        (``text_rate``). ``lockstep``: asked only when a retry of drafting is due at more than a
        few requests; True holds it (the batch's requests would end within a few steps of each
        other decoding plainly: see ``held``)."""
        b = self.bucket(num_reqs)
        retry = self._retry.get(b)
        self.retrying = retry is not None
        self.settled = self.holding = False
        if retry is not None:
            mode, left = retry
            if left > 1:
                self._retry[b] = (mode, left - 1)
            else:
                del self._retry[b]
                self.retry_done = True
            return mode
        known = self._known(b)
        if "draft" not in known:
            return True  # learn what drafting delivers first, then what plain steps do
        if "plain" not in known:
            return False
        draft, plain = known["draft"], known["plain"]
        if draft_yield is not None and self.few(num_reqs):
            draft = self.text_rate(draft, draft_yield)
        best = draft[0] >= plain[0]
        winner, loser = (draft, plain) if best else (plain, draft)
        n = self._since.get(b, 0) + 1
        interval = self.explore_interval(loser, winner, num_reqs)
        if (new_text and not best and self.few(num_reqs) and n * self.turnover_factor >= interval
                and loser[0] + self.spread(loser) >= winner[0]):
            interval = n  # new text may suit the drafter: retry now
        if n >= interval:
            if not best and lockstep is not None and not self.few(num_reqs) and lockstep():
                self._since[b] = n  # due, and held: it starts at the first step out of lockstep
                self.held += 1
                self.settled = self.holding = True
                return False
            self._since[b] = 0
            if self.explore_cycles > 1:
                self._retry[b] = (not best, self.explore_cycles - 1)
            self.retrying = True
            return not best
        self._since[b] = n
        self.settled = True
        return best

    @staticmethod
    def text_rate(v: list[float], tokens_per_cycle: float) -> list[float]:
        """A drafting entry of ``rates`` with its rate for this text: ``tokens_per_cycle`` over the
        mode's measured seconds per cycle (a copy; the measured sums are kept)."""
        return [tokens_per_cycle * v[4] / v[3], *v[1:]]

    def skip(self, num_reqs: int, steps: int = 1) -> None:
        """Steps that ran the settled mode without asking (``AdaptiveController.select``'s kept
        choice, a streak of plain steps): they count toward the next retry as answers of
        ``prefer_draft`` would (a held retry: as holds)."""
        b = self.bucket(num_reqs)
        self._since[b] = self._since.get(b, 0) + steps
        if self.holding:
            self.held += steps

    def skip_answers(self, num_reqs: int, steps: int) -> None:
        """``steps`` answers of ``prefer_draft`` not asked, the last one having been for drafting
        without a retry running: they count toward the next retry only where the rates settled."""
        if self.settled:
            self.skip(num_reqs, steps)

    def steps_to_retry(self, num_reqs: int) -> int:
        """Right after ``prefer_draft`` settled on plain decoding above a few requests: how many of
        its next answers are sure to be plain too (the retry of drafting falls due after them),
        while the batch stays in this size bucket. 0 when drafting won, a retry runs, or the batch
        is a few requests (where new text may call a retry early)."""
        if not self.settled or self.retrying or self.few(num_reqs):
            return 0
        b = self.bucket(num_reqs)
        if b in self._retry:
            return 0
        known = self._known(b)
        draft, plain = known.get("draft"), known.get("plain")
        if draft is None or plain is None or draft[0] >= plain[0]:
            return 0
        # the next answer counts since + 1 and retries once that reaches the interval
        return max(0, self.explore_interval(draft, plain, num_reqs) - self._since.get(b, 0) - 1)

    def observe(self, num_reqs: int, drafted: bool, tokens: float, seconds: float, busy: bool = False) -> bool:
        """One step cycle: ``num_reqs`` requests, whether drafts were sent, tokens it produced.
        ``busy``: the engine is known to have worked throughout (a cycle that ends with a prefill
        of new prompts is long, and no idle gap); only ``max_step_s`` bounds it."""
        if num_reqs <= 0 or not seconds > 0:
            return False
        if drafted and self._drafts_seen < self.warmup_drafts:
            self._drafts_seen += 1
            return False
        b = self.bucket(num_reqs)
        mode = self.MODES[int(drafted)]
        known = self._known(b)
        usual = max((v[0] for v in known.values()), default=None)
        # an idle gap (no requests for a while) is not a step
        if seconds > (self.max_step_s if usual is None or busy else 5 * tokens / usual + 1e-3):
            return False
        modes = self.rates.setdefault(b, {})
        for v in modes.values():  # every cycle ages both modes' figures
            v[2] *= self.decay
            v[3] *= self.decay
            v[4] *= self.decay
            v[5] *= self.decay
            v[6] *= self.decay
        cur = modes.get(mode)
        rate = tokens / seconds
        if cur is None or (cur[1] < self.min_observations and rate > 4 * cur[0]):
            modes[mode] = [rate, 1.0, float(tokens), float(seconds), 1.0, rate, rate * rate]
        else:
            cur[2] += tokens
            cur[3] += seconds
            cur[4] += 1.0
            cur[5] += rate
            cur[6] += rate * rate
            cur[1] += 1
            cur[0] = cur[2] / cur[3]
        return True

    def observe_cycles(self, num_reqs: int, cycles: int, tokens: float, seconds: float) -> bool:
        """``cycles`` plain cycles in a row at one batch-size bucket, ``tokens`` and ``seconds`` their
        sums (a streak of plain steps the proposer ran without asking): folded as that many
        ``observe`` calls of their mean would be (the same decay; one rate each). Gaps are the
        caller's to leave out; the usual check of a cycle against the known rates still applies
        to their mean."""
        if cycles <= 0:
            return False
        if cycles == 1:
            return self.observe(num_reqs, False, tokens, seconds)
        if num_reqs <= 0 or not seconds > 0:
            return False
        b = self.bucket(num_reqs)
        known = self._known(b)
        usual = max((v[0] for v in known.values()), default=None)
        per_tokens, per_seconds = tokens / cycles, seconds / cycles
        if per_seconds > (self.max_step_s if usual is None else 5 * per_tokens / usual + 1e-3):
            return False
        modes = self.rates.setdefault(b, {})
        fade = self.decay ** cycles
        # sum over the cycles of decay^(cycles - 1 - i): each cycle's share once the later ones aged it
        weight = (1.0 - fade) / (1.0 - self.decay) if self.decay < 1.0 else float(cycles)
        for v in modes.values():
            for i in range(2, 7):
                v[i] *= fade
        rate = per_tokens / per_seconds
        cur = modes.get("plain")
        if cur is None:
            modes["plain"] = cur = [rate, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        cur[2] += weight * per_tokens
        cur[3] += weight * per_seconds
        cur[4] += weight
        cur[5] += weight * rate
        cur[6] += weight * rate * rate
        cur[1] += cycles
        cur[0] = cur[2] / cur[3]
        return True


class FewRequests:
    """Drafting or plain decoding for a batch of a few requests (up to ``max_reqs``), on those
    requests' own recent yields.

    Per request, ``yields`` holds an exponential average (``alpha``) of its tokens per drafting
    cycle (1 + accepted drafts). A new request starts from ``start_yield``, what requests have
    yielded in their first drafting cycle (an average at ``start_alpha``, seeded with the pooled
    yield). At a drafting step, drafting goes on while the batch's yields sum to at least
    ``hysteresis`` x ``ratio`` x its requests (``lone_hysteresis`` for one request), ``ratio`` being
    a drafting cycle's seconds over a plain one's at that batch size (the yield per request at which
    both modes deliver alike). Below, the next ``wait`` steps run plain; then one drafting cycle
    tries again, and the one after it judges that try. A check that fails makes the next wait
    ``grow`` times longer (up to ``max_wait``); drafting that pays, or a new request, resets it.
    When a new request joins during the plain steps, the batch is checked at once, on its start
    yield.

    Why: at one to four requests on the demo pair, drafting pays on most text and not on some
    (greedy text whose first tokens the drafter cannot predict and the rest almost always, and
    whole texts it predicts poorly). A drafting cycle's cost is mostly fixed (the drafter's pass and
    the speculative step's overhead: on the 2-core CPU ~6 ms plus ~0.6 ms per drafting request and
    ~0.2 ms per draft verified, against a ~3.5-5 ms plain step at 1-4 requests), so the choice is the
    batch's, not each request's. On acceptance maps (``scripts/acceptance_map.py``: the drafts
    accepted at every position) of 64 tuning texts and the 32 eval prompts, in closed loops of 16
    requests at 4 at a time priced with those costs (``scripts/simulate_modes.py``), drafting every
    step ran 0.92x/0.91x plain decoding, this rule (hysteresis 1.0 then) 1.05x/1.11x (1.03x/1.10x without the reset of
    waits on a new request); at one request 1.49x/1.59x (drafting every step 1.41x/1.43x). Each
    check is a few float operations.
    """

    def __init__(self, alpha: float = 0.3, hysteresis: float = 0.7, wait: int = 4, grow: float = 1.5,
                 max_wait: int = 64, max_reqs: int = 4, start_alpha: float = 0.1, lone_hysteresis: float = 0.7):
        self.alpha = alpha
        # Two to four requests: 0.7 (first 1.0, tuned on simulated closed loops of 16 requests at 4,
        # whose tail, the last requests running one to three at a time, weighs on every speculative
        # mode). Timed at full load (the bench's ``full_load_ratios``: each loop up to its first
        # finished request no prompt replaced), at 4 requests on CPU, 1.0 ran 0.91x vLLM's built-in
        # DFlash, which drafts every step (0.81x-0.96x on the harder prompts), 0.7 0.98x and 0.94x
        # in two runs, 0.5 0.98x in one; over whole loops all ran 0.99x-1.03x the built-in (12
        # repetitions each).
        self.hysteresis = hysteresis
        # One request: 0.7. First 0.8, tuned on the maps at one request with the AMD machine's costs
        # (in one process at one request, 1.025x the fixed-length plugin against 1.005x with 1.0, the
        # A/A engine 0.972x). With the costs of the Intel machine of later records (cheaper drafting:
        # ``scripts/simulate_modes.py`` docstring) and the rule carried across loops as an engine
        # carries it, 0.8 ran the easier half of the eval prompts at 0.945x drafting every step and
        # 0.7 at 1.001x (eval 1.800x -> 1.843x plain decoding, 64 tuning texts 1.732x -> 1.733x).
        self.lone_hysteresis = lone_hysteresis
        self.wait = wait
        self.grow = grow
        self.max_wait = max_wait
        self.max_reqs = max_reqs
        self.start_alpha = start_alpha
        self.yields: dict[str, float] = {}  # req_id -> tokens per drafting cycle (an EMA)
        self._unseen: set[str] = set()  # requests whose first drafting cycle is still to come
        self.start_yield: float | None = None  # a request's first drafting cycle (an EMA; seeded)
        self._next_wait = float(wait)
        self.left = 0  # plain steps still to run before the next try

    def covers(self, num_reqs: int) -> bool:
        return 1 <= num_reqs <= self.max_reqs

    def _admit(self, req_ids: list[str], prior: Callable[[], float]) -> bool:
        """Track the batch's new requests (from ``start_yield``); True if there was one."""
        new = False
        for rid in req_ids:
            if rid not in self.yields:
                if self.start_yield is None:
                    self.start_yield = float(prior())
                self.yields[rid] = self.start_yield
                self._unseen.add(rid)
                new = True
        if new:
            self._next_wait = float(self.wait)  # new text: waits start short again
            if len(self.yields) > 16 * self.max_reqs:  # forget finished requests
                keep = set(req_ids)
                self.yields = {r: y for r, y in self.yields.items() if r in keep}
                self._unseen &= keep
        return new

    def observe(self, req_id: str, tokens: float) -> None:
        """A drafting cycle of ``req_id`` yielded ``tokens`` (1 + accepted drafts)."""
        y = self.yields.get(req_id)
        if y is None:
            return
        if req_id in self._unseen:
            self._unseen.discard(req_id)
            self.start_yield += self.start_alpha * (tokens - self.start_yield)
        self.yields[req_id] = y + self.alpha * (tokens - y)

    def _check(self, req_ids: list[str], ratio: float, caps: np.ndarray | None = None) -> bool:
        """Whether the batch's yields pay for drafting; a failed check starts a run of plain steps.
        A request whose cap is 0 (``caps``) yields one token either way."""
        if caps is None or caps.all():
            total = sum(self.yields[r] for r in req_ids)
        else:
            total = sum(self.yields[r] if c > 0 else 1.0 for r, c in zip(req_ids, caps.tolist(), strict=True))
        n = len(req_ids)
        if total >= (self.lone_hysteresis if n == 1 else self.hysteresis) * ratio * n:
            self._next_wait = float(self.wait)
            return True
        self.left = int(self._next_wait)
        self._next_wait = min(float(self.max_wait), self._next_wait * self.grow)
        return False

    def keep_drafting(self, req_ids: list[str], ratio: float, prior: Callable[[], float],
                      caps: np.ndarray | None = None) -> bool:
        """At a drafting step: whether it drafts; False starts a run of plain steps. ``prior``: the
        pooled tokens per drafting cycle of a request (asked once, to seed ``start_yield``);
        ``caps``: the requests' draft caps."""
        self._admit(req_ids, prior)
        return self._check(req_ids, ratio, caps)

    def resume(self, req_ids: list[str], ratio: float, prior: Callable[[], float],
               caps: np.ndarray | None = None) -> bool:
        """After a plain step: whether the next step drafts (a new request whose start yield makes
        drafting pay, checked as ``keep_drafting`` checks, or the wait is over: a try)."""
        if self._admit(req_ids, prior):
            return self._check(req_ids, ratio, caps)
        self.left -= 1
        return self.left <= 0

    def steps_to_check(self) -> int:
        """Right after ``resume`` said no: how many of its next answers are sure to be no too, while
        no request joins (the wait's steps still to run)."""
        return max(0, self.left - 1)

    def skip(self, steps: int) -> None:
        """``steps`` plain steps of the wait ran without asking ``resume`` (no request joined)."""
        self.left -= steps


# Steps a held retry of drafting runs as one streak at most (it ends sooner when a request of the
# batch ends or joins; the next plain step then asks again and may start another).
HELD_STREAK = 256


class AdaptiveController:
    """The per-engine state behind adaptive drafting; the proposer calls it once per step.

    ``begin_step`` times the target step that just ran (the gap since the last ``end_step``),
    ``observe_outcomes`` learns from how many of last step's drafts vLLM accepted,
    ``select`` picks the requests the drafter runs for (none: a plain step), ``cut`` their
    lengths once it ran, ``end_step`` closes the step.
    """

    def __init__(self, max_drafts: int, warmup_drafts: int = 3, explore_every: int = 128,
                 full_every: int = 32, plain_after_veto: int = 8, reselect_every: int = 8,
                 cut_from_reqs: int = 2, defer_every: int = 1, few: bool = True):
        self.max_drafts = max_drafts
        # Timings (step, drafter and cycle times) wait in a list and are folded into the estimates
        # ``defer_every`` at a time (1: at once). Folded each step, right after the model's tensor
        # work, the estimators' Python ran several times slower than warm (~80 us of a ~5 ms
        # drafting step at one request on CPU: caches the model evicted); a batch runs warm after
        # its first. The choices then read estimates a few steps old.
        self.defer_every = defer_every
        self._deferred: list[tuple] = []
        # The cut runs when at least ``cut_from_reqs`` requests draft; a lone one sends every draft
        # its cap allows. One request's drafts are as cheap to verify as drafts get (on a GPU the
        # step is memory-bound, on CPU its fixed costs dwarf them), so the cut has little to save,
        # and the price it sees is confounded: a step with more drafts also returns more tokens to
        # process. At 1 request on CPU, in one process with requests interleaved between engines
        # (the machine's drift cancelled), the cut cost 4% of throughput in two runs against
        # sending all 7 (scripts/ab_interleaved.py). Whether it drafts at all is still decided.
        self.cut_from_reqs = cut_from_reqs
        # The first block passes pay one-off costs (lazy initialisation, compiled-graph loading): their
        # times would make drafting look far dearer than it is, and no draft would ever be sent again
        # to correct it. They are not counted.
        self.warmup_drafts = warmup_drafts
        # When the cost model keeps vetoing drafts at a batch size, one drafting step every
        # ``explore_every`` refreshes the drafter's measured cost (the veto rests on it).
        self.explore_every = explore_every
        # One drafting step in ``full_every`` sends every draft the caps allow, whatever the cut
        # says: the step costs of lengths the cut avoids are measured too (a bucket priced high by
        # a few unlucky steps would otherwise never be seen again to correct it).
        self.full_every = full_every
        self._cuts = 0
        self._drafting_steps = 0
        self._mode_checked = False  # wants_draft() already asked PlainOrDraft about this step
        self._few_answered = False  # the last wants_draft() was FewRequests' answer
        # The next drafting step is a try of FewRequests (drafting resumes after its plain steps) and
        # sends every draft the caps allow: the rule judges the try on its yields, which a cut would
        # bound (a request sent 1 draft yields 2 tokens at most). In an in-process trace at 4 requests
        # on CPU, the first drafting steps after plain ones sent 5-8 of 14 drafts at 2 requests (5 of 5)
        # and at 4 requests the first 4 of 28.
        self._try_full = False
        self.full_tries = True
        # the last select() vetoed every request of its batch with a kept veto: the steps it stands
        # for yet (same batch), as ``plain_horizon`` reports them; and the requests it left idle
        self._veto_left = 0
        self._veto_idle: list[str] = []
        self.streak_kind = "rates"  # what plain_horizon's last answer rested on: few, veto, held or rates
        # Whether the last select() chose plain decoding for the steps to come: at once when the
        # measured rates prefer it, after ``plain_after_veto`` vetoes in a row from the cost model
        # (a lone veto, from noise in the estimates, would cost a switch of mode and a backfill).
        self.declined = False
        self.plain_after_veto = plain_after_veto
        self._vetoed: dict[int, int] = {}  # batch-size bucket -> consecutive vetoes
        # A batch whose every request the cost model chose, or none, keeps that choice for
        # ``reselect_every`` steps (the rule's inputs move slowly; at one request it cost ~3% of a
        # CPU step, and ~4% of each plain step at 16 requests on CPU while it vetoed every one).
        # A batch drafting in full while the measured rates settled on drafting keeps the mode too:
        # those steps ask neither (``select``'s first lines). In the engine the controller's Python
        # runs on caches the model's tensor work evicted, several times slower than warm: at one
        # request on CPU ``select`` took ~45 us a step on a kept choice (3 us warm) and ~175 us
        # re-deciding, ~1.5% of a ~5.7 ms step in all.
        self.reselect_every = reselect_every
        # [request ids, caps, steps still kept for, the requests chosen (all, or none for a veto),
        #  whether the mode is kept too]
        self._kept: list | None = None
        # Steps of vLLM's speculative path only (drafts verified or not: the rejection sampler, the
        # aux-state gather and the drafter's context pass are paid whatever is sent). Plain steps run
        # a cheaper path: mixed in, at one request on CPU they made the first draft of a step look
        # ~3 ms dear (its bucket plain steps, the next ones drafting steps), and in a quarter of its
        # steps the cut sent 0-2 drafts. They are timed apart (``plain_cost``).
        self.step_cost = StepCostModel()
        self.plain_cost = StepCostModel()
        self.draft_cost = StepCostModel()
        self.calibrator = AcceptanceCalibrator(max_drafts)
        self.requests = RequestFactors()
        self.modes = PlainOrDraft()
        # A batch of a few requests, once both modes' rates are measured at its size: their own
        # yields decide (None: the pooled choice, with per-request factors and retries)
        # (the same "few" as the pooled choice's, where it prices drafting on the batch's text)
        self.few: FewRequests | None = FewRequests(max_reqs=self.modes.turnover_max_reqs) if few else None
        self._last_end: float | None = None
        # (start, requests, tokens sent to verify, plain mode, request ids)
        self._cycle: tuple[float, int, int, bool, list[str] | None] | None = None
        self._drafted_ids: dict[int, frozenset] = {}  # batch-size bucket -> requests of its last drafting step

    def close_cycle(self, now: float, num_tokens: int, accepted: int, req_ids: list[str] | None = None) -> None:
        """At the start of a step (``num_tokens`` scheduled, ``req_ids`` its requests): the previous
        step's cycle produced one token per request plus the drafts vLLM accepted.

        A cycle whose next step also prefills new prompts counts when that step continues one of
        the cycle's requests and brings no more new requests than it continues: the engine was
        busy throughout at about this load, and the prefill is a cost of the mode as much as the
        decoding (drafting writes the prompt's context, verifies a larger step, and
        its requests finish unevenly, so they are admitted, and prefill, one by one). Left out, at
        16 requests on CPU drafting measured ~10% above plain decoding on the cycles counted while
        the engine ran 5% slower than one held to plain steps (counted, in one run, still 8% above:
        not the whole story). Without a continuing request (or request ids) the cycle may hold an
        idle wait for new requests, and is not counted. Nor is a cycle whose next step admits more
        new requests than it continues: a new load arriving (a closed loop's first request
        admitted alone, its 15 or 63 companions prefilled in the next step) is no cost of the
        cycle's mode at its batch size. Counted, such cycles (100-300 ms at one request on CPU)
        doubled drafting's measured cycle time at one request on a fresh engine that had run the
        bench's warm-ups at 16 and 64 requests, and it decoded plainly for most of the next
        requests. A long prompt's prefill chunks, paid by
        either mode alike, weigh on the rate of the mode that runs: noise, bounded by
        ``PlainOrDraft.max_step_s`` per cycle."""
        if self._cycle is not None:
            start, num_reqs, verify_tokens, plain, ids = self._cycle
            if num_tokens <= verify_tokens:
                self._note(self.modes.observe, num_reqs, not plain, num_reqs + accepted, now - start, False)
            elif ids is not None and req_ids is not None:
                continuing = len(set(ids).intersection(req_ids))
                if continuing and len(req_ids) - continuing <= continuing:
                    self._note(self.modes.observe, num_reqs, not plain, num_reqs + accepted, now - start, True)
        self._cycle = None

    def open_cycle(self, now: float, num_reqs: int, num_drafts: int, plain: bool = False,
                   req_ids: list[str] | None = None) -> None:
        """A step cycle starts: ``plain`` for the mode that decodes plainly, else drafting, whatever
        ``num_drafts`` (a drafting step whose drafts were all cut, or the step that hands over to
        plain decoding and writes the last verified tokens' context, is a cost of drafting: counted
        as plain, such cycles made plain decoding look ~1.5x dearer than it is at 16 requests).
        ``req_ids``: the step's requests (kept as given, not copied)."""
        self._cycle = (now, num_reqs, num_reqs + num_drafts, plain, req_ids)

    def begin_step(self, now: float, num_tokens: int, plain: bool = False) -> None:
        """The target step that just ran took ``now`` minus the last ``end_step``; ``plain``: it ran
        vLLM's plain decoding path."""
        if self._last_end is not None:
            self._note((self.plain_cost if plain else self.step_cost).observe, num_tokens, now - self._last_end)

    def end_step(self, now: float, num_reqs: int = 0, draft_tokens: int = 0, draft_seconds: float = 0.0) -> None:
        self._last_end = now
        if draft_tokens:
            self._drafting_steps += 1
            if self._drafting_steps > self.warmup_drafts:
                self._note(self.draft_cost.observe, draft_tokens, draft_seconds)

    def _note(self, observe, *args) -> None:
        self._deferred.append((observe, args))
        if len(self._deferred) >= self.defer_every:
            self.flush()

    def flush(self) -> None:
        """Fold the waiting timings into the estimates, in the order they were taken."""
        pending, self._deferred = self._deferred, []
        for observe, args in pending:
            observe(*args)

    def _few_ratio(self, req_ids: list[str] | None) -> float | None:
        """For a batch of a few requests under ``few``: a drafting cycle's seconds over a plain one's,
        measured at its size; None while either mode is unmeasured there (the pooled choice learns
        both first) or for a larger batch."""
        if self.few is None or req_ids is None or not self.few.covers(len(req_ids)):
            return None
        known = self.modes._known(PlainOrDraft.bucket(len(req_ids)))
        draft, plain = known.get("draft"), known.get("plain")
        if draft is None or plain is None:
            return None
        return PlainOrDraft.cycle_seconds(draft) / max(PlainOrDraft.cycle_seconds(plain), 1e-9)

    def pooled_yield(self) -> float:
        """Tokens a drafting cycle yields per request, from the pooled per-position rates."""
        return 1.0 + float(np.cumprod(self.calibrator.position_rates(self.max_drafts)).sum())

    def wants_draft(self, num_reqs: int, req_ids: list[str] | None = None,
                    lockstep: Callable[[], bool] | None = None, caps: np.ndarray | None = None) -> bool:
        """After a plain step (the drafter idle): whether the next one drafts. Asked once per step;
        when it says yes, ``select`` takes the answer instead of asking again. ``req_ids``, the
        batch's requests, tell whether its text is new since drafting last ran at this batch size.
        ``lockstep``: whether the batch's requests would end within a few steps of each other
        decoding plainly (asked only when a retry of drafting is due; ``PlainOrDraft.prefer_draft``).
        ``caps``: the requests' draft caps (None: none set), as ``select`` takes them."""
        ratio = self._few_ratio(req_ids)
        self._few_answered = ratio is not None
        self._veto_left = 0
        self._try_full = False  # a try's flag whose step never drafted (every cap 0) ends here too
        if ratio is not None:
            self._mode_checked = self.few.resume(req_ids, ratio, self.pooled_yield, caps)
            self._try_full = self._mode_checked and self.full_tries
            return self._mode_checked
        new_text, draft_yield = False, None
        if req_ids and self.modes.few(num_reqs):
            seen = self._drafted_ids.get(PlainOrDraft.bucket(num_reqs))
            new_text = seen is not None and 2 * sum(rid not in seen for rid in req_ids) >= len(req_ids)
            draft_yield = self.draft_yield(req_ids)
        self._mode_checked = self.modes.prefer_draft(num_reqs, new_text, draft_yield, lockstep)
        if not self._mode_checked and draft_yield is not None:
            self.requests.idle(req_ids)  # a plain step: their evidence fades, so they are retried
        return self._mode_checked

    def draft_yield(self, req_ids: list[str], caps: np.ndarray | None = None) -> float:
        """Tokens a drafting cycle is expected to yield on these requests: one each, plus the
        drafts the pooled per-position rates expect of each, scaled by how it has fared
        (``RequestFactors``), as ``_select`` prices them."""
        k = self.max_drafts
        gains = np.minimum(self.requests.factors(req_ids)[:, None] * np.cumprod(self.calibrator.position_rates(k))[None],
                           0.999)
        if caps is not None:
            gains = np.where(np.arange(k)[None] >= np.asarray(caps)[:, None], 0.0, gains)
        return len(req_ids) + float(gains.sum())

    def plain_horizon(self, num_reqs: int) -> int:
        """Right after a plain step's choice (``wants_draft`` said no, or ``select`` vetoed every
        request): how many of the next steps are sure to stay plain, asked or not. ``streak_kind``
        says why: a few requests' wait (``FewRequests``, "few"), a kept veto of the cost model
        ("veto") and a retry of drafting held for a batch in lockstep ("held", up to
        ``HELD_STREAK``; the proposer caps it at the batch's first end) hold while the batch keeps
        its requests; the measured rates' choice above a few requests ("rates": the steps before
        drafting's retry falls due) while it keeps its size bucket. The proposer runs those steps
        as a streak (``plain_streak``) without asking each one."""
        if self._few_answered:
            self.streak_kind = "few"
            return self.few.steps_to_check()
        if self._veto_left:  # the measured rates said draft, and the cost model's kept veto stands
            self.streak_kind = "veto"
            return self._veto_left
        if self.modes.holding:  # a due retry held for a batch in lockstep: while it keeps its requests
            self.streak_kind = "held"
            return HELD_STREAK
        self.streak_kind = "rates"
        return self.modes.steps_to_retry(num_reqs)

    def plain_streak(self, num_reqs: int, steps: int, timed: int, tokens: int, seconds: float, end: float,
                     req_ids: list[str] | None = None) -> None:
        """Account for ``steps`` plain decoding steps the proposer ran without asking (``plain_horizon``)
        at ``num_reqs`` requests (the last step's): ``timed`` of their cycles (gaps left out)
        produced ``tokens`` in ``seconds``; the last one ended at ``end`` and opened the cycle the
        next step closes. As many answers of ``wants_draft`` would have been no."""
        if timed:
            self._note(self.modes.observe_cycles, num_reqs, timed, tokens, seconds)
            self._note(self.plain_cost.observe, tokens / timed, seconds / timed)
        if self.streak_kind == "few":
            self.few.skip(steps)
        elif self.streak_kind == "veto":  # each step would have asked both again
            self.modes.skip_answers(num_reqs, steps)
            self._kept[2] -= steps
            b = PlainOrDraft.bucket(num_reqs)
            self._vetoed[b] = self._vetoed.get(b, 0) + steps
            self.requests.idle(self._veto_idle, steps)
        else:
            self.modes.skip(num_reqs, steps)
        self._mode_checked = False
        self._last_end = end
        self.open_cycle(end, num_reqs, 0, plain=True, req_ids=req_ids)

    def plain_step(self, now: float, num_reqs: int, num_tokens: int, req_ids: list[str] | None = None) -> None:
        """Account for a plain step the drafter sat out (cycle rate, plain step cost at ``num_tokens``)."""
        self._mode_checked = False
        self.close_cycle(now, num_tokens, 0, req_ids)
        self.begin_step(now, num_tokens, plain=True)
        self.end_step(now)
        self.open_cycle(now, num_reqs, 0, plain=True, req_ids=req_ids)

    def _draft_seconds(self, query_tokens) -> np.ndarray:
        if not self.draft_cost.known():
            return np.zeros(np.shape(query_tokens))
        return self.draft_cost.cost(query_tokens)

    def observe_outcomes(self, conf, lengths, accepted, req_ids: list[str] | None = None) -> None:
        """Drafts sent last step: their confidences [R, K], how many were sent and accepted [R]."""
        self.calibrator.observe(conf, lengths, accepted)
        if req_ids is not None:
            expected = [0.0, *np.cumsum(np.cumprod(self.calibrator.position_rates(self.max_drafts))).tolist()]
            observe = self.requests.observe
            for rid, n, a in zip(req_ids, np.asarray(lengths).tolist(), np.asarray(accepted).tolist(), strict=True):
                observe(rid, float(a), expected[int(n)])

    def select(self, req_ids: list[str], caps: np.ndarray, block_tokens: int,
               lockstep: Callable[[], bool] | None = None) -> np.ndarray:
        """Before the drafter runs: [R] bool, the requests whose drafts pay at this load.
        ``lockstep``: as for ``wants_draft`` (a drafting step at a few requests can hand over to a
        batch in lockstep: a closed loop's first request drafting alone, its companions joining)."""
        caps = np.asarray(caps)
        checked, self._mode_checked = self._mode_checked, False
        ratio = self._few_ratio(req_ids)
        if ratio is not None:
            self.declined = not (checked or self.few.keep_drafting(req_ids, ratio, self.pooled_yield, caps))
            return np.zeros(len(req_ids), dtype=bool) if self.declined else caps > 0
        kept = self._kept
        if not checked and kept is not None and kept[4] and kept[2] > 0 and self._same_batch(kept, req_ids, caps):
            kept[2] -= 1  # drafting in full stands: neither the measured rates nor the cost model asked
            self.modes.skip(len(req_ids))
            self.declined = False
            return kept[3]  # the same array each step (callers never write to it)
        if not checked:
            few = self.modes.few(len(req_ids))
            self.declined = not self.modes.prefer_draft(len(req_ids), False,
                                                        self.draft_yield(req_ids, caps) if few else None, lockstep)
        else:
            self.declined = False
        if self.declined:
            self.requests.idle([rid for rid, c in zip(req_ids, caps, strict=True) if c > 0])
            return np.zeros(len(req_ids), dtype=bool)
        sel = self._select(req_ids, caps, block_tokens)
        if sel.any() and self.modes.few(len(req_ids)):
            self._drafted_ids[PlainOrDraft.bucket(len(req_ids))] = frozenset(req_ids)
        return sel

    @staticmethod
    def _same_batch(kept: list, req_ids: list[str], caps: np.ndarray) -> bool:
        return kept[0] == req_ids and (kept[1] is caps or np.array_equal(kept[1], caps))

    def _select(self, req_ids: list[str], caps: np.ndarray, block_tokens: int) -> np.ndarray:
        if not self.step_cost.known():
            return caps > 0  # nothing measured yet: draft, and learn
        if self.modes.retrying and self.modes.few(len(req_ids)):
            # a retry measures drafting on this batch's text: at a few requests the pooled rates are
            # another text's, and their veto would leave the retry unmade (the cut, on the
            # drafter's confidences, still chooses what is sent)
            return caps > 0
        kept = self._kept
        if kept is not None and kept[2] > 0 and self._same_batch(kept, req_ids, caps):
            kept[2] -= 1
            if kept[3].any():
                return kept[3]  # the same array each step (callers never write to it)
            sel = np.zeros(len(req_ids), dtype=bool)  # the veto stands (and counts as one, below)
        else:
            self._kept = None
            self.requests.prune(req_ids)
            k = self.max_drafts
            curve = np.cumprod(self.calibrator.position_rates(k))
            gains = np.minimum(self.requests.factors(req_ids)[:, None] * curve[None], 0.999)
            gains = np.where(np.arange(k)[None] >= caps[:, None], 0.0, gains)
            sel = choose_requests(gains, self.step_cost.cost, self._draft_seconds, block_tokens)
        b = PlainOrDraft.bucket(len(req_ids))
        if sel.any():
            self._vetoed[b] = 0
            if self.reselect_every > 1 and np.array_equal(sel, caps > 0):
                self._kept = [list(req_ids), caps, self.reselect_every - 1, sel,
                              self.modes.settled and not self.modes.retrying]
        elif caps.any():
            self._vetoed[b] = self._vetoed.get(b, 0) + 1
            if self._vetoed[b] >= self.explore_every:  # re-measure what drafting costs here
                self._vetoed[b] = 0
                sel = caps > 0
                self._kept = None
            elif self._kept is None and self.reselect_every > 1:
                self._kept = [list(req_ids), caps, self.reselect_every - 1, sel, False]
        self.declined = not sel.any() and self._vetoed.get(b, 0) >= self.plain_after_veto
        idle = [rid for rid, s, c in zip(req_ids, sel, caps, strict=True) if not s and c > 0]
        self.requests.idle(idle)
        kept = self._kept
        if not sel.any() and kept is not None and not kept[3].any() and not self.modes.retrying:
            # a veto kept for this batch: its steps go as this one did (an exploring draft excepted)
            self._veto_left = max(0, min(kept[2], self.explore_every - 1 - self._vetoed.get(b, 0)))
            self._veto_idle = idle
        return sel

    def describe(self) -> str:
        """One line of the controller's current estimates (for logs)."""
        self.flush()
        def pts(m: StepCostModel) -> str:
            return " ".join(f"{n:.0f}:{1e3 * s:.1f}" for n, s in m.points())
        modes = " ".join(f"{2 ** (b / 2):.0f}:" + "/".join(f"{m}={v[0]:.0f}({v[1]:.0f})" for m, v in sorted(d.items()))
                         for b, d in sorted(self.modes.rates.items()))
        return (f"step ms [{pts(self.step_cost)}] plain step ms [{pts(self.plain_cost)}] draft ms "
                f"[{pts(self.draft_cost)}] rates "
                f"{np.round(self.calibrator.position_rates(self.max_drafts), 2).tolist()} tokens/s [{modes}]")

    def wants_confidence(self, num_drafted: int) -> bool:
        """Whether ``cut`` reads the drafter's confidences when that many requests draft (a lone
        one sends what its cap allows, so none need be computed for it)."""
        return num_drafted >= self.cut_from_reqs

    def cut(self, conf, caps, draft_seconds: float = 0.0) -> np.ndarray:
        """After the drafter ran: [R] draft lengths from its confidences [R, K] (None where
        ``wants_confidence`` said none is read). Its cost (``draft_seconds``) is spent whatever is
        sent, but it is part of the step: a step that sends nothing still paid it, so the
        throughput each length gives counts it."""
        caps = np.asarray(caps)
        full, self._try_full = self._try_full, False  # a try's step, cut or not (its flag ends here)
        if conf is None or not self.wants_confidence(len(caps)):
            return caps  # a lone drafting request: every draft its cap allows (caps <= max_drafts)
        self._cuts += 1
        if full or not self.step_cost.known() or (self.full_every and self._cuts % self.full_every == 0):
            return np.minimum(caps, np.shape(conf)[1])
        if np.size(conf) <= ROWS_CUT_MAX_DRAFTS:  # a few requests: plain Python, the same lengths
            rows = conf.tolist() if hasattr(conf, "tolist") else conf
            return np.array(choose_draft_lengths_rows(self.calibrator.estimate_rows(rows), self.step_cost.cost_table,
                                                      caps.tolist(), draft_cost=draft_seconds), dtype=np.int64)
        return choose_draft_lengths(self.calibrator.estimate(np.asarray(conf, dtype=np.float64)), self.step_cost.cost,
                                    caps=caps, draft_cost=draft_seconds)
