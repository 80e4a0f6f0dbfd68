"""One DFlash drafting step inside vLLM's V1 model runner.

vLLM calls ``propose`` after the target verified a step. For each request it hands over the
target tokens of that step with their aux hidden states (at ``feature_index(id)`` for every
``id`` in ``target_layer_ids``), the last verified token (``next_token_ids``) and, in vLLM's padded
drafter batch, how many of the step's tokens were rejected drafts. Then:

    context  = hidden_norm(fc(features))                  # [T, H], once for all draft layers
    K/V      = per layer k_norm/RoPE(Wk context), Wv context -> paged cache    (KV injection)
    block    = [last verified token, MASK x K] at positions p+1 .. p+1+K      # p: last valid position
    hidden   = drafter(block), one non-causal pass over block + cached context
    drafts   = argmax(target lm_head(hidden[1..K]))       # greedy at T=0; vLLM samples if configured

The K drafts go back to vLLM, whose rejection sampler verifies them in the next target step
(greedy: accept while draft == target argmax; random: standard rejection sampling).

Machinery that is not DFlash-specific (draft attention groups, KV-cache group checks, slot-mapping
buffers, probabilistic draft sampling) comes from vLLM's ``SpecDecodeBaseProposer``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.interfaces import supports_multimodal
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

from dflash_vllm import __version__
from dflash_vllm.adaptive import AdaptiveController, PlainOrDraft
from dflash_vllm.checkpoint import DFlashConfigError, feature_index, parse_draft_spec
from dflash_vllm.context_backlog import ContextBacklog
from dflash_vllm.kernels import block_inputs, context_slots, draft_select, token_slots, triton_usable
from dflash_vllm.options import DFlashRequestError, parse_options, parse_request_options

logger = init_logger("vllm.dflash_vllm.proposer")

# Kernels that kernels="auto" runs in Triton on CUDA: only those measured faster than their PyTorch
# reference at real shapes (kernels/benchmarks/results_h100.csv, H100: block_inputs 7-9x, context_kv
# 4-6x faster). draft_select is not: one program per row tile scans the whole vocabulary (~100x slower).
TRITON_BY_DEFAULT: frozenset[str] = frozenset({"block_inputs", "context_kv"})

# Debugging aid (and the cross-side convention test): save the target tokens, positions and drafter
# features (target_layer_ids order) of the first DUMP_STEPS drafting steps to this path, as a list.
DUMP_FEATURES_ENV = "DFLASH_VLLM_DUMP_FEATURES"
DUMP_STEPS = 8

# Steps between two updates of the adaptive calibration (outcomes are batched; see _outcomes).
LEARN_EVERY = 8
DEFER_TIMINGS = 24  # timings folded into the controller's estimates at a time (~8 steps' worth)
MAX_PENDING_OUTCOMES = 256


def feature_columns(target_layer_ids: tuple[int, ...], hidden_size: int) -> torch.Tensor | None:
    """Column gather that puts vLLM's aux hidden states in ``target_layer_ids`` order.

    vLLM records aux layers as ``sorted(set(...))`` and concatenates them in that order; a drafter
    whose ``target_layer_ids`` are unsorted or repeat a layer expects its own order. None when the
    two orders already agree (the common case: no copy).
    """
    recorded = sorted({feature_index(i) for i in target_layer_ids})
    wanted = [recorded.index(feature_index(i)) for i in target_layer_ids]
    if wanted == list(range(len(recorded))):
        return None
    cols = [torch.arange(j * hidden_size, (j + 1) * hidden_size) for j in wanted]
    return torch.cat(cols)


# Requests whose ends under plain decoding lie within this many steps of each other run in
# lockstep (``in_lockstep``): a closed loop's first request is often admitted a step or two before
# its companions, and requests can arrive over a few steps.
LOCKSTEP_SLACK = 4


def in_lockstep(runner, req_ids: list[str], slack: int = LOCKSTEP_SLACK) -> bool:
    """Whether the batch's requests (``req_ids``, in batch order) would all end within ``slack``
    steps of each other decoding plainly: each has about as many tokens left to its
    ``max_tokens`` (unless it stops early). Requests started together with one ``max_tokens`` run
    so; so do the waves of a closed loop of such requests, each admitted as the last one ends."""
    return lockstep_end(runner, req_ids, slack) is not None


def lockstep_end(runner, req_ids: list[str], slack: int = LOCKSTEP_SLACK) -> int | None:
    """For a batch in lockstep (``in_lockstep``): the tokens its first request to end has left to
    its ``max_tokens``; None when not in lockstep."""
    batch = runner.input_batch
    n = len(req_ids)
    if n == 0:
        return None
    produced = (batch.num_tokens_no_spec[:n] - batch.num_prompt_tokens[:n]).tolist()
    lo = hi = None
    for rid, done in zip(req_ids, produced, strict=True):
        state = runner.requests.get(rid)
        params = None if state is None else state.sampling_params
        if params is None or params.max_tokens is None:
            return None
        left = params.max_tokens - done
        lo, hi = (left, left) if lo is None else (min(lo, left), max(hi, left))
        if hi - lo > slack:
            return None
    return lo


def joining(num_reqs: int, cad: CommonAttentionMetadata | None) -> bool:
    """A step that also prefills, with at most half its requests prefilling: requests joining a
    running batch (or prompt chunks). Its cycle is a cost of the running mode, as
    ``AdaptiveController.close_cycle`` counts it. A batch mostly new is a new load (after an idle
    engine, whose wait its cycle would hold): not a join."""
    if cad is None:
        return False
    return 2 * int(np.count_nonzero(query_counts(cad, num_reqs) > 1)) <= num_reqs


def query_counts(cad: CommonAttentionMetadata, num_reqs: int) -> np.ndarray:
    """[R] tokens each request has in the step (batch order)."""
    return np.diff(cad.query_start_loc_cpu[: num_reqs + 1].numpy())


class PlainStreak:
    """Plain decoding steps the controller said are sure to stay plain (``plain_horizon``): the
    proposer runs them without asking it, and accounts for them in one go when the streak ends
    (``AdaptiveController.plain_streak``). Each asked plain step costs ~0.1 ms of Python (the
    controller, the feature backlog), ~2% of a plain step at 16 requests on the 2-core CPU: the
    gap between an adaptive engine decoding plainly and a plain engine.

    A streak of the measured rates holds while the batch keeps its size bucket, requests joining
    or not (``joining``: a batch mostly new ends it); for a few requests' wait, a kept veto of the
    cost model and a held retry (``req_ids`` set: a joining request is checked at once), while the
    steps decode (one token per request) and the batch keeps its requests. Its steps are timed one
    by one; a cycle over 5x the streak's mean so far (an idle engine) is left out of the rate.

    The feature backlog takes a streak step's features only if the ring will still hold them
    when the streak runs its course, and none in a held retry's streak (its batch's requests end
    within a few steps of it). A streak that ends sooner (a request stops early, the batch changes
    size) and hands over to drafting leaves the ring short of the steps it skipped: those tokens'
    context stays a gap, which costs acceptance for a while, never correctness. At 64 requests in
    one process (``scripts/profile_parts.py plugin --concurrency 64``) the copy was 0.055 of the
    0.093 ms a plain step cost the plugin."""

    __slots__ = ("left", "bucket", "req_ids", "record", "num_reqs", "last", "steps", "timed", "tokens", "seconds")

    def __init__(self, left: int, num_reqs: int, now: float, req_ids: list[str] | None, record: bool = True):
        self.left = left
        self.record = record  # whether its steps' features go to the backlog (in the ring's reach)
        self.bucket = PlainOrDraft.bucket(num_reqs)
        self.req_ids = req_ids
        self.num_reqs = num_reqs
        self.last = now
        self.steps = self.timed = self.tokens = 0
        self.seconds = 0.0

    def step(self, now: float, num_reqs: int) -> None:
        dt = now - self.last
        self.last = now
        self.left -= 1
        self.steps += 1
        self.num_reqs = num_reqs
        if self.timed < 2 or dt <= 5 * self.seconds / self.timed:
            self.timed += 1
            self.tokens += num_reqs
            self.seconds += dt


class DFlashVllmProposer(SpecDecodeBaseProposer):
    """dflash-vllm's proposer; stands where vLLM builds its ``DFlashProposer``."""

    _joining = staticmethod(joining)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner=None):
        spec_config = vllm_config.speculative_config
        assert spec_config is not None and spec_config.method == "dflash"
        super().__init__(vllm_config=vllm_config, device=device, pass_hidden_states_to_model=True,
                         runner=runner)
        self.spec = parse_draft_spec(self.draft_model_config.hf_config)
        self.options = parse_options(vllm_config.additional_config)
        if self.uses_mrope:
            raise DFlashConfigError("dflash-vllm: M-RoPE drafters are not supported; unset the "
                                    "draft's mrope settings or use vLLM's built-in path (DFLASH_VLLM_DISABLE=1)")
        self.mask_token_id = self.spec.mask_token_id
        cols = feature_columns(self.spec.target_layer_ids, vllm_config.model_config.get_hidden_size())
        self._feature_columns = None if cols is None else cols.to(device)
        self._dump_path = os.environ.get(DUMP_FEATURES_ENV)
        self._dumped: list[dict] = []
        self._runner = runner
        # Variable draft lengths (adaptive cut, per-request caps) go back to vLLM as lists, which
        # its synchronous scheduler takes; under async scheduling drafts stay a fixed-size tensor.
        self.variable_lengths = not vllm_config.scheduler_config.async_scheduling and runner is not None
        self.adaptive = (AdaptiveController(self.num_speculative_tokens, defer_every=DEFER_TIMINGS)
                         if self.options.adaptive and self.variable_lengths else None)
        # While drafting does not pay at the current load, whole steps run as plain decoding (the
        # runner reads ``plain``; patches.py "plain-steps"). Not for hybrid targets, whose recurrent
        # state vLLM advances differently on its speculative path.
        self._plain_ok = (self.adaptive is not None and self.options.plain_steps
                          and not vllm_config.model_config.is_hybrid)
        # Diagnostic: every step plain (what the plugin's plain path costs against no speculation).
        self._force_plain = self._plain_ok and os.environ.get("DFLASH_VLLM_FORCE_PLAIN") == "1"
        self.plain = self._force_plain
        self._backlog = ContextBacklog(self.options.backfill_tokens) if self._plain_ok else None
        self.plain_steps = 0  # steps run as plain decoding so far
        self._streak: PlainStreak | None = None  # plain steps run without asking the controller
        self._ones = np.ones(0, dtype=np.int64)  # tokens per request of a plain decoding step
        self._full_caps = np.zeros(0, dtype=np.int64)  # every request's cap when none sets its own
        self._resumed = False  # the step propose is called for ran plain (stay_plain chose to draft)
        self._sync = device.type == "cuda"
        self._caps: dict[str, int] = {}  # req_id -> per-request draft cap (extra_args)
        self._sent: dict[str, tuple[np.ndarray, int]] = {}  # req_id -> (confidences, drafts sent)
        # Outcomes of sent drafts wait here and are learnt in batches (``LEARN_EVERY`` steps): the
        # calibration's per-call cost is mostly fixed, and at one request it was ~3% of a CPU step.
        self._outcomes: list[tuple[np.ndarray, int, int, str]] = []
        self._outcome_steps = 0
        self._preselected: tuple[list[str], np.ndarray] | None = None  # stay_plain's choice for propose
        self._lockstep_seen: tuple[list[str], bool] | None = None  # (requests, in_lockstep) of a plain step
        self._profiling = False
        self._steps = 0
        self._describe_every = max(1, int(os.environ.get("DFLASH_DESCRIBE_EVERY", 500)))  # steps between debug logs
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        kernels = self.options.kernels
        if kernels == "triton" and not triton_usable(device):
            raise DFlashConfigError("additional_config.dflash.kernels='triton' needs a CUDA device (or "
                                    "TRITON_INTERPRET=1 for tests); use 'auto' or 'torch'")
        self._triton_inputs = self._triton_kernel("block_inputs")
        logger.info(
            "dflash-vllm %s: DFlash proposer active (block_size=%d, num_speculative_tokens=%d, "
            "target_layer_ids=%s, adaptive=%s)",
            __version__, self.spec.block_size, self.num_speculative_tokens,
            list(self.spec.target_layer_ids), self.adaptive is not None,
        )
        if self.options.adaptive and self.adaptive is None:
            logger.warning("dflash-vllm: adaptive draft length needs vLLM's synchronous scheduler; running "
                           "fixed-length drafts (pass --no-async-scheduling to adapt)")

    # -- set-up --------------------------------------------------------------------------------
    def _create_draft_vllm_config(self) -> VllmConfig:
        # Block queries attend to each other in both directions: pick a non-causal backend.
        base = super()._create_draft_vllm_config()
        return replace(base, attention_config=replace(base.attention_config, use_non_causal=True))

    def _get_eagle3_use_aux_hidden_state_from_config(self) -> bool:
        return True

    def load_model(self, target_model: torch.nn.Module) -> None:
        target_layers = set(get_layers_from_vllm_config(self.vllm_config, AttentionLayerBase))
        self.model = self._get_model()
        all_layers = get_layers_from_vllm_config(self.vllm_config, AttentionLayerBase)
        self._draft_attn_layer_names = set(all_layers) - target_layers
        target = target_model.get_language_model() if supports_multimodal(target_model) else target_model
        inner = target.model
        embed = getattr(inner, "embed_tokens", None) or getattr(inner, "embedding", None)
        if embed is None or not hasattr(target, "lm_head"):
            raise DFlashConfigError(
                f"target {type(target).__name__} exposes no embed_tokens/lm_head for the drafter to share"
            )
        self.model.share_target_modules(embed, target.lm_head, target.logits_processor)
        self.model.context_kv_kernel = self._triton_kernel("context_kv")
        self.model.context_kv_torch = self.device.type == "cpu"
        self._use_draft_select, self._lm_head_weight = self._choose_draft_select(target)

    def _triton_kernel(self, name: str) -> bool:
        """Whether the ``kernels`` option runs kernel ``name`` in Triton: always with "triton"; with
        "auto" on CUDA for the kernels measured faster than their reference (``TRITON_BY_DEFAULT``)."""
        kernels = self.options.kernels
        return kernels == "triton" or (kernels == "auto" and self.device.type == "cuda"
                                       and name in TRITON_BY_DEFAULT)

    def _choose_draft_select(self, target) -> tuple[bool, torch.Tensor | None]:
        """The fused Triton selection applies where the logits are a plain ``h @ W.T`` over the
        whole vocabulary on this rank: no TP vocab sharding, no logit scaling or soft-capping."""
        choice = self.options.kernels
        if choice == "torch":
            return False, None
        lp = target.logits_processor
        weight = getattr(target.lm_head, "weight", None)
        plain = (weight is not None and self.vllm_config.parallel_config.tensor_parallel_size == 1
                 and getattr(lp, "scale", 1.0) == 1.0 and getattr(lp, "soft_cap", None) is None)
        if choice == "auto" and not (plain and self._triton_kernel("draft_select")):
            return False, None
        if not plain or not triton_usable(self.device):
            raise DFlashConfigError(
                "additional_config.dflash.kernels='triton' needs a CUDA device (or TRITON_INTERPRET=1) "
                "and unsharded, unscaled target logits (tensor_parallel_size 1, no logit scale or soft "
                "cap); use 'auto' or 'torch'")
        vocab = self.vllm_config.model_config.get_vocab_size()
        logger.info("dflash-vllm: fused Triton draft selection (vocab %d)", vocab)
        return True, weight[:vocab]  # drop the LM head's padding rows

    # -- the drafting step ---------------------------------------------------------------------
    def _features(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        if self._feature_columns is None:
            return target_hidden_states
        return target_hidden_states.index_select(-1, self._feature_columns)

    @torch.inference_mode()
    def propose(
        self,
        num_speculative_tokens: int,
        target_token_ids: torch.Tensor,  # [T]
        target_positions: torch.Tensor,  # [T]
        target_hidden_states: torch.Tensor,  # [T, n_features * H], vLLM's aux-layer order
        next_token_ids: torch.Tensor,  # [B], last verified token of each request
        token_indices_to_sample: torch.Tensor | None,
        common_attn_metadata: CommonAttentionMetadata,
        sampling_metadata,
        mm_embed_inputs=None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,  # [B], padded drafter batch
        slot_mappings=None,
    ) -> torch.Tensor:
        cad = common_attn_metadata
        num_reqs = cad.num_reqs
        k = num_speculative_tokens
        self._last_draft_probs = None
        ctl = self.adaptive
        t_begin = 0.0
        if ctl is not None:
            t_begin = self._now()
            resumed, self._resumed = self._resumed, False  # this step ran plain; drafting resumes
            self._lockstep_seen = None  # a drafting step: requests advance unevenly
            ctl.begin_step(t_begin, cad.num_actual_tokens, plain=resumed)
            self._steps += 1
            if self._steps % self._describe_every == 0:
                logger.debug("dflash-vllm adaptive: %s", ctl.describe())

        # KV injection for every target token of the step (below; also when no drafts are wanted).
        features = self._features(target_hidden_states)
        if self._dump_path and len(self._dumped) < DUMP_STEPS:
            # clone: on CPU ``.cpu()`` is the runner's persistent buffer, rewritten by later steps
            self._dumped.append({"token_ids": target_token_ids.cpu().clone(),
                                 "positions": target_positions.cpu().clone(),
                                 "query_start_loc": cad.query_start_loc.cpu().clone(),
                                 "features": features.float().cpu().clone()})
            torch.save(self._dumped, self._dump_path)
        context = self.model.fuse_context(features)

        req_ids = self._batch_req_ids(num_reqs)
        if self._backlog is not None and req_ids is not None and self._backlog.pending():
            self._backfill(cad, req_ids)
        caps = None
        if req_ids is not None:
            accepted = self._learn_from_last_step(req_ids, cad, num_rejected_tokens_gpu)
            if ctl is not None:
                if ctl.modes.retry_done:  # a retry of drafting ended: judge it on all it found
                    ctl.modes.retry_done = False
                    self._flush_outcomes()
                ctl.close_cycle(t_begin, cad.num_actual_tokens, accepted, req_ids)
            caps = self._request_caps(req_ids, k)
        if caps is None:  # every request drafts up to k
            caps_np = self._uncapped(num_reqs, k)
            drafting = k > 0 and num_reqs > 0 and not self._profiling
        else:
            caps_np = caps
            drafting = k > 0 and bool(caps_np.max(initial=0) > 0) and not self._profiling
        rows = None  # requests the block pass runs for; None: all of them
        declined = False  # the controller chose plain decoding for the steps to come (ctl.declined)
        pre, self._preselected = self._preselected, None
        if drafting and ctl is not None:
            # stay_plain may already have chosen for this very batch (the step after plain ones)
            sel = (pre[1] if pre is not None and pre[0] == req_ids
                   else ctl.select(req_ids, caps_np, 1 + k, lambda: self._in_lockstep(req_ids)))
            declined = pre is None and ctl.declined
            if self._tp_size > 1:  # ranks time their own steps: rank 0 decides for all (collectives)
                from vllm.distributed import get_tp_group

                sel, declined = get_tp_group().broadcast_object((sel.tolist(), declined), src=0)
                sel = np.asarray(sel, dtype=bool)
            drafting = bool(sel.any())
            declined = declined and not drafting
            if drafting and not sel.all():
                rows = np.flatnonzero(sel)
        elif drafting and caps is not None and not (caps > 0).all():  # fixed lengths: skip disabled requests
            rows = np.flatnonzero(caps > 0)
        if not drafting:  # the context alone: the next steps' blocks attend to it
            self._flush_outcomes()  # what plain steps decide on next is up to date
            slots = context_slots(cad.query_start_loc, target_positions, cad.block_table_tensor, self.block_size,
                                  num_reqs)
            self.model.write_context_kv(context, target_positions, slots)
            if ctl is not None:
                ctl.end_step(self._now())
                # declined with plain steps off: the mode that decodes plainly takes this very path
                ctl.open_cycle(t_begin, num_reqs, 0, plain=declined and not self._plain_ok, req_ids=req_ids)
            # plain steps from the next one on: each asks the controller again (stay_plain), so
            # drafting resumes as soon as it pays, without a speculative step to find out
            self.plain = self._plain_ok and declined
            if req_ids is None:
                return torch.empty(num_reqs, 0, dtype=torch.int64, device=target_positions.device)
            return [[] for _ in range(num_reqs)]

        inputs = block_inputs(
            cad.query_start_loc, num_rejected_tokens_gpu, target_positions, next_token_ids,
            cad.block_table_tensor, cad.seq_lens, self.block_size, self.mask_token_id, k,
            use_triton=self._triton_inputs,
        )
        self.model.write_context_kv(context, target_positions, inputs.context_slot_mapping)
        t_draft = self._now() if ctl is not None else 0.0
        num_drafted = num_reqs if rows is None else len(rows)
        hidden = self._block_forward(cad, inputs, rows, k)
        # the drafter's confidences feed the cut only; where it reads none they are not computed
        # (a softmax normaliser over the vocabulary per draft: ~100 us of a ~5 ms drafting step at
        # 1 request on CPU, 7 drafts of 4,096)
        drafts, conf, draft_probs = self._select(hidden[inputs.sample_indices[: num_drafted * k]], sampling_metadata,
                                                 need_conf=ctl is not None and ctl.wants_confidence(num_drafted))
        drafts = drafts.view(num_drafted, k)
        if draft_probs is not None:  # sampled drafting: vLLM reads row i's first len(drafts[i])
            probs = draft_probs.view(num_drafted, k, -1)
            if rows is not None:
                full = probs.new_zeros(num_reqs, k, probs.shape[-1])
                full[torch.from_numpy(rows).to(full.device)] = probs
                probs = full
            self._last_draft_probs = probs.contiguous()
        self.plain = False
        if req_ids is None or (ctl is None and caps is None):  # fixed [R, K]: vLLM takes the tensor
            return drafts

        # None: no confidence computed (fixed lengths, or a lone drafting request, which the
        # calibration counts unbinned)
        if conf is not None:
            conf = conf.view(num_drafted, k).float().cpu().numpy()
        drafted = range(num_reqs) if rows is None else rows.tolist()
        caps_sent = caps_np if rows is None else caps_np[rows]
        if ctl is not None:
            now = self._now()
            lengths = ctl.cut(conf, caps_sent, draft_seconds=now - t_draft)
            ctl.end_step(now, num_drafted, num_drafted * (1 + k), now - t_draft)
        else:
            lengths = caps_sent
        out: list[list[int]] = [[] for _ in range(num_reqs)]
        total = 0
        for j, (i, row, n) in enumerate(zip(drafted, drafts.cpu().tolist(), lengths.tolist(), strict=True)):
            out[i] = row[:n]
            total += n
            if n and ctl is not None:  # the calibration learns from these next step
                self._sent[req_ids[i]] = (None if conf is None else conf[j, :n], n)
        if ctl is not None:
            ctl.open_cycle(t_begin, num_reqs, total, req_ids=req_ids)
        return out

    def stay_plain(self, num_reqs: int, num_tokens: int, aux_hidden_states: list[torch.Tensor] | None = None,
                   positions: torch.Tensor | Callable[[], torch.Tensor] | None = None,
                   cad: CommonAttentionMetadata | None = None) -> bool:
        """The runner ran a plain step (``plain`` was set): True to run the next one plain too,
        False to draft (the runner then calls ``propose`` for this step, which writes its context).
        A step that stays plain only records its tokens' features (``ContextBacklog``): their
        context K/V is written when drafting resumes. ``positions``: the step's token positions,
        or a callable that returns them (read only when the step is recorded)."""
        ctl = self.adaptive
        streak = self._streak
        if streak is not None:
            # a streak of the measured rates holds through steps that also prefill (requests joining,
            # a prompt's chunks) while the batch keeps its size bucket: out of lockstep under load,
            # requests join every few steps, and each join asked the controller twice (its step and
            # the next, which began a new streak)
            joins = num_tokens != num_reqs and streak.req_ids is None and self._joining(num_reqs, cad)
            if streak.left > 0 and (num_tokens == num_reqs or joins) and self._streak_holds(streak, num_reqs):
                streak.step(self._now(), num_reqs)
                # only tokens still in the ring when the streak ends are worth its copy
                if streak.record and self._backlog is not None and streak.left * num_reqs < self._backlog.capacity:
                    self._record(num_reqs, num_tokens, aux_hidden_states, positions, cad,
                                 streak.req_ids or self._batch_req_ids(num_reqs))
                self.plain_steps += 1
                return True
            self._end_streak()
        req_ids = self._batch_req_ids(num_reqs)
        draft = ctl is None or self._draft_after_plain(num_reqs, req_ids)
        horizon, kind = 0, None  # plain steps sure to follow, and why (AdaptiveController.streak_kind)
        if not (draft or self._force_plain or req_ids is None):
            horizon, kind = ctl.plain_horizon(num_reqs), ctl.streak_kind
        if horizon and kind == "held":  # until the batch's first request ends (or stops early)
            horizon = min(horizon, max(0, (lockstep_end(self._runner, req_ids) or 0) - 1))
        if self._tp_size > 1:  # rank 0 decides for all (the drafting step and the backfill run collectives)
            from vllm.distributed import get_tp_group

            draft, horizon, kind = get_tp_group().broadcast_object((bool(draft), horizon, kind), src=0)
        if draft:
            self.plain = False
            self._resumed = True
            return False
        now = self._now()
        ctl.plain_step(now, num_reqs, num_tokens, req_ids)
        self._record(num_reqs, num_tokens, aux_hidden_states, positions, cad, req_ids)
        if horizon > 0 and (num_tokens == num_reqs or kind == "rates"):
            # a few requests' wait, a kept veto, a held retry: the streak holds while the batch keeps
            # its requests (decoding). A held batch's requests all end within a few steps of the
            # streak's end, so their features would serve a few drafting steps at most: not copied.
            record = kind != "held" and not (kind == "rates" and self._ends_first(req_ids, horizon))
            self._streak = PlainStreak(horizon, num_reqs, now, None if kind == "rates" else req_ids, record=record)
        if not self.plain_steps:
            logger.info("dflash-vllm: drafting does not pay at %d requests: plain decoding steps until it "
                        "does (re-measured now and then)", num_reqs)
        self.plain_steps += 1
        if self.plain_steps % self._describe_every == 0:
            logger.debug("dflash-vllm adaptive (plain): %s", ctl.describe())
        return True

    def _ends_first(self, req_ids: list[str], horizon: int) -> bool:
        """Whether a batch in lockstep ends before a streak of ``horizon`` steps does: drafting would
        not resume for its requests, so their features are not worth a copy. In a closed loop of
        equal-length requests at 16 on CPU, the copy cost adaptive ~2% of plain decoding's
        throughput once retries that lost clearly were no longer re-checked every 32 steps (held
        retries' streaks, which record nothing, had covered those waves before)."""
        end = lockstep_end(self._runner, req_ids)
        return end is not None and end + LOCKSTEP_SLACK <= horizon

    def _streak_holds(self, streak: PlainStreak, num_reqs: int) -> bool:
        if streak.req_ids is not None:  # the same requests
            return len(streak.req_ids) == num_reqs and self._runner.input_batch.req_ids[:num_reqs] == streak.req_ids
        return PlainOrDraft.bucket(num_reqs) == streak.bucket

    def _end_streak(self) -> None:
        """The streak's steps into the controller (before this step is asked about as usual)."""
        streak, self._streak = self._streak, None
        if streak is not None and streak.steps:
            self.adaptive.plain_streak(streak.num_reqs, streak.steps, streak.timed, streak.tokens, streak.seconds,
                                       streak.last, streak.req_ids)

    def _record(self, num_reqs: int, num_tokens: int, aux_hidden_states, positions, cad, req_ids) -> None:
        """A plain step's target features into the backlog (written as context when drafting resumes)."""
        if self._backlog is None or aux_hidden_states is None or positions is None or cad is None:
            return
        if callable(positions):
            positions = positions()
        if num_tokens == num_reqs:  # decoding: one token each (a shared array: the backlog never changes it)
            if len(self._ones) != num_reqs:
                self._ones = np.ones(num_reqs, dtype=np.int64)
            counts = self._ones
        else:
            counts = query_counts(cad, num_reqs)
        self._backlog.record(aux_hidden_states, positions, req_ids, counts, num_tokens)

    def _draft_after_plain(self, num_reqs: int, req_ids: list[str] | None) -> bool:
        """After a plain step: whether the next one drafts. The measured rates first (``wants_draft``),
        then the cost model on this batch's requests, as ``propose`` would ask it; its choice is kept
        for ``propose`` (same batch), so a veto costs no speculative step."""
        ctl = self.adaptive
        if self._force_plain:
            return False
        k = self.num_speculative_tokens
        caps = None if req_ids is None else self._request_caps(req_ids, k)
        if not ctl.wants_draft(num_reqs, req_ids, None if req_ids is None else lambda: self._in_lockstep(req_ids),
                               caps):
            return False
        if req_ids is None:
            return True
        sel = ctl.select(req_ids, self._uncapped(num_reqs, k) if caps is None else caps, 1 + k)
        self._preselected = (req_ids, sel) if sel.any() else None
        return self._preselected is not None

    def _in_lockstep(self, req_ids: list[str]) -> bool:
        """``in_lockstep`` for this batch, asked again only when its requests change: plain steps
        advance every request by one token, and a drafting step asks afresh (``propose``)."""
        seen = self._lockstep_seen
        if seen is None or seen[0] != req_ids:
            seen = self._lockstep_seen = (req_ids, in_lockstep(self._runner, req_ids))
        return seen[1]

    # -- helpers of the drafting step ----------------------------------------------------------
    def _backfill(self, cad: CommonAttentionMetadata, req_ids: list[str]) -> None:
        """Drafting resumes: the context K/V of the plain-step tokens kept in the backlog, for the
        requests still running (only positions their cache holds now: a preempted request's old
        positions may have no block yet)."""
        got = self._backlog.take({rid: i for i, rid in enumerate(req_ids)})
        if got is None:
            return
        features, positions, rows = got
        ok = positions < cad.seq_lens[rows].to(positions.dtype)
        if not bool(ok.all()):
            features, positions, rows = features[ok], positions[ok], rows[ok]
        if positions.numel():
            slots = token_slots(cad.block_table_tensor, rows, positions, self.block_size)
            self.model.write_context_kv(self.model.fuse_context(self._features(features)), positions, slots)

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _batch_req_ids(self, num_reqs: int) -> list[str] | None:
        """Request ids in batch order, or None when drafts must stay a fixed-size tensor."""
        if not self.variable_lengths:
            return None
        ids = self._runner.input_batch.req_ids
        return list(ids[:num_reqs])

    def _uncapped(self, num_reqs: int, k: int) -> np.ndarray:
        """[R] caps of k each, when no request sets its own: one array kept per batch size (asked
        every step; never written to)."""
        if self._full_caps.shape != (num_reqs,) or (num_reqs and self._full_caps[0] != k):
            self._full_caps = np.full(num_reqs, k, dtype=np.int64)
        return self._full_caps

    def _request_caps(self, req_ids: list[str], k: int) -> np.ndarray | None:
        """[R] per-request draft caps from ``extra_args``; None when no request sets one."""
        if len(self._caps) > 4 * max(64, len(req_ids)):
            self._caps = {r: c for r, c in self._caps.items() if r in set(req_ids)}
        caps, any_cap = [], False
        for rid in req_ids:
            cap = self._caps.get(rid)
            if cap is None:
                state = self._runner.requests.get(rid)
                params = getattr(state, "sampling_params", None)
                try:
                    opts = parse_request_options(getattr(params, "extra_args", None))
                    cap = opts.cap(k)
                except DFlashRequestError as err:  # validated at admission; never fail a batch here
                    logger.warning("dflash-vllm: request %s: %s; drafting without its options", rid, err)
                    cap = k
                self._caps[rid] = cap
            any_cap |= cap < k
            caps.append(min(cap, k))
        return np.array(caps, dtype=np.int64) if any_cap else None

    def _learn_from_last_step(self, req_ids: list[str], cad: CommonAttentionMetadata,
                              num_rejected: torch.Tensor | None) -> int:
        """How many of the drafts sent last step vLLM accepted, per request: the calibration's input.
        Returns their total."""
        sent, self._sent = self._sent, {}
        if not sent or num_rejected is None or self.adaptive is None:
            return 0
        rejected = num_rejected.tolist()
        qsl = cad.query_start_loc_cpu.tolist()
        total = 0
        # a few drafting requests: their yields feed the few-request rule at once (not batched)
        few = self.adaptive.few if self.adaptive.few is not None and len(sent) <= self.adaptive.few.max_reqs else None
        for i, rid in enumerate(req_ids):
            if rid not in sent:
                continue
            c, n = sent[rid]
            if qsl[i + 1] - qsl[i] - 1 != n:  # the scheduler did not verify what we sent: skip
                continue
            a = max(0, n - int(rejected[i]))
            self._outcomes.append((c, n, a, rid))
            total += a
            if few is not None:
                few.observe(rid, 1 + a)
        self._outcome_steps += 1
        if self._outcome_steps >= LEARN_EVERY or len(self._outcomes) >= MAX_PENDING_OUTCOMES:
            self._flush_outcomes()
        return total

    def _flush_outcomes(self) -> None:
        """Hand the waiting outcomes to the calibration and the per-request factors, in step order."""
        outcomes, self._outcomes, self._outcome_steps = self._outcomes, [], 0
        if not outcomes or self.adaptive is None:
            return
        k = self.num_speculative_tokens
        confs = np.zeros((len(outcomes), k))
        for j, (c, n, _, _) in enumerate(outcomes):
            confs[j, :n] = np.nan if c is None else c  # NaN: sent without a confidence
        self.adaptive.observe_outcomes(confs, np.array([o[1] for o in outcomes]), np.array([o[2] for o in outcomes]),
                                       [o[3] for o in outcomes])

    def _block_forward(self, cad: CommonAttentionMetadata, inputs, rows: np.ndarray | None, k: int) -> torch.Tensor:
        """One non-causal pass over the blocks of every request, or of the requests in ``rows``."""
        q = 1 + k
        ids, positions, slots = inputs.input_ids, inputs.positions, inputs.slot_mapping
        seq_lens, table, upper = inputs.valid_seq_lens, cad.block_table_tensor, cad.seq_lens_cpu_upper_bound
        num_reqs = cad.num_reqs
        if rows is not None:  # a subset: gather its blocks (their rows are contiguous per request)
            num_reqs = len(rows)
            req = torch.from_numpy(rows).to(ids.device)
            tok = (req[:, None] * q + torch.arange(q, device=ids.device)).reshape(-1)
            ids, positions, slots = ids[tok], positions[tok], slots[tok]
            seq_lens, table = seq_lens[req], table[req]
            upper = None if upper is None else upper[torch.from_numpy(rows)]
        num_query = num_reqs * q
        draft_cad = CommonAttentionMetadata(
            query_start_loc=self.arange[: num_reqs + 1] * q,
            query_start_loc_cpu=torch.arange(num_reqs + 1, dtype=torch.int32) * q,
            seq_lens=seq_lens + q,
            seq_lens_cpu_upper_bound=None if upper is None else upper + q,
            num_reqs=num_reqs,
            num_actual_tokens=num_query,
            max_query_len=q,
            max_seq_len=cad.max_seq_len + q,
            block_table_tensor=table,
            slot_mapping=slots,
            causal=False,
        )
        _, per_layer_metadata = self.build_per_group_and_layer_attn_metadata(draft_cad)
        with set_forward_context(
            per_layer_metadata, self.vllm_config, num_tokens=num_query,
            slot_mapping=self._get_slot_mapping(num_query, slots),
        ):
            return self.model(input_ids=ids, positions=positions)

    def _select(self, hidden: torch.Tensor, sampling_metadata, need_conf: bool):
        """Draft tokens [N], the drafter's probability of each [N] (None unless ``need_conf``: the
        adaptive cut is its only user), and vLLM's draft probs (sampled drafting) or None."""
        if not self._enable_probabilistic_draft_probs or sampling_metadata.all_greedy:
            if self._use_draft_select:
                sel = draft_select(hidden, self._lm_head_weight, use_triton=True)
                return sel.token, sel.prob, None
            logits = self.model.compute_logits(hidden)
            # max's indices are argmax's (the first of equal maxima, for both), so the drafts are
            # exactly vLLM's greedy ones; on CPU argmax over the vocabulary ran ~4x slower (bf16
            # [28, 4,096]: 380 against 84 us, a drafting step at 4 requests)
            if not need_conf:
                return logits.max(dim=-1).indices, None, None
            logits = logits.float()  # p(argmax) = exp(max - logsumexp): no [N, V] softmax written
            top, tokens = logits.max(dim=-1)
            return tokens, torch.exp(top - torch.logsumexp(logits, dim=-1)), None
        drafts, probs = self._sample_draft_tokens(hidden, sampling_metadata)
        return drafts, probs.gather(-1, drafts.long()[:, None]).squeeze(-1), probs

    @torch.inference_mode()
    def dummy_run(self, num_tokens: int, use_cudagraphs: bool = True, is_graph_capturing: bool = False,
                  slot_mappings: dict[str, torch.Tensor] | None = None) -> None:
        """Profiling run: the context projection at ``num_tokens`` and one block pass of the largest batch."""
        if self._profiling:  # timing the target alone (profile_target_steps)
            return
        n_features = len(self.spec.target_layer_ids) * self.vllm_config.model_config.get_hidden_size()
        features = torch.zeros(num_tokens, n_features, dtype=self.dtype, device=self.device)
        self.model.write_context_kv(self.model.fuse_context(features), self.positions[:num_tokens], None)
        num_query = min(num_tokens, self.max_batch_size * (1 + self.num_speculative_tokens))
        # Like vLLM's own dummy runs: write the cache only when the runner hands slots for our layers.
        writes_cache = bool(slot_mappings) and next(iter(self._draft_attn_layer_names)) in slot_mappings
        slots = self._get_slot_mapping(num_query) if writes_cache else (slot_mappings or {})
        with set_forward_context(None, self.vllm_config, num_tokens=num_query, slot_mapping=slots):
            self.model(input_ids=self.input_ids[:num_query], positions=self.positions[:num_query])

    @torch.inference_mode()
    def profile_target_steps(self, runner, repeats: int = 3) -> dict[int, float]:
        """Seed the adaptive cost model: time the runner's own dummy steps (target only) at token
        counts from 1 to the largest verify batch, doubling; median of ``repeats`` after a warm-up."""
        if self.adaptive is None or not self.options.profile_steps:
            return {}
        sched = self.vllm_config.scheduler_config
        top = min(sched.max_num_batched_tokens, sched.max_num_seqs * (1 + self.num_speculative_tokens))
        sizes, n = [], 1
        while n < top:
            sizes.append(n)
            n *= 2
        sizes.append(top)
        points = {}
        self._profiling = True
        try:
            for n in sizes:
                runner._dummy_run(n)
                times = []
                for _ in range(repeats):
                    t = self._now()
                    runner._dummy_run(n)
                    times.append(self._now() - t)
                points[n] = sorted(times)[len(times) // 2]
        finally:
            self._profiling = False
        self.adaptive.step_cost.set_profile(points)
        logger.info("dflash-vllm: target step profile (tokens: ms) %s",
                    ", ".join(f"{n}: {1e3 * s:.2f}" for n, s in points.items()))
        return points
