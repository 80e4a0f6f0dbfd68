"""vLLM general-plugin entry point (``vllm.general_plugins``: ``dflash = dflash_vllm.plugin:register``).

vLLM calls ``register()`` in every process it starts (API server, engine core, workers). It is
idempotent and cheap: an environment switch, a version check, then the patches (imported lazily).

* ``DFLASH_VLLM_DISABLE=1`` leaves vLLM untouched: the same command then runs vLLM's built-in
  DFlash, which is how side-by-side figures are taken.
* Any vLLM version other than the pinned one is left untouched, with one warning.
* ``DFLASH_VLLM_TRACE=PREFIX`` traces the adaptive controller's choices per engine step into
  ``PREFIX.<pid>.jsonl`` (a diagnostic: ``dflash_vllm.bench.trace``).
"""

from __future__ import annotations

import logging
import os
import re
from importlib import metadata

# Under "vllm." so that vLLM's logging configuration (format, level) applies to our lines too.
logger = logging.getLogger("vllm.dflash_vllm")

DISABLE_ENV = "DFLASH_VLLM_DISABLE"
_registered = False


def supported_vllm_version() -> str:
    """The exact vLLM version pinned in this distribution's metadata (pyproject's extras)."""
    for req in metadata.requires("dflash-vllm") or []:
        match = re.match(r"\s*vllm(?:-cpu)?\s*==\s*([\w.]+)", req)
        if match:
            return match.group(1)
    raise RuntimeError("dflash-vllm metadata carries no vllm pin; reinstall the package")


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    if disabled():
        logger.info("dflash-vllm: %s is set; vLLM's built-in DFlash path is used", DISABLE_ENV)
        return
    import vllm

    wanted = supported_vllm_version()
    if vllm.__version__ != wanted:
        logger.warning(
            "dflash-vllm supports vLLM %s only, found %s: the plugin leaves vLLM untouched "
            "(install vllm==%s to use it)", wanted, vllm.__version__, wanted,
        )
        return
    from dflash_vllm.patches import apply_all

    apply_all()
    from dflash_vllm.bench.trace import install_from_env

    if install_from_env():
        logger.info("dflash-vllm: tracing engine steps (DFLASH_VLLM_TRACE)")
