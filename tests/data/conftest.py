"""The data tests run the pipeline in this process hundreds of times. Import megatron-core's
indexed_dataset once, up front, so that those runs write the packed files inline (the default of
``writer.open_writer`` when the import is already done) rather than each starting a writer
process that imports torch + megatron-core again; ``test_staging.py`` runs the writer process
explicitly (and through the tool in a fresh interpreter, where it is the default)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def indexed_dataset_imported():
    from mt_dialog.data.storage import indexed_dataset_module

    return indexed_dataset_module()
