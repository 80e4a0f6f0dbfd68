"""Adaptive draft lengths at real shapes: what the cut rule chooses on a GPU, batch size by batch size.

vLLM is not needed (its GPU build is not on the lent GPU machine). The script times, with CUDA
graphs and random bf16 weights:

* the target's verify step: a Qwen3-8B-shaped decoder (36 layers, hidden 4096, 32/8 heads x 128,
  MLP 12288, vocabulary 151,936) over ``batch x q`` tokens, each request with ``--context``
  cached tokens; the logits of every verified token;
* the drafter's step: a 5-layer DFlash drafter of the same width, fusing and projecting the
  context of the tokens just verified, one block pass of 16 queries per request over the cached
  context, and the target's LM head plus argmax over the 15 drafts.

It then feeds those times to the plugin's own rule (``dflash_vllm.adaptive``: ``StepCostModel``,
``choose_requests`` and ``choose_draft_lengths``) for requests whose drafts are accepted with a
constant conditional rate ``p`` per position, and reports the draft length chosen at each batch
size, with the model's predicted speed-up over plain decoding and over fixed 15-token drafts.
The times are GPU kernels only: the live engine's cost model also sees the scheduler's and the
sampler's host time, which flattens the curve at small batches.

    python -m dflash_vllm.bench.gpu_sweep --json sweep.json      # on a CUDA machine
    python -m dflash_vllm.bench.gpu_sweep --smoke                # CPU, tiny shapes (tests)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dflash_vllm.adaptive import StepCostModel, choose_draft_lengths, choose_requests
from dflash_vllm.models.core import DFlashDrafter, DFlashLayer, DrafterConfig, RMSNorm, rope_cos_sin

QUERIES = (1, 2, 3, 4, 6, 8, 12, 16)  # tokens per request in a verify step (1 + drafts)
RATES = (0.5, 0.7, 0.8, 0.9)


def shapes(smoke: bool) -> dict:
    if smoke:
        return dict(hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=512, target_layers=4,
                    draft_layers=2, block=16, batches=(1, 4), context=32)
    return dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=12288, vocab=151_936, target_layers=36,
                draft_layers=5, block=16, batches=(1, 2, 4, 8, 16, 32, 64, 128), context=1024)


def layer_config(s: dict, layers: int) -> DrafterConfig:
    return DrafterConfig(hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=layers,
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                         vocab_size=s["vocab"], block_size=s["block"], mask_token_id=s["vocab"] - 1,
                         target_layer_ids=[1, 9, 17, 25, 33][:layers], num_target_layers=s["target_layers"])


class Stack(nn.Module):
    """Qwen3 decoder layers over a KV-cache prefix: ``DFlashLayer`` with the cached K/V as its context
    is a target layer verifying ``q`` new tokens (causal among them, all of the prefix visible)."""

    def __init__(self, cfg: DrafterConfig, s: dict):
        super().__init__()
        self.embed = nn.Embedding(s["vocab"], s["hidden"])
        self.layers = nn.ModuleList(DFlashLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(s["hidden"], cfg.rms_norm_eps)
        self.lm_head = nn.Linear(s["hidden"], s["vocab"], bias=False)


def timed(fn: Callable[[], object], cuda: bool, reps: int) -> float:
    """Median seconds of ``fn``: captured into a CUDA graph and replayed on CUDA, plain calls on CPU."""
    if cuda:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(s: dict, device: torch.device, reps: int) -> tuple[dict[int, dict[int, float]], dict[int, float]]:
    """Seconds of a target verify step per (batch, q) and of a drafter step per batch."""
    cuda = device.type == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    L, B, H, kvh, d = s["context"], s["block"], s["hidden"], s["kv_heads"], s["head_dim"]
    bmax = max(s["batches"])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # built in bf16 on CUDA: no fp32 copy of an 8B-parameter model
    with torch.device(device):
        target = Stack(layer_config(s, s["target_layers"]), s).eval()
        dcfg = layer_config(s, s["draft_layers"])
        drafter = DFlashDrafter(dcfg).eval()
        for p in [*target.parameters(), *drafter.parameters()]:
            nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.ones_(p)
        # one static KV prefix per layer, sliced per batch size
        t_cache = [(torch.randn(bmax, L, kvh, d, dtype=dt), torch.randn(bmax, L, kvh, d, dtype=dt))
                   for _ in target.layers]
        d_cache = [(torch.randn(bmax, L, kvh, d, dtype=dt), torch.randn(bmax, L, kvh, d, dtype=dt))
                   for _ in drafter.layers]
        features = torch.randn(bmax * B, len(dcfg.target_layer_ids) * H, dtype=dt)
    torch.set_default_dtype(default)
    target_s: dict[int, dict[int, float]] = {}
    draft_s: dict[int, float] = {}
    with torch.inference_mode():
        for b in s["batches"]:
            target_s[b] = {}
            for q in QUERIES:
                ids = torch.randint(0, s["vocab"], (b, q), device=device)
                pos = (L + torch.arange(q, device=device)).expand(b, q)
                cos, sin = (t.to(dt) for t in rope_cos_sin(pos, d, 1e6))
                mask = torch.ones(q, L + q, dtype=torch.bool, device=device)
                mask[:, L:] = torch.ones(q, q, dtype=torch.bool, device=device).tril()
                mask = mask.expand(b, q, L + q)

                def verify(ids=ids, cos=cos, sin=sin, mask=mask, b=b):
                    h = target.embed(ids)
                    for layer, (k, v) in zip(target.layers, t_cache, strict=True):
                        h = layer(h, k[:b], v[:b], cos, sin, mask)
                    return target.lm_head(target.norm(h)).argmax(-1)

                target_s[b][q] = timed(verify, cuda, reps)
            ids = torch.randint(0, s["vocab"], (b, B), device=device)
            pos = (L + torch.arange(B, device=device)).expand(b, B)
            cos, sin = (t.to(dt) for t in rope_cos_sin(pos, d, 1e6))

            def draft(ids=ids, cos=cos, sin=sin, b=b):
                # the context of the tokens just verified: fuse, project, norm + rope (written to the cache)
                ctx = drafter.fuse_context(features[: b * B]).view(b, B, H)
                for layer in drafter.layers:
                    layer.self_attn.context_kv(ctx, cos, sin)
                h = target.embed(ids)
                for layer, (k, v) in zip(drafter.layers, d_cache, strict=True):
                    h = layer(h, k[:b], v[:b], cos, sin, None)
                logits = target.lm_head(drafter.norm(h[:, 1:]))
                return logits.argmax(-1), logits.float().softmax(-1).amax(-1)

            draft_s[b] = timed(draft, cuda, reps)
            print(f"batch {b}: verify ms " + " ".join(f"{q}:{1e3 * t:.2f}" for q, t in target_s[b].items())
                  + f" | drafter ms {1e3 * draft_s[b]:.2f}", flush=True)
    return target_s, draft_s


def plan(target_s: dict[int, dict[int, float]], draft_s: dict[int, float], k: int = 15) -> list[dict]:
    """The plugin's rule on the measured costs: per batch size and acceptance rate, the draft length
    chosen and the predicted tokens/s against plain decoding and fixed ``k``-token drafts."""
    rows = []
    for b, per_q in target_s.items():
        model = StepCostModel()
        model.set_profile({b * q: t for q, t in per_q.items()})
        for p in RATES:
            acc = np.full((b, k), p)
            gains = np.cumprod(acc, axis=1)
            drafting = choose_requests(gains, model.cost, lambda n, b=b: np.full(np.shape(n), draft_s[b]), 16)
            lengths = (choose_draft_lengths(acc, model.cost, draft_cost=draft_s[b]) if drafting.any()
                       else np.zeros(b, dtype=np.int64))

            def rate(n: int, b=b, p=p, model=model) -> float:
                expected = b * (1 + sum(p ** i for i in range(1, n + 1)))
                return expected / (model.cost1(b * (1 + n)) + (draft_s[b] if n else 0.0))

            chosen = int(np.median(lengths))
            rows.append({"batch": b, "p": p, "drafting": bool(drafting.any()), "draft_length": chosen,
                         "lengths_min_max": [int(lengths.min()), int(lengths.max())],
                         "verify_ms_plain": round(1e3 * per_q[1], 3), "drafter_ms": round(1e3 * draft_s[b], 3),
                         "speedup_vs_plain": round(rate(chosen) / rate(0), 3),
                         "speedup_vs_fixed": round(rate(chosen) / rate(k), 3),
                         "fixed_vs_plain": round(rate(k) / rate(0), 3)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: proves the script, not the figures")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", help="write the measured costs and the chosen lengths here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    s = shapes(args.smoke)
    target_s, draft_s = measure(s, device, 3 if args.smoke else args.reps)
    rows = plan(target_s, draft_s)
    print("batch  " + "  ".join(f"p={p}: k (x plain, x fixed15)" for p in RATES))
    for b in s["batches"]:
        cells = [r for r in rows if r["batch"] == b]
        print(f"{b:5d}  " + "  ".join(f"{r['draft_length']:2d} ({r['speedup_vs_plain']:.2f}, "
                                      f"{r['speedup_vs_fixed']:.2f})".ljust(27) for r in cells))
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "shapes": s, "verify_seconds": {str(b): {str(q): t for q, t in v.items()} for b, v in target_s.items()},
           "drafter_seconds": {str(b): t for b, t in draft_s.items()}, "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
