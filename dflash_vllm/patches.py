"""Every change dflash-vllm makes to vLLM, each a named ``Patch``, applied in order by ``apply_all``.

Written against vLLM 0.32.0 (``plugin.py`` refuses other versions). Each patch checks, before it
changes anything, that its target is where it expects it (``locate``), and raises ``PatchError``
naming the patch if not: a moved target fails loudly at start-up instead of silently leaving
vLLM's own path in place. ``apply_all`` is idempotent per process.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("vllm.dflash_vllm.patches")

ARCHITECTURE = "DFlashDraftModel"
DRAFTER_CLASS = "dflash_vllm.models.vllm_drafter:DFlashVllmDrafter"


class PatchError(RuntimeError):
    pass


@dataclass
class Patch:
    name: str
    doc: str
    locate: Callable[[], None]  # raises PatchError when the target moved
    apply: Callable[[], None]
    applied: Callable[[], bool]


def _require(ok: bool, patch: str, what: str) -> None:
    if not ok:
        raise PatchError(f"dflash-vllm patch {patch!r}: {what} (vLLM changed; this plugin supports 0.32.0)")


# -- 1. our proposer where vLLM builds DFlashProposer ---------------------------------------------
def _runner_module():
    import vllm.v1.worker.gpu_model_runner as runner

    return runner


def _locate_proposer() -> None:
    runner = _runner_module()
    from vllm.v1.spec_decode.dflash import DFlashProposer

    current = getattr(runner, "DFlashProposer", None)
    _require(current is not None, "proposer", "gpu_model_runner no longer imports DFlashProposer")
    init_src = inspect.getsource(runner.GPUModelRunner.__init__)
    _require("DFlashProposer(" in init_src, "proposer",
             "GPUModelRunner.__init__ no longer builds the drafter with DFlashProposer(...)")
    _require(current is DFlashProposer or getattr(current, "_dflash_vllm", False), "proposer",
             f"gpu_model_runner.DFlashProposer is {current!r}, patched by someone else")


def _apply_proposer() -> None:
    from dflash_vllm.proposer import DFlashVllmProposer

    runner = _runner_module()
    DFlashVllmProposer._dflash_vllm = True
    runner._orig_DFlashProposer = runner.DFlashProposer
    # The runner builds the drafter from this module global and names it in its isinstance()
    # checks, which resolve at call time: one rebinding covers both.
    runner.DFlashProposer = DFlashVllmProposer


def _proposer_applied() -> bool:
    return getattr(_runner_module().DFlashProposer, "_dflash_vllm", False)


# -- 2. our drafter model for the z-lab architecture name ------------------------------------------
def _locate_registry() -> None:
    from vllm.model_executor.models.registry import ModelRegistry

    _require(ARCHITECTURE in ModelRegistry.get_supported_archs(), "drafter-model",
             f"vLLM no longer registers {ARCHITECTURE}")


def _apply_registry() -> None:
    from vllm.model_executor.models.registry import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, DRAFTER_CLASS)


def _registry_applied() -> bool:
    from vllm.model_executor.models.registry import ModelRegistry

    model = ModelRegistry.models.get(ARCHITECTURE)
    return f"{getattr(model, 'module_name', '')}:{getattr(model, 'class_name', '')}" == DRAFTER_CLASS


# -- 3. validation at engine configuration ---------------------------------------------------------
def _locate_validation() -> None:
    from vllm.config import VllmConfig

    _require(callable(getattr(VllmConfig, "__post_init__", None)), "validate", "VllmConfig has no __post_init__")


def _apply_validation() -> None:
    from vllm.config import VllmConfig

    from dflash_vllm.validation import prepare_vllm_config, validate_vllm_config

    original = VllmConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
        prepare_vllm_config(self)
        original(self, *args, **kwargs)
        validate_vllm_config(self)

    __post_init__._dflash_vllm = True
    VllmConfig._orig___post_init__ = original
    VllmConfig.__post_init__ = __post_init__


def _validation_applied() -> bool:
    from vllm.config import VllmConfig

    return getattr(VllmConfig.__post_init__, "_dflash_vllm", False)


# -- 4. keep DFlash on the V1 model runner ---------------------------------------------------------
def _locate_v1() -> None:
    from vllm.config import VllmConfig

    _require(hasattr(VllmConfig, "_get_v2_model_runner_unsupported_features"), "v1-runner",
             "VllmConfig._get_v2_model_runner_unsupported_features is gone")


def _apply_v1() -> None:
    from vllm.config import VllmConfig

    original = VllmConfig._get_v2_model_runner_unsupported_features

    def _get_v2_model_runner_unsupported_features(self):
        unsupported = list(original(self))
        spec = self.speculative_config
        if spec is not None and spec.method == "dflash":
            unsupported.append("dflash-vllm's DFlash proposer (V1 runner)")
        return unsupported

    _get_v2_model_runner_unsupported_features._dflash_vllm = True
    VllmConfig._orig__get_v2_model_runner_unsupported_features = original
    VllmConfig._get_v2_model_runner_unsupported_features = _get_v2_model_runner_unsupported_features


def _v1_applied() -> bool:
    from vllm.config import VllmConfig

    return getattr(VllmConfig._get_v2_model_runner_unsupported_features, "_dflash_vllm", False)


# -- 5. per-request options checked at admission ----------------------------------------------------
def _input_processor():
    from vllm.v1.engine.input_processor import InputProcessor

    return InputProcessor


def _locate_request_options() -> None:
    cls = _input_processor()
    _require(callable(getattr(cls, "_validate_params", None)), "request-options",
             "InputProcessor._validate_params is gone")


def _apply_request_options() -> None:
    from dflash_vllm.options import parse_request_options

    cls = _input_processor()
    original = cls._validate_params

    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        spec = getattr(self, "speculative_config", None) or getattr(self.vllm_config, "speculative_config", None)
        if spec is not None and spec.method == "dflash":
            parse_request_options(getattr(params, "extra_args", None))  # DFlashRequestError: HTTP 400
        return result

    _validate_params._dflash_vllm = True
    cls._orig__validate_params = original
    cls._validate_params = _validate_params


def _request_options_applied() -> bool:
    return getattr(_input_processor()._validate_params, "_dflash_vllm", False)


# -- 6. start-up profile of the target's step time (adaptive cost model) ----------------------------
def _worker_classes():
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return [Worker, CPUWorker]


def _locate_profile() -> None:
    for cls in _worker_classes():
        _require(callable(getattr(cls, "compile_or_warm_up_model", None)), "step-profile",
                 f"{cls.__name__}.compile_or_warm_up_model is gone")


def _apply_profile() -> None:
    for cls in _worker_classes():
        original = cls.__dict__.get("compile_or_warm_up_model")
        if original is None or getattr(original, "_dflash_vllm", False):
            continue

        def compile_or_warm_up_model(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            runner = getattr(self, "model_runner", None)
            profile = getattr(getattr(runner, "drafter", None), "profile_target_steps", None)
            if profile is not None:
                profile(runner)
            return result

        compile_or_warm_up_model._dflash_vllm = True
        cls.compile_or_warm_up_model = compile_or_warm_up_model


def _profile_applied() -> bool:
    return all(getattr(cls.__dict__.get("compile_or_warm_up_model"), "_dflash_vllm", False)
               for cls in _worker_classes() if "compile_or_warm_up_model" in cls.__dict__)


# -- 7. a histogram of the draft lengths vLLM verified --------------------------------------------
DRAFT_LENGTH_METRIC = "vllm:dflash_draft_length"


def _spec_prom():
    from vllm.v1.spec_decode.metrics import SpecDecodingProm

    return SpecDecodingProm


def _locate_metric() -> None:
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    _require("num_draft_tokens_per_pos" in SpecDecodingStats.__dataclass_fields__, "draft-length-metric",
             "SpecDecodingStats.num_draft_tokens_per_pos is gone")
    cls = _spec_prom()
    _require(callable(getattr(cls, "observe", None)), "draft-length-metric", "SpecDecodingProm.observe is gone")


def _apply_metric() -> None:
    import prometheus_client

    cls = _spec_prom()
    original_init, original_observe = cls.__init__, cls.observe

    def __init__(self, speculative_config, labelnames, per_engine_labelvalues, *args, **kwargs):
        original_init(self, speculative_config, labelnames, per_engine_labelvalues, *args, **kwargs)
        self._dflash_hist = {}
        if speculative_config is None or speculative_config.method != "dflash":
            return
        k = speculative_config.num_speculative_tokens
        hist = prometheus_client.Histogram(
            name=DRAFT_LENGTH_METRIC, labelnames=labelnames, buckets=[float(i) for i in range(1, k + 1)],
            documentation="Drafts sent for one request in one step (requests sent at least one); "
                          "dflash-vllm's adaptive cut moves it with the load.")
        self._dflash_hist = {idx: hist.labels(*lv) for idx, lv in per_engine_labelvalues.items()}

    def observe(self, spec_decoding_stats, engine_idx: int = 0):
        original_observe(self, spec_decoding_stats, engine_idx)
        hist = getattr(self, "_dflash_hist", {}).get(engine_idx)
        per_pos = list(getattr(spec_decoding_stats, "num_draft_tokens_per_pos", []) or [])
        if hist is None or not per_pos:
            return
        # requests with exactly L drafts = reached position L-1 but not L
        for length in range(1, len(per_pos) + 1):
            count = per_pos[length - 1] - (per_pos[length] if length < len(per_pos) else 0)
            for _ in range(count):
                hist.observe(length)

    __init__._dflash_vllm = observe._dflash_vllm = True
    cls._orig___init__, cls._orig_observe = original_init, original_observe
    cls.__init__, cls.observe = __init__, observe


def _metric_applied() -> bool:
    return getattr(_spec_prom().observe, "_dflash_vllm", False)


# -- 8. plain decoding steps while drafting does not pay ----------------------------------------------
_PROPOSE_PARAMS = ["self", "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
                   "sample_hidden_states", "aux_hidden_states", "spec_decode_metadata", "common_attn_metadata",
                   "slot_mappings"]


PLAIN_FLAG = "dflash_plain"  # on a ModelRunnerOutput: no drafts were made; the next step runs plain


def _engine_classes():
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    return Scheduler, EngineCore


def _locate_plain_steps() -> None:
    cls = _runner_module().GPUModelRunner
    scheduler, core = _engine_classes()
    _require(callable(getattr(scheduler, "update_from_output", None)), "plain-steps",
             "Scheduler.update_from_output is gone")
    _require("take_draft_token_ids" in inspect.getsource(core.post_step), "plain-steps",
             "EngineCore.post_step no longer fetches draft tokens")
    for name in ("_prepare_inputs", "propose_draft_token_ids", "sample_tokens"):
        _require(callable(getattr(cls, name, None)), "plain-steps", f"GPUModelRunner.{name} is gone")
    params = list(inspect.signature(cls.propose_draft_token_ids).parameters)
    _require(params == _PROPOSE_PARAMS, "plain-steps",
             f"GPUModelRunner.propose_draft_token_ids takes {params}, expected {_PROPOSE_PARAMS}")
    _require("use_spec_decode = self.speculative_config is not None" in inspect.getsource(cls._prepare_inputs),
             "plain-steps", "GPUModelRunner._prepare_inputs no longer picks its path from self.speculative_config")


def _apply_plain_steps() -> None:
    cls = _runner_module().GPUModelRunner
    prepare, propose, sample = cls._prepare_inputs, cls.propose_draft_token_ids, cls.sample_tokens
    scheduler, core = _engine_classes()
    update, post_step = scheduler.update_from_output, core.post_step

    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        # A step with no drafts to verify, after which the drafter stays idle: vLLM's plain path
        # (logits at the last token of each request, the plain sampler, no spec metadata).
        if getattr(getattr(self, "drafter", None), "plain", False) and not scheduler_output.scheduled_spec_decode_tokens:
            spec, self.speculative_config = self.speculative_config, None
            try:
                return prepare(self, scheduler_output, *args, **kwargs)
            finally:
                self.speculative_config = spec
        return prepare(self, scheduler_output, *args, **kwargs)

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
                                slot_mappings):
        drafter = getattr(self, "drafter", None)
        if spec_decode_metadata is None and getattr(drafter, "plain", False):
            num_tokens = scheduler_output.total_num_scheduled_tokens
            # positions as a callable: a step of a plain streak that records nothing never reads them
            if drafter.stay_plain(self.input_batch.num_reqs, num_tokens, aux_hidden_states,
                                  lambda: self._get_positions(num_tokens), common_attn_metadata):
                return []  # no drafts: the scheduler already cleared every request's last ones
        return propose(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                       sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
                       slot_mappings)

    def sample_tokens(self, *args, **kwargs):
        # Tell the engine core that this step made no drafts (it then skips the draft-token fetch,
        # a round trip to the worker); the attribute travels with the output to its process.
        out = sample(self, *args, **kwargs)
        if getattr(getattr(self, "drafter", None), "plain", False) and hasattr(out, "sampled_token_ids"):
            setattr(out, PLAIN_FLAG, True)
        return out

    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        self._dflash_plain = getattr(model_runner_output, PLAIN_FLAG, False)
        return update(self, scheduler_output, model_runner_output, *args, **kwargs)

    def post_step_(self, model_executed: bool, *args, **kwargs):
        if model_executed and getattr(self.scheduler, "_dflash_plain", False):
            return None  # no drafts to fetch: the worker made none this step
        return post_step(self, model_executed, *args, **kwargs)

    for fn in (_prepare_inputs, propose_draft_token_ids, sample_tokens, update_from_output, post_step_):
        fn._dflash_vllm = True
    cls._orig__prepare_inputs, cls._orig_propose_draft_token_ids, cls._orig_sample_tokens = prepare, propose, sample
    cls._prepare_inputs, cls.propose_draft_token_ids, cls.sample_tokens = (_prepare_inputs, propose_draft_token_ids,
                                                                           sample_tokens)
    scheduler._orig_update_from_output, core._orig_post_step = update, post_step
    scheduler.update_from_output, core.post_step = update_from_output, post_step_


def _plain_steps_applied() -> bool:
    cls = _runner_module().GPUModelRunner
    scheduler, core = _engine_classes()
    return all(getattr(getattr(c, n), "_dflash_vllm", False) for c, n in (
        (cls, "_prepare_inputs"), (cls, "propose_draft_token_ids"), (cls, "sample_tokens"),
        (scheduler, "update_from_output"), (core, "post_step")))


def _coordinator_module():
    import vllm.v1.core.kv_cache_coordinator as coordinator

    return coordinator


def _locate_replay() -> None:
    mod = _coordinator_module()
    fn = getattr(mod, "replay_boundaries", None)
    _require(callable(fn), "replay-boundaries", "kv_cache_coordinator.replay_boundaries is gone")
    params = list(inspect.signature(fn).parameters)
    _require(params == ["num_prompt_tokens", "scheduler_block_size", "use_eagle"], "replay-boundaries",
             f"replay_boundaries takes {params}")
    _require("replay_boundaries(" in inspect.getsource(mod.KVCacheCoordinator.cache_blocks), "replay-boundaries",
             "KVCacheCoordinator.cache_blocks no longer calls replay_boundaries")


def _apply_replay() -> None:
    mod = _coordinator_module()
    # a pure function of three scalars, returning a tuple: called per request per step while a
    # speculative engine caches blocks, and for EAGLE-style drafters (DFlash among them) it builds a
    # set and sorts it each time (~0.1 ms a step at 64 requests on the 2-core CPU, under cProfile:
    # the whole gap in scheduler time between a plain engine and the plugin's decoding plainly)
    cached = functools.lru_cache(maxsize=8192)(mod.replay_boundaries)
    cached._dflash_vllm = True
    mod._orig_replay_boundaries, mod.replay_boundaries = mod.replay_boundaries, cached


def _replay_applied() -> bool:
    return getattr(_coordinator_module().replay_boundaries, "_dflash_vllm", False)


PATCHES: list[Patch] = [
    Patch("proposer", "gpu_model_runner.DFlashProposer -> DFlashVllmProposer: `method: dflash` builds our "
          "proposer (V1 runner; CPUModelRunner inherits it).", _locate_proposer, _apply_proposer,
          _proposer_applied),
    Patch("drafter-model", f"ModelRegistry[{ARCHITECTURE}] -> {DRAFTER_CLASS}: z-lab checkpoints load into "
          "our drafter model.", _locate_registry, _apply_registry, _registry_applied),
    Patch("validate", "VllmConfig.__post_init__ + validate_vllm_config: a bad drafter/target/options "
          "combination fails when the engine is configured, in the user's process.", _locate_validation,
          _apply_validation, _validation_applied),
    Patch("v1-runner", "VllmConfig._get_v2_model_runner_unsupported_features lists DFlash: on GPU, vLLM "
          "picks the V1 runner (where our proposer lives) instead of Model Runner V2.", _locate_v1,
          _apply_v1, _v1_applied),
    Patch("request-options", "InputProcessor._validate_params also checks a request's dflash options "
          "(extra_args / vllm_xargs): a bad one fails that request with HTTP 400, not the batch.",
          _locate_request_options, _apply_request_options, _request_options_applied),
    Patch("step-profile", "Worker/CPUWorker.compile_or_warm_up_model then time a few target steps: the "
          "seed of the adaptive cost model.", _locate_profile, _apply_profile, _profile_applied),
    Patch("draft-length-metric", f"SpecDecodingProm also exports {DRAFT_LENGTH_METRIC}, a histogram of "
          "per-request draft lengths, from vLLM's own per-position draft counts.", _locate_metric,
          _apply_metric, _metric_applied),
    Patch("plain-steps", "GPUModelRunner._prepare_inputs/propose_draft_token_ids: while the adaptive "
          "drafter is idle (drafting does not pay at this load), steps run vLLM's plain decoding path and "
          "skip the drafter's context pass; the drafter decides each step whether to resume.",
          _locate_plain_steps, _apply_plain_steps, _plain_steps_applied),
    Patch("replay-boundaries", "kv_cache_coordinator.replay_boundaries memoised: the scheduler asks it per "
          "request per step, and for DFlash it builds and sorts a set each time (a pure function of three "
          "scalars).", _locate_replay, _apply_replay, _replay_applied),
]


def apply_all() -> list[str]:
    """Apply every patch not yet applied in this process; returns the names applied now."""
    done = []
    for patch in PATCHES:
        if patch.applied():
            continue
        patch.locate()
        patch.apply()
        _require(patch.applied(), patch.name, "applied but not in effect")
        done.append(patch.name)
    if done:
        logger.debug("dflash-vllm patches applied: %s", ", ".join(done))
    return done
