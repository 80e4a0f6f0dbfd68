"""The DFlash drafter as a plain ``torch.nn.Module``: no vLLM, no transformers model classes.

Training, the pure-PyTorch reference generator and the tests use this module; the vLLM model in
``vllm_drafter.py`` runs the same math on vLLM's layers and is tested for parity against it.

One forward pass, for a block of ``B`` positions whose drafts are wanted, given ``C`` context
positions (target features of tokens already verified):

    context = hidden_norm(fc(concat(features at target_layer_ids)))      # [C, H], shared by layers
    for each layer:                                                       # pre-norm Qwen3 layer
        q      = rope(q_norm(Wq . norm(h)))                               # queries: block only
        k, v   = [rope(k_norm(Wk . context)) ; rope(k_norm(Wk . norm(h)))], [Wv . context ; Wv . norm(h)]
        h      = h + Wo . attention(q, k, v, mask)                        # non-causal inside the block
        h      = h + mlp(post_norm(h))
    out = norm(h)                                                         # logits = target lm_head(out)

The context enters only as keys/values (KV injection), never the residual stream or the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dflash_vllm.checkpoint import DraftSpec, parse_draft_spec


@dataclass
class DrafterConfig:
    """Shape of a drafter; ``to_hf_dict`` writes the z-lab ``config.json``."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_target_layers: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_hf_dict(cls, config: dict) -> DrafterConfig:
        spec: DraftSpec = parse_draft_spec(config)
        rope = config.get("rope_parameters") or {}
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            block_size=spec.block_size,
            mask_token_id=spec.mask_token_id,
            target_layer_ids=list(spec.target_layer_ids),
            num_target_layers=config.get("num_target_layers", max(spec.target_layer_ids) + 4),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 1_000_000.0)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            attention_bias=config.get("attention_bias", False),
        )

    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["DFlashDraftModel"],
            "model_type": "qwen3",
            "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
            },
            **self.extra,
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotary tables for ``positions [..., S]`` -> cos, sin ``[..., S, head_dim]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [..., S, heads, D]`` rotated by ``cos/sin [..., S, D]`` (NeoX halves)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class DFlashAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def context_kv(self, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """K/V of the fused context ``[..., C, H]`` -> ``[..., C, kv_heads, D]`` each (K normed, roped)."""
        shape = (*context.shape[:-1], self.cfg.num_key_value_heads, self.cfg.head_dim)
        k = apply_rope(self.k_norm(self.k_proj(context).view(shape)), cos, sin)
        return k, self.v_proj(context).view(shape)

    def forward(
        self,
        x: torch.Tensor,  # [N, S, H] normed block hidden states
        ctx_k: torch.Tensor,  # [N, C, kv, D]
        ctx_v: torch.Tensor,  # [N, C, kv, D]
        cos: torch.Tensor,  # [N, S, D] rotary tables of the block positions
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # [N, S, C + S] bool (True = visible) or None (all visible)
    ) -> torch.Tensor:
        n, s, _ = x.shape
        cfg = self.cfg
        q = apply_rope(self.q_norm(self.q_proj(x).view(n, s, cfg.num_attention_heads, cfg.head_dim)), cos, sin)
        blk_k, blk_v = self.context_kv(x, cos, sin)
        k = torch.cat([ctx_k, blk_k], dim=1).transpose(1, 2)  # [N, kv, C+S, D]
        v = torch.cat([ctx_v, blk_v], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k,
            v,
            attn_mask=None if mask is None else mask[:, None],
            enable_gqa=cfg.num_attention_heads != cfg.num_key_value_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(n, s, -1))


class DFlashLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.self_attn = DFlashAttention(cfg)
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False),
                "up_proj": nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False),
                "down_proj": nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False),
            }
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, ctx_k, ctx_v, cos, sin, mask):
        h = h + self.self_attn(self.input_layernorm(h), ctx_k, ctx_v, cos, sin, mask)
        x = self.post_attention_layernorm(h)
        return h + self.mlp["down_proj"](F.silu(self.mlp["gate_proj"](x)) * self.mlp["up_proj"](x))


class DFlashDrafter(nn.Module):
    """Parameter names match the z-lab checkpoint (``layers.N.self_attn.q_proj.weight``, ``fc``, ...)."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DFlashLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.fc = nn.Linear(len(cfg.target_layer_ids) * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def fuse_context(self, features: torch.Tensor) -> torch.Tensor:
        """``features [..., n_layers * H]`` (concatenated in target_layer_ids order) -> context ``[..., H]``."""
        return self.hidden_norm(self.fc(features))

    def forward(
        self,
        block_embeds: torch.Tensor,  # [N, S, H] target embeddings of [anchor, MASK, ...]
        block_positions: torch.Tensor,  # [N, S]
        context: torch.Tensor,  # [N, C, H] fused context (fuse_context output)
        context_positions: torch.Tensor,  # [N, C]
        mask: torch.Tensor | None = None,  # [N, S, C + S] visibility; None = all visible
    ) -> torch.Tensor:
        cfg = self.cfg
        ctx_cos, ctx_sin = rope_cos_sin(context_positions, cfg.head_dim, cfg.rope_theta)
        cos, sin = rope_cos_sin(block_positions, cfg.head_dim, cfg.rope_theta)
        h = block_embeds
        for layer in self.layers:
            ctx_k, ctx_v = layer.self_attn.context_kv(context, ctx_cos, ctx_sin)
            h = layer(h, ctx_k, ctx_v, cos, sin, mask)
        return self.norm(h)
