"""The z-lab DFlash checkpoint layout: parse, validate against a target, and the layer convention.

A published drafter directory holds ``config.json`` (a Qwen3 config with ``architectures:
["DFlashDraftModel"]``, a top-level ``block_size`` and ``dflash_config: {mask_token_id,
target_layer_ids}``) and ``model.safetensors`` without embedding or LM head.

No vLLM import here: training, the reference generator and the plugin all read checkpoints
through this module, so they agree on every field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DRAFT_ARCHITECTURE = "DFlashDraftModel"
MASK_EMBEDDING_FILE = "mask_embedding.pt"


class DFlashConfigError(ValueError):
    """A drafter/target/options combination that cannot run. The message names field, value and fix."""


def feature_index(layer_id: int) -> int:
    """Index of the feature of target decoder layer ``layer_id`` among the target's hidden states.

    z-lab's ``target_layer_ids`` name decoder layers whose OUTPUT feeds the drafter. The output of
    layer ``id`` is HF ``hidden_states[id + 1]`` (``hidden_states[0]`` is the embedding output), and
    vLLM's aux-hidden-state layer index is the same ``id + 1`` (it records the residual stream
    *entering* layer ``id + 1``). Every consumer (trainer, reference generator, proposer) calls this
    one function; vLLM PR #40727 fixed exactly this off-by-one in vLLM's own path.
    """
    return layer_id + 1


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """z-lab's default: ``num_draft_layers`` layers spread from 1 to L-3 (``[L // 2]`` for one)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [round(start + i * (end - start) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


@dataclass(frozen=True)
class DraftSpec:
    """The DFlash-specific fields of a drafter checkpoint."""

    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    hidden_size: int
    vocab_size: int | None
    num_hidden_layers: int

    @property
    def max_drafts(self) -> int:
        """Positions 1..B-1 of a block produce drafts; position 0 holds the last verified token."""
        return self.block_size - 1


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a model directory, with an error that says what is missing."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() or not path.suffix else path
    if not config_file.is_file():
        raise DFlashConfigError(
            f"no config.json in {str(path)!r}: point the model path at a directory holding a "
            "Hugging Face config.json (for a drafter, the z-lab DFlash layout)"
        )
    return json.loads(config_file.read_text())


def parse_draft_spec(config: Any) -> DraftSpec:
    """Read the DFlash fields of a drafter config (dict or HF config object).

    ``dflash_config`` fields win over top-level ones, as in z-lab's reference code.
    """
    dflash = _get(config, "dflash_config") or {}
    if not isinstance(dflash, Mapping):
        raise DFlashConfigError(f"drafter config: dflash_config must be a mapping, got {dflash!r}")

    def field(name: str, default: Any = None) -> Any:
        return dflash.get(name, _get(config, name, default))

    mask_token_id = field("mask_token_id")
    if mask_token_id is None:
        raise DFlashConfigError(
            "drafter config: dflash_config.mask_token_id is missing; set it to the token id the "
            "drafter was trained to read as MASK (for Qwen3 drafters 151669, the first unused row)"
        )
    num_layers = _get(config, "num_hidden_layers")
    target_layer_ids = field("target_layer_ids")
    if target_layer_ids is None:
        num_target_layers = _get(config, "num_target_layers")
        if num_target_layers is None:
            raise DFlashConfigError(
                "drafter config: dflash_config.target_layer_ids is missing (and no num_target_layers "
                "to derive it from); list the target decoder layers whose outputs the drafter reads"
            )
        target_layer_ids = build_target_layer_ids(int(num_target_layers), int(num_layers))
    if not isinstance(target_layer_ids, Sequence) or not target_layer_ids or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in target_layer_ids
    ):
        raise DFlashConfigError(
            f"drafter config: dflash_config.target_layer_ids must be a non-empty list of ints, "
            f"got {target_layer_ids!r}"
        )
    block_size = int(field("block_size", 16))
    if block_size < 2:
        raise DFlashConfigError(
            f"drafter config: block_size={block_size}; a DFlash block needs at least 2 positions "
            "(the anchor and one MASK)"
        )
    return DraftSpec(
        block_size=block_size,
        mask_token_id=int(mask_token_id),
        target_layer_ids=tuple(int(i) for i in target_layer_ids),
        hidden_size=int(_get(config, "hidden_size")),
        vocab_size=_get(config, "vocab_size"),
        num_hidden_layers=int(num_layers),
    )


def validate_pair(
    spec: DraftSpec,
    *,
    target_hidden_size: int,
    target_vocab_size: int,
    target_num_layers: int,
    num_speculative_tokens: int | None = None,
) -> None:
    """Every check that must hold before a drafter runs against a target; raises DFlashConfigError."""
    if spec.hidden_size != target_hidden_size:
        raise DFlashConfigError(
            f"drafter hidden_size={spec.hidden_size} differs from the target's hidden_size="
            f"{target_hidden_size}; DFlash drafters share the target's embedding and LM head, so "
            "their width must equal the target's: use a drafter trained for this target"
        )
    if spec.vocab_size is not None and int(spec.vocab_size) != target_vocab_size:
        raise DFlashConfigError(
            f"drafter vocab_size={spec.vocab_size} differs from the target's vocab_size="
            f"{target_vocab_size}; the drafter reads the target's embedding table and LM head: "
            "use a drafter trained for this target's tokenizer"
        )
    if not 0 <= spec.mask_token_id < target_vocab_size:
        raise DFlashConfigError(
            f"drafter dflash_config.mask_token_id={spec.mask_token_id} is outside the target's "
            f"vocabulary [0, {target_vocab_size}); it must be a row of the target's embedding table"
        )
    bad = [i for i in spec.target_layer_ids if not 0 <= i < target_num_layers]
    if bad:
        raise DFlashConfigError(
            f"drafter dflash_config.target_layer_ids={list(spec.target_layer_ids)} names layers "
            f"{bad} outside the target's decoder layers 0..{target_num_layers - 1}; the drafter "
            "was trained for a deeper target: use its own target, or a drafter for this one"
        )
    if num_speculative_tokens is not None and num_speculative_tokens > spec.max_drafts:
        raise DFlashConfigError(
            f"num_speculative_tokens={num_speculative_tokens} is larger than block_size - 1 = "
            f"{spec.max_drafts} for this drafter (block_size={spec.block_size}); set "
            f"num_speculative_tokens to at most {spec.max_drafts}"
        )
    if num_speculative_tokens is not None and num_speculative_tokens < 1:
        raise DFlashConfigError(
            f"num_speculative_tokens={num_speculative_tokens}; DFlash needs at least 1 draft token"
        )
