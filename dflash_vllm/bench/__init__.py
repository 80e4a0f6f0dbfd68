"""Side-by-side runs of plain decoding, vLLM's built-in DFlash and this plugin."""
