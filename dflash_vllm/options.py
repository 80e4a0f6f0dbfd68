"""The plugin's own options: ``--additional-config '{"dflash": {...}}'``.

vLLM's ``SpeculativeConfig`` forbids unknown keys, so options of ours travel in
``VllmConfig.additional_config["dflash"]`` and are validated here; an unknown key is an error
that names it and lists the known ones.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dflash_vllm.checkpoint import DFlashConfigError

try:  # vLLM's servers answer its client errors with HTTP 400 (a bare ValueError is a 500)
    from vllm.exceptions import VLLMValidationError as _ClientError
except ImportError:  # pragma: no cover - vLLM is a dependency; keep the options importable without it
    _ClientError = Exception


class DFlashRequestError(_ClientError, ValueError):
    """A request's own dflash options are invalid: that request fails (HTTP 400), the others carry on."""

OPTIONS_KEY = "dflash"


class DFlashOptions(BaseModel):
    """Options of the dflash-vllm proposer (defaults are the recommended settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adaptive: bool = Field(True, description=(
        "cut each request's drafts where they stop paying for their verification at the current "
        "load (num_speculative_tokens is the maximum); false: always send num_speculative_tokens"))
    profile_steps: bool = Field(True, description=(
        "time a few target steps of different sizes at start-up to seed the adaptive cost model "
        "(otherwise it learns from the running engine only)"))
    plain_steps: bool = Field(True, description=(
        "with adaptive drafting: while drafting does not pay at the current load, the engine runs "
        "true plain decoding steps (no aux-state gather, rejection sampler or drafter context pass) "
        "and measures now and then whether drafting pays again; false: such steps still take "
        "vLLM's speculative path with zero drafts"))
    backfill_tokens: int = Field(4096, ge=0, description=(
        "target features of the most recent plain-step tokens kept (a ring of this many tokens x "
        "len(target_layer_ids) x hidden size, in the target's dtype) so that the drafter's context is "
        "complete for them when drafting resumes; 0: resume with a gap in the drafter's context"))
    kernels: Literal["auto", "triton", "torch"] = Field("auto", description=(
        "the drafting step's kernels (block inputs, greedy draft selection without [N, vocab] "
        "logits): Triton or their PyTorch references; auto: Triton on CUDA for the kernels measured "
        "faster than their references (proposer.TRITON_BY_DEFAULT)"))


def _fmt_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown key {where!r}")
        else:
            problems.append(f"{where}={e.get('input')!r}: {e['msg']}")
    return problems


def parse_options(additional_config: dict[str, Any] | None) -> DFlashOptions:
    raw = (additional_config or {}).get(OPTIONS_KEY, {})
    if not isinstance(raw, dict):
        raise DFlashConfigError(
            f"additional_config.{OPTIONS_KEY} must be a JSON object, got {raw!r}; "
            f"""e.g. --additional-config '{{"{OPTIONS_KEY}": {{}}}}'"""
        )
    try:
        return DFlashOptions(**raw)
    except ValidationError as err:
        known = ", ".join(DFlashOptions.model_fields)
        raise DFlashConfigError(
            f"additional_config.{OPTIONS_KEY}: {'; '.join(_fmt_errors(err))}. Known options: {known}"
        ) from None


# -- per request: SamplingParams(extra_args={"dflash": {...}}) or vllm_xargs {"dflash_<key>": ...} --
class RequestOptions(BaseModel):
    """Per-request control of speculation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    disable: bool = Field(False, description="no drafts for this request")
    max_draft_tokens: int | None = Field(None, ge=0, description="at most this many drafts per step")

    def cap(self, default: int) -> int:
        if self.disable:
            return 0
        return default if self.max_draft_tokens is None else min(default, self.max_draft_tokens)


DEFAULT_REQUEST_OPTIONS = RequestOptions()
FLAT_PREFIX = f"{OPTIONS_KEY}_"


def parse_request_options(extra_args: dict[str, Any] | None) -> RequestOptions:
    """The request's options; ``DFlashRequestError`` (a ``ValueError``: HTTP 400 in vLLM's server)
    naming the bad key. The OpenAI API's ``vllm_xargs`` carries flat values only, so
    ``{"dflash_max_draft_tokens": 2}`` is the same as ``{"dflash": {"max_draft_tokens": 2}}``."""
    if not extra_args:
        return DEFAULT_REQUEST_OPTIONS
    raw: dict[str, Any] = {}
    nested = extra_args.get(OPTIONS_KEY)
    if nested is not None:
        if not isinstance(nested, dict):
            raise DFlashRequestError(f"extra_args.{OPTIONS_KEY} must be an object, got {nested!r}; e.g. "
                                     f'{{"{OPTIONS_KEY}": {{"max_draft_tokens": 4}}}}')
        raw.update(nested)
    for key, value in extra_args.items():
        if key.startswith(FLAT_PREFIX):
            raw[key[len(FLAT_PREFIX):]] = value
    if not raw:
        return DEFAULT_REQUEST_OPTIONS
    try:
        return RequestOptions(**raw)
    except ValidationError as err:
        known = ", ".join(RequestOptions.model_fields)
        raise DFlashRequestError(
            f"dflash request options: {'; '.join(_fmt_errors(err))}. Known: {known} (as "
            f'extra_args={{"{OPTIONS_KEY}": {{...}}}} or vllm_xargs={{"{FLAT_PREFIX}<key>": ...}})'
        ) from None
