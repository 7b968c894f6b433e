"""Run tools/preprocess_dialog.py and SIGKILL it (no cleanup of any kind runs) at one point:

    python tests/data/kill_worker.py tokenizing|writing|publishing PREPROCESS ARGS...

tokenizing   after the main process accounted for 10 rendered conversations
writing      after the packed-file writer (run in this process) added 2 packs
publishing   after the first finished file was moved to the final prefix
"""

from __future__ import annotations

import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def _kill_after(calls: int, original):
    count = [0]

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        count[0] += 1
        if count[0] >= calls:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapped


def main() -> None:
    point, argv = sys.argv[1], sys.argv[2:]
    from mt_dialog.data import preprocess, storage

    storage.indexed_dataset_module()  # the packed files are then written in this process
    if point == "tokenizing":
        preprocess._account = _kill_after(10, preprocess._account)
    elif point == "writing":
        storage.PackWriter.add_pack = _kill_after(2, storage.PackWriter.add_pack)
    elif point == "publishing":
        replace = os.replace

        def publishing(source, target, *args, **kwargs):
            replace(source, target, *args, **kwargs)
            if ".tmp-" in str(source) and ".tmp-" not in str(target):
                os.kill(os.getpid(), signal.SIGKILL)

        os.replace = publishing
    else:
        raise SystemExit(f"unknown point {point!r}")
    from tools.preprocess_dialog import main as preprocess_main

    sys.exit(preprocess_main(argv))


if __name__ == "__main__":
    main()
