"""Run pretrain_dialog.py with a disk that fills up during one checkpoint save, on one rank:

    MT_DIALOG_TEST_FAIL_SAVE=iter_0000004 MT_DIALOG_TEST_FAIL_RANK=1 \\
        torchrun ... tests/training/failing_save_worker.py PRETRAIN ARGS...

megatron-core's checkpoint writer (``filesystem_async._write_item``) raises ``OSError(ENOSPC)``
on rank MT_DIALOG_TEST_FAIL_RANK while writing into a folder whose path contains
MT_DIALOG_TEST_FAIL_SAVE, after the first item of the file: a save that fails midway.
"""

from __future__ import annotations

import errno
import functools
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    sys.path.insert(0, REPO)
    from mt_dialog.training.distributed import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async._write_item
    target = os.environ["MT_DIALOG_TEST_FAIL_SAVE"]
    failing_rank = os.environ["MT_DIALOG_TEST_FAIL_RANK"]

    @functools.wraps(original)  # megatron inspects its signature
    def write_item(*args, **kwargs):
        stream = next((a for a in args if hasattr(a, "name") and hasattr(a, "write")), None)
        result = original(*args, **kwargs)
        if (os.environ.get("RANK") == failing_rank and stream is not None
                and target in str(stream.name)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return result

    filesystem_async._write_item = write_item
    script = os.path.join(REPO, "pretrain_dialog.py")
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
