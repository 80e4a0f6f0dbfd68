"""DFlash drafter training: a frozen HF target, the ``models/core.py`` drafter, block-diffusion loss.

    dflash-vllm train --target DIR --prompts FILE.jsonl --out-dir runs/x [--config configs/train_*.json] [--resume]

Each step: the frozen target runs over a batch of ``prompt + response`` sequences and yields the
features at ``target_layer_ids`` (``feature_index``: the outputs of those layers, the proposer's
convention); ``A`` random anchors per sequence open blocks ``[anchor, MASK x (B-1)]`` that all
train in one drafter pass under the block mask (``masks.py``); cross-entropy on block positions
1..B-1 through the target's frozen LM head, weighted ``exp(-(i-1)/gamma)``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dflash_vllm.checkpoint import DFlashConfigError, build_target_layer_ids
from dflash_vllm.models.core import DFlashDrafter, DrafterConfig
from dflash_vllm.reference import target_features
from dflash_vllm.training.config import TrainConfig
from dflash_vllm.training.masks import block_attention_mask, block_inputs, position_weights, sample_anchors


def choose_mask_token_id(cfg: TrainConfig, vocab_size: int, tokenizer_len: int) -> int:
    """The MASK id: an explicit one, else the first embedding row the tokenizer never produces
    (as Qwen3's 151669). Without a free row, ask for a reserved special token."""
    if cfg.mask_token_id is not None:
        if not 0 <= cfg.mask_token_id < vocab_size:
            raise DFlashConfigError(f"mask_token_id={cfg.mask_token_id} is outside the target's vocabulary "
                                    f"[0, {vocab_size})")
        return cfg.mask_token_id
    if tokenizer_len < vocab_size:
        return tokenizer_len
    raise DFlashConfigError(
        f"the target's embedding table ({vocab_size} rows) has no row past its tokenizer ({tokenizer_len} "
        "tokens): pass --mask-token-id with the id of a reserved special token the target never emits"
    )


def drafter_config_for(target_config, cfg: TrainConfig, mask_token_id: int) -> DrafterConfig:
    if cfg.hidden_size is not None and cfg.hidden_size != target_config.hidden_size:
        raise DFlashConfigError(
            f"training config: hidden_size={cfg.hidden_size} differs from the target's hidden_size="
            f"{target_config.hidden_size}; a DFlash drafter shares the target's embedding and LM head, so its "
            "width is the target's: drop hidden_size from the config"
        )
    n_layers = target_config.num_hidden_layers
    ids = cfg.target_layer_ids or build_target_layer_ids(n_layers, cfg.num_draft_layers)
    if any(not 0 <= i < n_layers for i in ids):
        raise DFlashConfigError(f"target_layer_ids={ids} outside the target's layers 0..{n_layers - 1}")
    head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // target_config.num_attention_heads
    return DrafterConfig(
        hidden_size=target_config.hidden_size,
        intermediate_size=cfg.intermediate_size or target_config.intermediate_size,
        num_hidden_layers=cfg.num_draft_layers,
        num_attention_heads=target_config.num_attention_heads,
        num_key_value_heads=getattr(target_config, "num_key_value_heads", target_config.num_attention_heads),
        head_dim=head_dim,
        vocab_size=target_config.vocab_size,
        block_size=cfg.block_size,
        mask_token_id=mask_token_id,
        target_layer_ids=list(ids),
        num_target_layers=n_layers,
        rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-6),
        rope_theta=float(getattr(target_config, "rope_theta", None)
                         or (getattr(target_config, "rope_parameters", None) or {}).get("rope_theta", 1e6)),
        max_position_embeddings=target_config.max_position_embeddings,
    )


