"""Drafter models: ``core`` (plain PyTorch, no vLLM) and ``vllm_drafter`` (vLLM layers, paged KV)."""
