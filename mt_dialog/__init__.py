"""mt_dialog: multi-turn dialogue fine-tuning on megatron-core.

Only assistant replies (and their end-of-turn token) are trained, many conversations are packed
into each fixed-length sequence, and the loss is normalized so that every assistant turn in the
global batch counts equally. See README.md and docs/.
"""

__version__ = "0.1.0"
