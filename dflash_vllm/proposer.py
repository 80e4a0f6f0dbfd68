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
from dataclasses import replace

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.interfaces import supports_multimodal
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

from dflash_vllm import __version__
from dflash_vllm.checkpoint import DFlashConfigError, feature_index, parse_draft_spec
from dflash_vllm.kernels import block_inputs_ref
from dflash_vllm.options import parse_options

logger = init_logger("vllm.dflash_vllm.proposer")

# Debugging aid (and the cross-side convention test): save the target tokens, positions and drafter
# features (target_layer_ids order) of the first DUMP_STEPS drafting steps to this path, as a list.
DUMP_FEATURES_ENV = "DFLASH_VLLM_DUMP_FEATURES"
DUMP_STEPS = 8


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


class DFlashVllmProposer(SpecDecodeBaseProposer):
    """dflash-vllm's proposer; stands where vLLM builds its ``DFlashProposer``."""

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
        logger.info(
            "dflash-vllm %s: DFlash proposer active (block_size=%d, num_speculative_tokens=%d, "
            "target_layer_ids=%s)",
            __version__, self.spec.block_size, self.num_speculative_tokens,
            list(self.spec.target_layer_ids),
        )

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

        # KV injection for every target token of the step (also when no drafts are wanted:
        # the next step's blocks attend to this context).
        features = self._features(target_hidden_states)
        if self._dump_path and len(self._dumped) < DUMP_STEPS:
            # clone: on CPU ``.cpu()`` is the runner's persistent buffer, rewritten by later steps
            self._dumped.append({"token_ids": target_token_ids.cpu().clone(),
                                 "positions": target_positions.cpu().clone(),
                                 "query_start_loc": cad.query_start_loc.cpu().clone(),
                                 "features": features.float().cpu().clone()})
            torch.save(self._dumped, self._dump_path)
        context = self.model.fuse_context(features)
        inputs = block_inputs_ref(
            cad.query_start_loc, num_rejected_tokens_gpu, target_positions, next_token_ids,
            cad.block_table_tensor, cad.seq_lens, self.block_size, self.mask_token_id, k,
        )
        self.model.write_context_kv(context, target_positions, inputs.context_slot_mapping)
        if k == 0:
            return torch.empty(num_reqs, 0, dtype=torch.int64, device=target_positions.device)

        q = 1 + k
        num_query = num_reqs * q
        draft_cad = CommonAttentionMetadata(
            query_start_loc=self.arange[: num_reqs + 1] * q,
            query_start_loc_cpu=torch.arange(num_reqs + 1, dtype=torch.int32) * q,
            seq_lens=inputs.valid_seq_lens + q,
            seq_lens_cpu_upper_bound=(
                None if cad.seq_lens_cpu_upper_bound is None else cad.seq_lens_cpu_upper_bound + q
            ),
            num_reqs=num_reqs,
            num_actual_tokens=num_query,
            max_query_len=q,
            max_seq_len=cad.max_seq_len + q,
            block_table_tensor=cad.block_table_tensor,
            slot_mapping=inputs.slot_mapping,
            causal=False,
        )
        _, per_layer_metadata = self.build_per_group_and_layer_attn_metadata(draft_cad)
        with set_forward_context(
            per_layer_metadata, self.vllm_config, num_tokens=num_query,
            slot_mapping=self._get_slot_mapping(num_query, inputs.slot_mapping),
        ):
            hidden = self.model(input_ids=inputs.input_ids, positions=inputs.positions)

        drafts, draft_probs = self._sample_draft_tokens(hidden[inputs.sample_indices], sampling_metadata)
        if draft_probs is not None:
            self._last_draft_probs = draft_probs.view(num_reqs, k, -1).contiguous()
        return drafts.view(num_reqs, k)

    @torch.inference_mode()
    def dummy_run(self, num_tokens: int, use_cudagraphs: bool = True, is_graph_capturing: bool = False,
                  slot_mappings: dict[str, torch.Tensor] | None = None) -> None:
        """Profiling run: the context projection at ``num_tokens`` and one block pass of the largest batch."""
        n_features = len(self.spec.target_layer_ids) * self.vllm_config.model_config.get_hidden_size()
        features = torch.zeros(num_tokens, n_features, dtype=self.dtype, device=self.device)
        self.model.write_context_kv(self.model.fuse_context(features), self.positions[:num_tokens], None)
        num_query = min(num_tokens, self.max_batch_size * (1 + self.num_speculative_tokens))
        # Like vLLM's own dummy runs: write the cache only when the runner hands slots for our layers.
        writes_cache = bool(slot_mappings) and next(iter(self._draft_attn_layer_names)) in slot_mappings
        slots = self._get_slot_mapping(num_query) if writes_cache else (slot_mappings or {})
        with set_forward_context(None, self.vllm_config, num_tokens=num_query, slot_mapping=slots):
            self.model(input_ids=self.input_ids[:num_query], positions=self.positions[:num_query])
