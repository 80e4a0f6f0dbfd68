"""The plugin's own options: ``--additional-config '{"dflash": {...}}'``.

vLLM's ``SpeculativeConfig`` forbids unknown keys, so options of ours travel in
``VllmConfig.additional_config["dflash"]`` and are validated here; an unknown key is an error
that names it and lists the known ones.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from dflash_vllm.checkpoint import DFlashConfigError

OPTIONS_KEY = "dflash"


class DFlashOptions(BaseModel):
    """Options of the dflash-vllm proposer (defaults are the recommended settings).

    None yet: the proposer's behaviour is fixed by the speculative config. The model exists so that
    a misspelt or future option fails at start-up instead of being silently ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


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
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown key {where!r}")
            else:
                problems.append(f"{where}={e.get('input')!r}: {e['msg']}")
        known = ", ".join(DFlashOptions.model_fields) or "none yet"
        raise DFlashConfigError(
            f"additional_config.{OPTIONS_KEY}: {'; '.join(problems)}. Known options: {known}"
        ) from None
