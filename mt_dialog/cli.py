"""What every command-line tool does around its ``main``."""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn


def run(main: Callable[[], int]) -> NoReturn:
    """``sys.exit(main())``; when the reader of stdout goes away early (``tool | head``) the tool
    stops quietly instead of printing a ``BrokenPipeError`` traceback (Python's documented way:
    point stdout at devnull so that the interpreter's final flush does not fail again)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 1
    sys.exit(code)
