"""Start-up checks of a DFlash deployment, run when vLLM builds its ``VllmConfig``.

They run in the user's process (``LLM(...)`` or ``vllm serve``) before any engine process starts,
so a bad drafter, target or option is one clear ``DFlashConfigError`` instead of a crash mid-serving.
"""

from __future__ import annotations

import logging

from dflash_vllm.checkpoint import DFlashConfigError, parse_draft_spec, validate_pair
from dflash_vllm.options import parse_options

logger = logging.getLogger("vllm.dflash_vllm.validation")


def _target_supports_aux_hidden_states(model_config) -> bool | None:
    """Whether the target's vLLM class can return aux hidden states (EAGLE-3 interface); None if unknown."""
    try:
        from vllm.model_executor.models.interfaces import supports_eagle3
        from vllm.model_executor.models.registry import ModelRegistry

        model_cls, _ = ModelRegistry.resolve_model_cls(model_config.architectures, model_config=model_config)
    except Exception:  # resolution problems are vLLM's to report, with its own message
        return None
    return bool(supports_eagle3(model_cls))


def prepare_vllm_config(vllm_config) -> None:
    """Before vLLM resolves its defaults: adaptive drafting sends each request its own number of
    drafts, which vLLM's synchronous scheduler takes (its async scheduler schedules a fixed count)."""
    spec_config = vllm_config.speculative_config
    if spec_config is None or spec_config.method != "dflash":
        return
    options = parse_options(vllm_config.additional_config)
    sched = vllm_config.scheduler_config
    if not options.adaptive or sched is None:
        return
    if sched.async_scheduling is None:
        sched.async_scheduling = False
        logger.info("dflash-vllm: adaptive draft length runs with vLLM's synchronous scheduler "
                    "(set additional_config.dflash.adaptive=false to keep async scheduling)")
    elif sched.async_scheduling:
        raise DFlashConfigError(
            "dflash-vllm: adaptive draft length (additional_config.dflash.adaptive, on by default) needs "
            "vLLM's synchronous scheduler, but async scheduling was requested; drop --async-scheduling, "
            'or pass --additional-config \'{"dflash": {"adaptive": false}}\' for fixed-length drafts')


def validate_vllm_config(vllm_config) -> None:
    spec_config = vllm_config.speculative_config
    if spec_config is None or spec_config.method != "dflash":
        return
    parse_options(vllm_config.additional_config)
    model_config = vllm_config.model_config
    spec = parse_draft_spec(spec_config.draft_model_config.hf_config)
    text_config = model_config.hf_text_config
    validate_pair(
        spec,
        target_hidden_size=model_config.get_hidden_size(),
        target_vocab_size=model_config.get_vocab_size(),
        target_num_layers=int(text_config.num_hidden_layers),
        num_speculative_tokens=spec_config.num_speculative_tokens,
    )
    if _target_supports_aux_hidden_states(model_config) is False:
        raise DFlashConfigError(
            f"target architecture {model_config.architectures} cannot expose auxiliary hidden states "
            "(vLLM's SupportsEagle3 interface), which DFlash reads at target_layer_ids; serve a target "
            "whose vLLM model implements it (Qwen3, Llama, ...)"
        )
    if vllm_config.use_v2_model_runner:
        logger.warning(
            "dflash-vllm: VLLM_USE_V2_MODEL_RUNNER=1 forces Model Runner V2, whose own DFlash speculator "
            "runs instead of dflash-vllm's proposer; unset it to use dflash-vllm"
        )
