"""Shared fixtures: one tiny random pair per session, engines shared per module (each start costs
25-50 s on a 2-core CPU)."""

from __future__ import annotations

import os

# Triton kernels run under Triton's interpreter on CPU. It must be on before triton is first
# imported (its own tl.max/tl.sum are JIT-decorated at import). vLLM engines started by the tests
# inherit it: they give the same outputs with it set (vLLM runs no Triton on CPU either way).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dflash_vllm.testing import make_tiny_pair  # noqa: E402

# Eight prompts of different lengths (a few tokens to ~150), some sharing a prefix.
PROMPTS = [
    "def",
    "import json\n",
    "class Encoder:\n    def encode(self, o):\n",
    "    return ''.join(chunks)\n\ndef _make_iterencode(markers, _default, _encoder, _indent):\n",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "for i in range(10):\n    print(i)\n" * 4,
    "def wrap(text, width=70, **kwargs):\n    w = TextWrapper(width=width, **kwargs)\n    return w.wrap(text)\n" * 3,
    "x = 1\n",
    "import json\nimport textwrap\n",
]


def pytest_addoption(parser):
    parser.addoption("--soak-minutes", type=float, default=None,
                     help="run the server soak for this many minutes (default: a fixed 192-request workload)")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"), block_size=8)


def engine_kwargs(target, drafter=None, *, num_speculative_tokens=7, prefix_caching=True, **extra):
    """LLM(...) arguments for tests: float32, no torch.compile (engine start ~30 s instead of ~60 s)."""
    kwargs = {
        "model": str(target),
        "dtype": "float32",
        "max_model_len": 512,
        "kv_cache_memory_bytes": 256 * 2**20,
        "disable_log_stats": False,
        "enable_prefix_caching": prefix_caching,
        "compilation_config": {"mode": 0},
        "seed": 0,
        **extra,
    }
    if drafter is not None:
        kwargs["speculative_config"] = {
            "method": "dflash", "model": str(drafter), "num_speculative_tokens": num_speculative_tokens,
        }
    return kwargs
