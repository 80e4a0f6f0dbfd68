"""Training DFlash drafters for any Hugging Face causal LM target (``dflash-vllm train``)."""
