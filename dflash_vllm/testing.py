"""``make_tiny_pair``: a tiny random Qwen3 target and a DFlash drafter in the z-lab layout, offline.

The tokenizer is a byte-level BPE trained on this machine (on a slice of the Python standard
library's source), so nothing is downloaded. The target's vocabulary is the tokenizer's padded up
to a multiple of 64; the drafter's MASK is the first unused row, as in Qwen3 (151669).
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from dflash_vllm.checkpoint import build_target_layer_ids
from dflash_vllm.models.core import DFlashDrafter, DrafterConfig
from dflash_vllm.training.export import export_drafter

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyPair:
    target: Path
    drafter: Path
    mask_token_id: int
    vocab_size: int


def _corpus(max_chars: int) -> list[str]:
    """A deterministic slice of the running interpreter's standard library source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for name in ("json/encoder.py", "json/decoder.py", "textwrap.py", "string.py", "functools.py", "heapq.py"):
        path = stdlib / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                break
    return texts


def train_tokenizer(out_dir: Path, vocab_size: int, texts) -> int:
    """Byte-level BPE on ``texts`` (an iterable of strings); writes tokenizer.json, tokenizer_config.json
    and a chat template; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return tok.get_vocab_size()


def write_target(out_dir: Path, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, intermediate_size: int, vocab_size: int, eos_token_id: int, seed: int,
                 max_position_embeddings: int = 2048) -> None:
    """A random Qwen3ForCausalLM saved with transformers (float32 safetensors)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # A larger init than HF's default 0.02 gives peaked, less repetitive greedy text.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out_dir), safe_serialization=True)


def random_drafter_state(cfg: DrafterConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random drafter weights, init 0.08 like the tiny target (peaked, varied drafts)."""
    torch.manual_seed(seed)
    model = DFlashDrafter(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.state_dict()


def make_tiny_pair(
    path: str | Path,
    *,
    hidden_size: int = 128,
    num_target_layers: int = 6,
    num_draft_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 256,
    tokenizer_vocab: int = 500,
    block_size: int = 8,
    target_layer_ids: list[int] | None = None,
    seed: int = 0,
) -> TinyPair:
    """Write ``path/target`` (random Qwen3 + local tokenizer) and ``path/drafter`` (z-lab layout).

    Head dim 32 is the smallest vLLM's CPU attention backend takes.
    """
    root = Path(path)
    target_dir, drafter_dir = root / "target", root / "drafter"
    target_dir.mkdir(parents=True, exist_ok=True)
    n_tok = train_tokenizer(target_dir, tokenizer_vocab, _corpus(400_000))
    vocab_size = (n_tok + 1 + 63) // 64 * 64  # room for the MASK row, padded like Qwen3's table
    eos_id = 0  # the only special token, trained first
    write_target(target_dir, hidden_size=hidden_size, num_layers=num_target_layers, num_heads=num_heads,
                 num_kv_heads=num_kv_heads, head_dim=head_dim, intermediate_size=intermediate_size,
                 vocab_size=vocab_size, eos_token_id=eos_id, seed=seed)
    if target_layer_ids is None:
        target_layer_ids = build_target_layer_ids(num_target_layers, num_draft_layers)
    cfg = DrafterConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_draft_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        vocab_size=vocab_size, block_size=block_size, mask_token_id=n_tok,
        target_layer_ids=list(target_layer_ids), num_target_layers=num_target_layers,
    )
    export_drafter(drafter_dir, cfg, random_drafter_state(cfg, seed + 1), dtype="float32")
    return TinyPair(target=target_dir, drafter=drafter_dir, mask_token_id=n_tok, vocab_size=vocab_size)
