"""mt_dialog: multi-turn dialogue SFT on megatron-core.

Version ranges here; the exact tested versions are in requirements-tested.txt, which
scripts/setup.sh uses as pip constraints.
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "mt_dialog", "__init__.py"), encoding="utf-8") as handle:
    VERSION = re.search(r'__version__ = "([^"]+)"', handle.read()).group(1)

setup(
    name="mt_dialog",
    version=VERSION,
    description="Multi-turn dialogue fine-tuning on megatron-core with turn-normalized loss",
    packages=find_packages(include=["mt_dialog", "mt_dialog.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # torch.load(weights_only=True) by default; safe_globals (safe_pickle)
        "megatron-core>=0.16.1,<0.17",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "tqdm>=4.60",
        "psutil>=5.9",  # megatron-core dist_checkpointing needs it
    ],
    extras_require={
        # apex is not on PyPI and is never required; install it yourself if you want it.
        "gpu": ["transformer-engine[pytorch]"],
        "hf": ["transformers>=4.45", "tokenizers>=0.20", "safetensors"],
        "parquet": ["pyarrow>=14"],  # --input *.parquet (Hugging Face dataset downloads)
        "tensorboard": ["tensorboard>=2.14"],  # --tensorboard-dir
        "wandb": ["wandb>=0.19"],  # --wandb-project
        "bench": ["matplotlib>=3.7"],  # benchmarks/ plots
        # peft: the reference the exported LoRA adapters must load in (tests only)
        "test": ["pytest>=8", "hypothesis>=6", "tensorboard>=2.14", "wandb>=0.19", "pyarrow>=14",
                 "peft>=0.13"],
    },
)
