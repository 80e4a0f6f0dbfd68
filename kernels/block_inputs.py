"""Block inputs of one drafting step: query ids, positions and paged-KV slots for a batch.

For request ``r`` with ``n_r`` target tokens in this step (``query_start_loc``), of which the last
``rejected_r`` were rejected drafts, the last valid position is ``p_r`` and the block is

    ids       = [next_token_r, MASK x K]
    positions = p_r + 1 .. p_r + 1 + K
    slots     = block_table[r, pos // kv_block] * kv_block + pos % kv_block

Context slots are those of every target token of the step at its own position: the rejected
ones are overwritten by the block's own K/V right after (their positions are the block's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    num_ctx = target_positions.shape[0]
    device = target_positions.device
    q = 1 + num_drafts
    rows = torch.arange(num_reqs, device=device)
    qsl = query_start_loc[: num_reqs + 1].to(torch.int64)

    # Context: every target token of the step, at its own position.
    ctx_rows = torch.repeat_interleave(rows, qsl[1:] - qsl[:-1], output_size=num_ctx)
    context_slot_mapping = _slots(block_table, ctx_rows, target_positions, kv_block_size)

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
