"""Export a drafter in z-lab's published layout: ``config.json`` + ``model.safetensors`` (no embedding,
no LM head). Written to a temporary directory and renamed into place: nothing half-written is left."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from dflash_vllm.models.core import DrafterConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_drafter(out_dir: str | Path, cfg: DrafterConfig, state_dict: dict[str, torch.Tensor],
                   dtype: str = "bfloat16") -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an exported model is meant to be shared
    try:
        tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = cfg.to_hf_dict()
        config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
