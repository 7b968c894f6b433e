"""Print the table of supported families (docs/huggingface.md)."""

from mt_dialog.convert.families.registry import docs_table

print(docs_table())
