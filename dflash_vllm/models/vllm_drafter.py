"""The DFlash drafter on vLLM's layers: parallel linears, RMSNorm, rotary, paged ``Attention``.

Same math as ``models/core.py`` (tested for parity), split the way vLLM runs it:

* ``fuse_context`` + ``write_context_kv``: target features -> fused context -> per-layer K/V
  (``k_norm`` + RoPE at the context's absolute positions) written into each draft layer's paged
  KV cache slots. The draft layers are ordinary vLLM ``Attention`` layers registered after the
  target's, so vLLM's KV-cache manager allocates, prefix-caches and frees their blocks with the
  target's (one KV-cache group).
* ``forward``: one non-causal pass over the block queries ``[anchor, MASK x K]``; the attention
  backend reads the injected context K/V plus the block's own K/V from the cache.

Embedding and LM head are the target's, attached by the proposer after loading
(``share_target_modules``); the checkpoint has neither.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm import _custom_ops as ops
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.qwen2 import Qwen2MLP
from vllm.transformers_utils.config import set_default_rope_theta

from dflash_vllm.checkpoint import MASK_EMBEDDING_FILE, DFlashConfigError, parse_draft_spec
from dflash_vllm.kernels import context_kv
from dflash_vllm.models.cache_views import context_cache_views

logger = init_logger("vllm.dflash_vllm.drafter")

_FUSED_NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Checkpoint projection name -> (fused vLLM parameter, shard id).
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class DFlashVllmAttention(nn.Module):
    def __init__(self, config, *, cache_config, quant_config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads, config.num_key_value_heads,
            bias=bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters, is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
        )

    def _norm_heads(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.view(*x.shape[:-1], -1, self.head_dim)).view(x.shape)

    def context_k_v(self, kv: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected context ``kv [C, 2 * kv_size]`` (K then V) -> K normed and roped at ``positions``, V."""
        k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
        k = self._norm_heads(self.k_norm, k)
        # RotaryEmbedding rotates (query, key); K rides as the query with no key.
        k, _ = self.rotary_emb(positions, k, None)
        return k, v

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, self._norm_heads(self.q_norm, q), self._norm_heads(self.k_norm, k))
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class DFlashVllmLayer(nn.Module):
    def __init__(self, config, *, cache_config, quant_config, prefix: str):
        super().__init__()
        self.self_attn = DFlashVllmAttention(
            config, cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.self_attn"
        )
        self.mlp = Qwen2MLP(
            config.hidden_size, config.intermediate_size, getattr(config, "hidden_act", "silu"),
            quant_config=quant_config, prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


# The block pass is compiled like vLLM compiles its own models (inductor; piecewise around the
# attention op) whenever the engine's compilation mode is on; with ``mode: 0`` it runs eagerly.
# The context K/V injection stays eager: its token count is the target step's.
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0})
class DFlashVllmDrafter(nn.Module):
    """vLLM model class for ``architectures: ["DFlashDraftModel"]`` while the plugin is active."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        spec_config = vllm_config.speculative_config
        self.draft_model_config = spec_config.draft_model_config
        config = self.config = self.draft_model_config.hf_config
        set_default_rope_theta(config, default_theta=1_000_000)
        self.spec = parse_draft_spec(config)
        quant_config = None  # published DFlash drafters are unquantized
        cache_config = vllm_config.cache_config
        # Layer names continue the target's numbering (model.layers.{L + i}): vLLM orders KV caches
        # by the layer index parsed from the name, so draft layers must not reuse a target index.
        first = vllm_config.model_config.get_total_num_hidden_layers()
        self.layers = nn.ModuleList(
            DFlashVllmLayer(config, cache_config=cache_config, quant_config=quant_config,
                            prefix=f"model.layers.{first + i}")
            for i in range(config.num_hidden_layers)
        )
        n_features = len(self.spec.target_layer_ids)
        self.fc = ReplicatedLinear(n_features * config.hidden_size, config.hidden_size, bias=False,
                                   prefix="model.fc")
        self.hidden_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Optional trained MASK row (mask_embedding.pt), replacing the target's row for mask_token_id.
        self.register_buffer("mask_embedding", torch.empty(0), persistent=False)
        self._ctx_kv_weight: torch.Tensor | None = None  # built from the loaded qkv weights
        self._ctx_kv_bias: torch.Tensor | None = None
        self._ctx_k_norm: torch.Tensor | None = None
        # The fused context_kv kernel (kernels option): norm + RoPE + paged write of every layer in
        # one launch. Its cache views are built and probed at the first write (None: unusable).
        self.context_kv_kernel = False
        # Without the kernel, on CPU: the same cache views written by the PyTorch reference, every
        # layer at once (the backend path costs a norm, a RoPE and a cache write per layer).
        self.context_kv_torch = False
        self._fused_norm = True  # hidden_norm through vLLM's C++ rms_norm on CPU (fuse_context)
        self._ctx_views: tuple[int, tuple | None] | None = None  # (cache data_ptr, views)
        self.embed_tokens: nn.Module | None = None
        self.lm_head: nn.Module | None = None
        self.logits_processor: nn.Module | None = None

    # -- wiring -----------------------------------------------------------------------------------
    def share_target_modules(self, embed_tokens: nn.Module, lm_head: nn.Module, logits_processor: nn.Module):
        """Attach the target's embedding table and LM head (the drafter has none of its own)."""
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        self.logits_processor = logits_processor

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    # -- the drafting step ------------------------------------------------------------------------
    def fuse_context(self, features: torch.Tensor) -> torch.Tensor:
        """``features [C, n*H]`` in target_layer_ids order -> context ``[C, H]`` (fc, hidden_norm)."""
        out, _ = self.fc(features)
        if self._fused_norm and out.device.type == "cpu" and out.dtype in _FUSED_NORM_DTYPES:
            # This norm runs eagerly (outside the compiled block pass), where vLLM's RMSNorm takes
            # its native PyTorch path on CPU: ~160 us a step in the engine against ~7 us for the C++
            # op the built-in drafter calls here, 1% of a drafting cycle at 4 requests.
            normed = torch.empty_like(out)
            try:
                ops.rms_norm(normed, out.contiguous(), self.hidden_norm.weight, self.hidden_norm.variance_epsilon)
                return normed
            except (AttributeError, RuntimeError) as err:  # a build without the op: the module's path
                logger.warning("dflash-vllm: fused rms_norm unavailable (%s); hidden_norm runs natively", err)
                self._fused_norm = False
        return self.hidden_norm(out)

    def _build_context_projection(self) -> None:
        """One weight for the context K/V of every layer: rows ``[k_0; v_0; k_1; v_1; ...]`` taken from
        each layer's (TP-local) qkv_proj. The context never forms queries, so its Q third is skipped,
        and one GEMM replaces one per layer."""
        attns = [layer.self_attn for layer in self.layers]
        self._ctx_kv_weight = torch.cat([a.qkv_proj.weight[a.q_size:] for a in attns]).contiguous()
        biases = [a.qkv_proj.bias for a in attns]
        self._ctx_kv_bias = None if biases[0] is None else torch.cat([b[a.q_size:] for a, b in zip(attns, biases, strict=True)])
        self._ctx_k_norm = torch.stack([a.k_norm.weight for a in attns])  # [L, head_dim], for context_kv

    def write_context_kv(self, context: torch.Tensor, positions: torch.Tensor,
                         slot_mapping: torch.Tensor | None) -> None:
        """KV injection: write every layer's context K/V into its paged cache (None = compute only)."""
        if self._ctx_kv_weight is None:
            self._build_context_projection()
        all_kv = torch.nn.functional.linear(context, self._ctx_kv_weight, self._ctx_kv_bias)  # [C, L * 2 * kv]
        if slot_mapping is not None and (self.context_kv_kernel or self.context_kv_torch):
            views = self._context_cache_views()
            if views is not None:
                attn = self.layers[0].self_attn
                context_kv(all_kv, self._ctx_k_norm, attn.k_norm.variance_epsilon, attn.rotary_emb.cos_sin_cache,
                           positions, slot_mapping, *views, use_triton=self.context_kv_kernel)
                return
        for layer, kv in zip(self.layers, all_kv.chunk(len(self.layers), dim=-1), strict=True):
            k, v = layer.self_attn.context_k_v(kv, positions)
            if slot_mapping is None:
                continue
            attn = layer.self_attn.attn
            attn.impl.do_kv_cache_update(
                attn,
                k.view(-1, attn.num_kv_heads, attn.head_size),
                v.contiguous().view(-1, attn.num_kv_heads, attn.head_size),  # a column slice of all_kv
                attn.kv_cache,
                slot_mapping,
            )

    def _context_cache_views(self) -> tuple | None:
        """The draft layers' K/V cache views for the kernel, rebuilt if vLLM rebinds the caches."""
        attns = self.attention_layers()
        cache = attns[0].kv_cache
        ptr = cache.data_ptr() if isinstance(cache, torch.Tensor) else None
        if self._ctx_views is None or self._ctx_views[0] != ptr:
            rope = self.layers[0].self_attn.rotary_emb
            usable = (ptr is not None and getattr(rope, "is_neox_style", False)
                      and getattr(rope, "rotary_dim", None) == self.layers[0].self_attn.head_dim)
            views = context_cache_views(attns) if usable else None
            if views is not None:
                logger.info("dflash-vllm: context_kv %s writes the draft KV cache (%s layout, probed)",
                            "kernel" if self.context_kv_kernel else "(PyTorch, all layers at once)",
                            type(attns[0].impl).__name__)
            else:
                logger.warning("dflash-vllm: context_kv cache views not usable with this attention backend / "
                               "cache layout (%s); writing the context K/V through the backend",
                               type(attns[0].impl).__name__)
            self._ctx_views = (ptr, views)
        return self._ctx_views[1]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        if self.mask_embedding.numel():
            is_mask = (input_ids == self.spec.mask_token_id).unsqueeze(-1)
            embeds = torch.where(is_mask, self.mask_embedding.to(embeds.dtype), embeds)
        return embeds

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    # -- loading ----------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name.startswith(("embed_tokens.", "lm_head.")):
                continue  # some exports carry the target's copies; the target's own are shared
            parts = name.split(".")
            shard = None
            for i, part in enumerate(parts):
                if part in _STACKED:
                    parts[i], shard = _STACKED[part]
                    break
            target_name = ".".join(parts)
            if target_name not in params:
                raise DFlashConfigError(
                    f"drafter checkpoint tensor {name!r} has no place in a DFlash drafter "
                    f"({self.config.num_hidden_layers} layers); is this a z-lab DFlash checkpoint?"
                )
            param = params[target_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
            loaded.add(target_name)
        missing = set(params) - loaded
        if missing:
            raise DFlashConfigError(
                f"drafter checkpoint lacks {sorted(missing)[:6]}{'...' if len(missing) > 6 else ''}; "
                "the file is incomplete or from another architecture"
            )
        self._load_mask_embedding()
        self._build_context_projection()
        return loaded

    def _load_mask_embedding(self) -> None:
        path = Path(self.draft_model_config.model) / MASK_EMBEDDING_FILE
        if not path.is_file():
            return
        state = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
        if isinstance(state, dict):
            if state.get("mask_token_id", self.spec.mask_token_id) != self.spec.mask_token_id:
                raise DFlashConfigError(
                    f"{MASK_EMBEDDING_FILE}: mask_token_id={state.get('mask_token_id')} differs from "
                    f"dflash_config.mask_token_id={self.spec.mask_token_id}; re-export the pair"
                )
            state = state["embedding"]
        self.mask_embedding = state.reshape(-1).to(self.norm.weight.device, self.norm.weight.dtype)
