"""Block inputs of one drafting step: query ids, positions and paged-KV slots for a batch.

For request ``r`` with ``n_r`` target tokens in this step (``query_start_loc``), of which the last
``rejected_r`` were rejected drafts, the last valid position is ``p_r`` and the block is

    ids       = [next_token_r, MASK x K]
    positions = p_r + 1 .. p_r + 1 + K
    slots     = block_table[r, pos // kv_block] * kv_block + pos % kv_block

Context slots are those of every target token of the step at its own position: the rejected
ones are overwritten by the block's own K/V right after (their positions are the block's).

``block_inputs_ref`` is the PyTorch reference (a handful of kernels and temporaries);
``block_inputs_triton`` builds everything in one launch, one program per request;
``block_inputs_cpu`` is the CPU path: the same arithmetic in NumPy on the tensors' memory (a
dozen small torch ops cost ~0.2 ms per step on a 2-core CPU, ~3% of a drafting step at one
request; NumPy does it in a fraction); ``block_inputs`` dispatches.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None


@dataclass
class BlockInputs:
    input_ids: torch.Tensor  # [B * (1 + K)] int32
    positions: torch.Tensor  # [B * (1 + K)] int64
    slot_mapping: torch.Tensor  # [B * (1 + K)] int64, block queries
    context_slot_mapping: torch.Tensor  # [T] int64, context tokens
    sample_indices: torch.Tensor  # [B * K] int64, rows 1..K of each block
    valid_seq_lens: torch.Tensor  # [B] int32, context length seen by each block (p_r + 1)


def _slots(block_table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, kv_block: int) -> torch.Tensor:
    # Positions past the table (a block running beyond max_model_len) map to its last block;
    # vLLM's own DFlash inputs clamp the same way, and those drafts are never verified.
    block_idx = (positions // kv_block).clamp(max=block_table.shape[1] - 1)
    return block_table[rows, block_idx].to(torch.int64) * kv_block + positions % kv_block


def token_slots(block_table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, kv_block: int) -> torch.Tensor:
    """[N] paged-KV slots of tokens at ``positions`` of the requests in batch ``rows``."""
    return _slots(block_table, rows, positions, kv_block)


def context_slots(query_start_loc: torch.Tensor, target_positions: torch.Tensor, block_table: torch.Tensor,
                  kv_block_size: int, num_reqs: int) -> torch.Tensor:
    """[T] paged-KV slots of the step's target tokens, each at its own position (the context alone:
    what a step without drafts writes)."""
    qsl = query_start_loc[: num_reqs + 1].to(torch.int64)
    rows = torch.arange(num_reqs, device=target_positions.device)
    ctx_rows = torch.repeat_interleave(rows, qsl[1:] - qsl[:-1], output_size=target_positions.shape[0])
    return _slots(block_table, ctx_rows, target_positions, kv_block_size)


def block_inputs_ref(
    query_start_loc: torch.Tensor,  # [B + 1] int32, target tokens of each request this step
    num_rejected: torch.Tensor | None,  # [B] int32, rejected drafts at the end of each request
    target_positions: torch.Tensor,  # [T] int64
    next_token_ids: torch.Tensor,  # [B] int32, the last verified token of each request
    block_table: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, tokens in the target's KV cache after this step
    kv_block_size: int,
    mask_token_id: int,
    num_drafts: int,
) -> BlockInputs:
    num_reqs = next_token_ids.shape[0]
    device = target_positions.device
    q = 1 + num_drafts
    rows = torch.arange(num_reqs, device=device)

    # Context: every target token of the step, at its own position.
    context_slot_mapping = context_slots(query_start_loc, target_positions, block_table, kv_block_size, num_reqs)

    # Block: after the last valid (accepted) target token of each request.
    rejected = num_rejected.to(torch.int64) if num_rejected is not None else torch.zeros_like(rows)
    valid_seq_lens = seq_lens[:num_reqs].to(torch.int64) - rejected
    positions = (valid_seq_lens[:, None] + torch.arange(q, device=device)).reshape(-1)
    slot_mapping = _slots(block_table, rows.repeat_interleave(q), positions, kv_block_size)

    input_ids = torch.full((num_reqs, q), mask_token_id, dtype=torch.int32, device=device)
    input_ids[:, 0] = next_token_ids[:num_reqs]
    sample_indices = (rows[:, None] * q + torch.arange(1, q, device=device)).reshape(-1)
    return BlockInputs(
        input_ids=input_ids.reshape(-1),
        positions=positions,
        slot_mapping=slot_mapping,
        context_slot_mapping=context_slot_mapping,
        sample_indices=sample_indices,
        valid_seq_lens=valid_seq_lens.to(torch.int32),
    )


if triton is not None:

    def _block_inputs_kernel(qsl_ptr, rejected_ptr, tpos_ptr, next_ptr, table_ptr, seq_lens_ptr,
                             ids_ptr, pos_ptr, slot_ptr, ctx_slot_ptr, sample_ptr, valid_ptr,
                             table_stride, max_blocks, kv_block, mask_id,
                             HAS_REJECTED: tl.constexpr, Q: tl.constexpr, BLOCK_Q: tl.constexpr,
                             BLOCK_T: tl.constexpr):
        r = tl.program_id(0)
        start = tl.load(qsl_ptr + r)
        end = tl.load(qsl_ptr + r + 1)
        row = table_ptr + r.to(tl.int64) * table_stride
        # context tokens of this request, at their own positions
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = t < end
            p = tl.load(tpos_ptr + t, mask=ok, other=0).to(tl.int64)
            blk = tl.minimum(p // kv_block, max_blocks - 1)
            phys = tl.load(row + blk, mask=ok, other=0).to(tl.int64)
            tl.store(ctx_slot_ptr + t, phys * kv_block + p % kv_block, mask=ok)
        # the block after the last valid token
        valid = tl.load(seq_lens_ptr + r).to(tl.int64)
        if HAS_REJECTED:
            valid -= tl.load(rejected_ptr + r).to(tl.int64)
        j = tl.arange(0, BLOCK_Q)
        ok = j < Q
        p = valid + j
        blk = tl.minimum(p // kv_block, max_blocks - 1)
        phys = tl.load(row + blk, mask=ok, other=0).to(tl.int64)
        out = r.to(tl.int64) * Q + j
        nxt = tl.load(next_ptr + r)
        tl.store(ids_ptr + out, tl.where(j == 0, nxt, mask_id).to(tl.int32), mask=ok)
        tl.store(pos_ptr + out, p, mask=ok)
        tl.store(slot_ptr + out, phys * kv_block + p % kv_block, mask=ok)
        tl.store(sample_ptr + r.to(tl.int64) * (Q - 1) + j - 1, out, mask=ok & (j > 0))
        tl.store(valid_ptr + r, valid.to(tl.int32))


def block_inputs_cpu(query_start_loc, num_rejected, target_positions, next_token_ids, block_table,
                     seq_lens, kv_block_size: int, mask_token_id: int, num_drafts: int) -> BlockInputs:
    """``block_inputs_ref`` for CPU tensors, in NumPy (same outputs, dtypes and clamping)."""
    num_reqs = next_token_ids.shape[0]
    q = 1 + num_drafts
    table = block_table.numpy()
    last_block = table.shape[1] - 1

    def slots(rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        blk = np.minimum(pos // kv_block_size, last_block)
        return table[rows, blk].astype(np.int64) * kv_block_size + pos % kv_block_size

    tpos = target_positions.numpy().astype(np.int64, copy=False)
    reqs = np.arange(num_reqs)
    if tpos.shape[0] == num_reqs:  # decoding: one target token each (a scheduled request has >= 1)
        ctx_rows = reqs
    else:
        ctx_rows = np.repeat(reqs, np.diff(query_start_loc.numpy()[: num_reqs + 1]))
    valid = seq_lens.numpy()[:num_reqs].astype(np.int64)
    if num_rejected is not None:
        valid -= num_rejected.numpy()[:num_reqs]
    pos = (valid[:, None] + np.arange(q)).reshape(-1)
    ids = np.full((num_reqs, q), mask_token_id, dtype=np.int32)
    ids[:, 0] = next_token_ids.numpy()[:num_reqs]
    sample = (reqs[:, None] * q + np.arange(1, q)).reshape(-1)
    return BlockInputs(
        input_ids=torch.from_numpy(ids.reshape(-1)),
        positions=torch.from_numpy(pos),
        slot_mapping=torch.from_numpy(slots(np.repeat(reqs, q), pos)),
        context_slot_mapping=torch.from_numpy(slots(ctx_rows, tpos[: len(ctx_rows)])),
        sample_indices=torch.from_numpy(sample),
        valid_seq_lens=torch.from_numpy(valid.astype(np.int32)),
    )


@functools.cache
def _jitted(interpret: str | None):
    return triton.jit(_block_inputs_kernel)  # at first use: triton.jit reads TRITON_INTERPRET then


def block_inputs_triton(query_start_loc, num_rejected, target_positions, next_token_ids, block_table,
                        seq_lens, kv_block_size: int, mask_token_id: int, num_drafts: int) -> BlockInputs:
    num_reqs = next_token_ids.shape[0]
    num_ctx = target_positions.shape[0]
    device = target_positions.device
    q = 1 + num_drafts
    ids = torch.empty(num_reqs * q, dtype=torch.int32, device=device)
    pos = torch.empty(num_reqs * q, dtype=torch.int64, device=device)
    slots = torch.empty(num_reqs * q, dtype=torch.int64, device=device)
    ctx_slots = torch.empty(num_ctx, dtype=torch.int64, device=device)
    sample = torch.empty(num_reqs * num_drafts, dtype=torch.int64, device=device)
    valid = torch.empty(num_reqs, dtype=torch.int32, device=device)
    if num_reqs:
        table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        _jitted(os.environ.get("TRITON_INTERPRET"))[(num_reqs,)](
            query_start_loc, num_rejected if num_rejected is not None else valid, target_positions,
            next_token_ids, table, seq_lens, ids, pos, slots, ctx_slots, sample, valid,
            table.stride(0), table.shape[1], kv_block_size, mask_token_id,
            HAS_REJECTED=num_rejected is not None, Q=q, BLOCK_Q=triton.next_power_of_2(q), BLOCK_T=64,
        )
    return BlockInputs(input_ids=ids, positions=pos, slot_mapping=slots, context_slot_mapping=ctx_slots,
                       sample_indices=sample, valid_seq_lens=valid)


def block_inputs(*args, use_triton: bool | None = None, **kwargs) -> BlockInputs:
    """The one dispatch point: the Triton kernel on CUDA (or when asked), NumPy on CPU, else the
    reference."""
    device = args[2].device.type
    if use_triton is None:
        use_triton = triton is not None and device == "cuda"
    if use_triton:
        return block_inputs_triton(*args, **kwargs)
    return (block_inputs_cpu if device == "cpu" else block_inputs_ref)(*args, **kwargs)
