"""dflash-vllm: DFlash block-diffusion speculative decoding for vLLM, as a plugin."""

__version__ = "0.1.0"
