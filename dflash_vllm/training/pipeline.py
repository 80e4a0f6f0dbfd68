"""``dflash-vllm train``: prompts -> target-regenerated data (cached) -> drafter training -> z-lab export
-> reference-generator evaluation on held-out prompts."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dflash_vllm.training.config import TrainConfig


def run_training(cfg: TrainConfig, resume: bool = False, log=print) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dflash_vllm.checkpoint import DFlashConfigError
    from dflash_vllm.training.data import atomic_write_text, read_prompts, regenerate
    from dflash_vllm.training.export import export_drafter
    from dflash_vllm.training.trainer import choose_mask_token_id, drafter_config_for, train_drafter

    out_dir = Path(cfg.out_dir)
    # Every check before anything is written: a bad run leaves no half-made out_dir behind.
    tok = AutoTokenizer.from_pretrained(cfg.target)
    target_config = AutoConfig.from_pretrained(cfg.target)
    prompts = read_prompts(cfg.prompts, tok, cfg.max_prompts)
    held_out = prompts[len(prompts) - cfg.eval_prompts:] if cfg.eval_prompts else []
    train_prompts = prompts[: len(prompts) - len(held_out)]
    if not train_prompts:
        raise DFlashConfigError(f"eval_prompts={cfg.eval_prompts} leaves no training prompt out of {len(prompts)}")
    mask_id = choose_mask_token_id(cfg, target_config.vocab_size, len(tok))
    drafter_config_for(target_config, cfg, mask_id)
    report: dict = {"config": cfg.to_dict(), "stages": {}}

    t = time.perf_counter()
    seqs = regenerate(cfg.target, train_prompts, out_dir, cfg.response_max_tokens, cfg.gen_temperature,
                      max_model_len=cfg.max_length + cfg.response_max_tokens, seed=cfg.seed)
    gen_s = time.perf_counter() - t
    report["stages"]["regenerate"] = {"wall_s": gen_s, "sequences": len(seqs),
                                      "tokens": sum(len(s) for s in seqs)}
    log(f"data: {len(seqs)} sequences, {sum(len(s) for s in seqs)} tokens ({gen_s:.0f} s)")

    target = AutoModelForCausalLM.from_pretrained(cfg.target, dtype=torch.float32)
    log(f"mask token id: {mask_id} ({'given' if cfg.mask_token_id is not None else 'first unused embedding row'})")
    drafter, stats = train_drafter(cfg, seqs, target, mask_id, resume=resume, log=log)
    report["stages"]["train"] = stats
    export_dir = export_drafter(out_dir / "drafter", drafter.cfg, drafter.state_dict(), cfg.export_dtype)
    log(f"exported {export_dir}")
    if held_out:
        from dflash_vllm.reference import evaluate

        t = time.perf_counter()
        report["eval"] = evaluate(cfg.target, export_dir, held_out, max_new_tokens=128)
        report["stages"]["eval"] = {"wall_s": time.perf_counter() - t}
        log(f"held-out tau {report['eval']['tau']:.2f}, per position "
            f"{[round(x, 2) for x in report['eval']['per_position_acceptance']]}")
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return report
