"""Checkpoint conversion between Hugging Face and megatron-core (``tools/convert_checkpoint.py``)."""
