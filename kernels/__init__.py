"""Kernels for the drafting step (shipped as ``dflash_vllm.kernels``).

Each file holds a PyTorch reference ``<name>_ref``; the proposer calls the reference on CPU, where
vLLM runs no Triton, except where a NumPy path is faster there (``block_inputs_cpu``,
``context_kv_cpu``).
"""

from dflash_vllm.kernels.block_inputs import (
    BlockInputs,
    block_inputs,
    block_inputs_cpu,
    block_inputs_ref,
    block_inputs_triton,
    context_slots,
    token_slots,
)
from dflash_vllm.kernels.context_kv import context_kv, context_kv_cpu, context_kv_ref, context_kv_triton
from dflash_vllm.kernels.draft_select import (
    DraftSelection,
    draft_probs,
    draft_probs_ref,
    draft_select,
    draft_select_ref,
    triton_usable,
)

__all__ = ["BlockInputs", "block_inputs", "block_inputs_cpu", "block_inputs_ref", "block_inputs_triton", "context_kv", "context_kv_cpu", "context_kv_ref",
           "context_kv_triton", "context_slots", "DraftSelection", "draft_probs", "draft_probs_ref", "draft_select",
           "draft_select_ref", "token_slots", "triton_usable"]
