"""One module per Hugging Face model family and their registry (``base`` module docstring: how
to add a family). ``python -m mt_dialog.convert.families`` prints docs/huggingface.md's table."""

from mt_dialog.convert.families.base import ConversionError, Family, HFModel, Rule
from mt_dialog.convert.families.registry import (
    ARCHITECTURES,
    FAMILIES,
    check_names,
    docs_table,
    expected_hf_names,
    export_architecture,
    family,
    hf_config,
    iter_hf_to_mcore,
    iter_mcore_to_hf,
    read_hf_config,
)

__all__ = ["ARCHITECTURES", "FAMILIES", "ConversionError", "Family", "HFModel", "Rule",
           "check_names", "docs_table", "expected_hf_names", "export_architecture", "family",
           "hf_config", "iter_hf_to_mcore", "iter_mcore_to_hf", "read_hf_config"]
