import torch
from dflash_vllm.kernels import block_inputs, block_inputs_cpu, block_inputs_ref, block_inputs_triton
from hypothesis import given, settings
from hypothesis import strategies as st


def explicit(qsl, rejected, positions, next_ids, table, seq_lens, kv_block, mask_id, k):
    """Per-request, per-position construction straight from the definition."""
    ids, pos, slots, ctx_slots, sample = [], [], [], [], []
    slot = lambda r, p: int(table[r][min(p // kv_block, len(table[r]) - 1)]) * kv_block + p % kv_block  # noqa: E731
    for r in range(len(next_ids)):
        for t in range(qsl[r], qsl[r + 1]):
            ctx_slots.append(slot(r, positions[t]))
        start = seq_lens[r] - (rejected[r] if rejected is not None else 0)
        for j in range(1 + k):
            ids.append(next_ids[r] if j == 0 else mask_id)
            pos.append(start + j)
            slots.append(slot(r, start + j))
            if j:
                sample.append(r * (1 + k) + j)
    return ids, pos, slots, ctx_slots, sample


def draw_case(data):
    num_reqs = data.draw(st.integers(1, 5))
    k = data.draw(st.integers(1, 9))
    kv_block = data.draw(st.sampled_from([1, 4, 16]))
    with_rejected = data.draw(st.booleans())
    decoding = data.draw(st.booleans())  # one target token per request (the CPU path's shortcut)
    qlens, seq_lens, rejected, positions = [], [], [], []
    for _ in range(num_reqs):
        n = 1 if decoding else data.draw(st.integers(1, 12))
        seq = data.draw(st.integers(n, 60))
        rej = data.draw(st.integers(0, min(n - 1, k))) if with_rejected else 0
        qlens.append(n)
        seq_lens.append(seq)
        rejected.append(rej)
        positions.extend(range(seq - n, seq))
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    # sometimes too short a table: blocks running past it clamp to its last entry
    max_blocks = max(1, (max(seq_lens) + k + 1) // kv_block + 1 - data.draw(st.integers(0, 1)))
    table = [data.draw(st.lists(st.integers(0, 50), min_size=max_blocks, max_size=max_blocks)) for _ in range(num_reqs)]
    next_ids = [data.draw(st.integers(0, 99)) for _ in range(num_reqs)]
    args = (
        torch.tensor(qsl, dtype=torch.int32),
        torch.tensor(rejected, dtype=torch.int32) if with_rejected else None,
        torch.tensor(positions, dtype=torch.int64),
        torch.tensor(next_ids, dtype=torch.int32),
        torch.tensor(table, dtype=torch.int32),
        torch.tensor(seq_lens, dtype=torch.int32),
        kv_block, 123, k,
    )
    want = explicit(qsl, rejected if with_rejected else None, positions, next_ids, table, seq_lens, kv_block, 123, k)
    return args, want


FIELDS = ("input_ids", "positions", "slot_mapping", "context_slot_mapping", "sample_indices")


def check(got, want, who):
    for name, expected in zip(FIELDS, want, strict=True):
        values = getattr(got, name).tolist()
        bad = next((i for i, (a, b) in enumerate(zip(values, expected, strict=True)) if a != b), None)
        assert bad is None, f"{who}.{name}[{bad}] = {values[bad]}, want {expected[bad]}"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_block_inputs_match_definition(data):
    args, want = draw_case(data)
    check(block_inputs_ref(*args), want, "ref")


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_block_inputs_triton_matches_reference(data):
    """The one-launch Triton kernel (under TRITON_INTERPRET=1 here) against the definition and the
    reference: single requests, all drafts rejected, tables too short for the block, kv block 1."""
    args, want = draw_case(data)
    got, ref = block_inputs_triton(*args), block_inputs_ref(*args)
    check(got, want, "triton")
    assert got.valid_seq_lens.tolist() == ref.valid_seq_lens.tolist()
    assert got.input_ids.dtype == ref.input_ids.dtype and got.slot_mapping.dtype == ref.slot_mapping.dtype


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_block_inputs_cpu_matches_definition_and_reference(data):
    """The NumPy CPU path (what the proposer runs on CPU) against the definition, with the
    reference's dtypes, also through ``block_inputs`` (which picks it: the test below)."""
    args, want = draw_case(data)
    got, ref = block_inputs_cpu(*args), block_inputs_ref(*args)
    check(got, want, "cpu")
    assert got.valid_seq_lens.tolist() == ref.valid_seq_lens.tolist()
    for name in (*FIELDS, "valid_seq_lens"):
        assert getattr(got, name).dtype == getattr(ref, name).dtype, name
    check(block_inputs(*args, use_triton=False), want, "dispatch")


def test_dispatch_takes_the_cpu_path_for_cpu_tensors(monkeypatch):
    import importlib

    mod = importlib.import_module("dflash_vllm.kernels.block_inputs")  # the package re-exports a function of that name
    called = []
    monkeypatch.setattr(mod, "block_inputs_cpu", lambda *a, **k: called.append("cpu"))
    monkeypatch.setattr(mod, "block_inputs_ref", lambda *a, **k: called.append("ref"))
    qsl, pos, ids = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([5]), torch.tensor([7], dtype=torch.int32)
    mod.block_inputs(qsl, None, pos, ids, torch.zeros(1, 4, dtype=torch.int32), torch.tensor([6], dtype=torch.int32),
                     16, 123, 3, use_triton=False)
    assert called == ["cpu"]