def drafter_loss(target, drafter: DFlashDrafter, tokens: torch.Tensor, lengths: torch.Tensor,
                 anchors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted block-diffusion cross-entropy of one batch (``tokens [N, T]`` right-padded)."""
    cfg = drafter.cfg
    n, t = tokens.shape
    with torch.no_grad():
        _, features = target_features(target, tokens, cfg.target_layer_ids)
        ids, positions, labels = block_inputs(tokens, anchors, cfg.block_size, cfg.mask_token_id, lengths)
        block_embeds = target.get_input_embeddings()(ids)
        mask = block_attention_mask(anchors, t, cfg.block_size)
    context_positions = torch.arange(t, device=tokens.device)[None].expand(n, -1)
    hidden = drafter(block_embeds, positions, drafter.fuse_context(features), context_positions, mask)
    logits = target.get_output_embeddings()(hidden).float()
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    w = weights.to(logits.device).repeat(anchors.shape[1])[None].expand(n, -1).flatten()
    w = w * (labels.flatten() != -100)
    return (ce * w).sum() / w.sum().clamp(min=1e-6)


def _batches(sequences: list[list[int]], batch_size: int, seed: int, epoch: int):
    order = list(range(len(sequences)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [sequences[j] for j in order[i : i + batch_size]]


def _pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in batch)
    tokens = torch.full((len(batch), t), pad_id, dtype=torch.long)
    for i, s in enumerate(batch):
        tokens[i, : len(s)] = torch.tensor(s)
    return tokens, torch.tensor([len(s) for s in batch])


def save_checkpoint(path: Path, **state) -> None:
    """``torch.save`` to a temporary name, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    tmp.replace(path)


def train_drafter(cfg: TrainConfig, sequences: list[list[int]], target, mask_token_id: int,
                  resume: bool = False, log=print, stop_after: int | None = None) -> tuple[DFlashDrafter, dict]:
    """Train on ``sequences`` (token ids); checkpoints to ``out_dir/checkpoint.pt``. Returns the drafter and stats.

    ``stop_after``: leave after that many steps of this call (checkpointed), for time-boxed sessions;
    ``resume=True`` later continues exactly where it stopped (optimizer, schedule and anchor RNG restored).
    """
    from tqdm import tqdm

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    for p in target.parameters():
        p.requires_grad_(False)
    target.eval()
    dcfg = drafter_config_for(target.config, cfg, mask_token_id)
    torch.manual_seed(cfg.seed)
    drafter = DFlashDrafter(dcfg)
    sequences = [s[: cfg.max_length] for s in sequences if len(s) >= 3]
    if not sequences:
        raise DFlashConfigError("no training sequence has 3 or more tokens")
    steps_per_epoch = math.ceil(len(sequences) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, int(cfg.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    step, resumed_rng = 0, None
    ckpt = out_dir / "checkpoint.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        drafter.load_state_dict(state["drafter"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        resumed_rng = state.get("anchor_rng")
        log(f"resumed from {ckpt} at step {step}/{total}")
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and torch.cuda.is_available())
    weights = position_weights(cfg.block_size, cfg.loss_gamma)
    pad_id = getattr(target.config, "eos_token_id", 0) or 0
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    if resumed_rng is not None:
        gen.set_state(resumed_rng)
    first_step = step
    log_file = open(out_dir / "train_log.jsonl", "a")  # noqa: SIM115
    bar = tqdm(total=total, initial=step, desc="train drafter", unit="step")
    t0, tokens_seen, last_loss = time.perf_counter(), 0, float("nan")
    drafter.train()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        for i, batch in enumerate(_batches(sequences, cfg.batch_size, cfg.seed, epoch)):
            if epoch * steps_per_epoch + i < step:
                continue  # resumed: this step was done before
            tokens, lengths = _pad(batch, pad_id)
            anchors = sample_anchors(lengths, min(cfg.num_anchors, int(lengths.max()) - 2), gen)
            with torch.autocast("cuda" if tokens.is_cuda else "cpu", dtype=torch.bfloat16, enabled=use_bf16):
                loss = drafter_loss(target, drafter, tokens, lengths, anchors, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            tokens_seen += int(lengths.sum())
            last_loss = loss.item()
            tps = tokens_seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if step % 10 == 0 or step in (1, total):
                log_file.write(json.dumps({"step": step, "epoch": epoch, "loss": last_loss,
                                           "lr": sched.get_last_lr()[0], "tokens_per_s": tps}) + "\n")
                log_file.flush()
            stopping = stop_after is not None and step - first_step >= stop_after
            if step % cfg.checkpoint_every == 0 or step == total or stopping:
                save_checkpoint(ckpt, drafter=drafter.state_dict(), optimizer=opt.state_dict(),
                                 scheduler=sched.state_dict(), step=step, config=cfg.to_dict(),
                                 drafter_config=dcfg.to_hf_dict(), anchor_rng=gen.get_state())
            if stopping:
                break
        else:
            continue
        break  # stop_after reached inside the epoch: leave the epoch loop too
    bar.close()
    log_file.close()
    drafter.eval()
    elapsed = time.perf_counter() - t0
    return drafter, {"steps": step, "final_loss": last_loss, "wall_s": elapsed,
                     "tokens_per_s": tokens_seen / elapsed if elapsed else None}
