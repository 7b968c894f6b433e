"""Print the README's table of supported families."""

from mt_dialog.convert.families.registry import docs_table

print(docs_table())
