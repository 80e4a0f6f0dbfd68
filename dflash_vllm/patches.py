"""Every change dflash-vllm makes to vLLM, each a named ``Patch``, applied in order by ``apply_all``.

Written against vLLM 0.32.0 (``plugin.py`` refuses other versions). Each patch checks, before it
changes anything, that its target is where it expects it (``locate``), and raises ``PatchError``
naming the patch if not: a moved target fails loudly at start-up instead of silently leaving
vLLM's own path in place. ``apply_all`` is idempotent per process.
"""

from __future__ import annotations

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

    from dflash_vllm.validation import validate_vllm_config

    original = VllmConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
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
