"""Progress bars on stderr (tqdm), or silent stand-ins with ``--no-progress``."""

from __future__ import annotations

import sys


def progress_factory(enabled: bool):
    """``progress(iterable=None, **tqdm_kwargs)``: a tqdm bar, or the iterable itself / a bar
    that does nothing when disabled (or when tqdm is missing: a bar is never worth a crash)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    def progress(iterable=None, **kwargs):
        if tqdm is None or not enabled:
            return iterable if iterable is not None else NullBar()
        return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)

    return progress


class NullBar:
    def update(self, *_):
        pass

    def set_postfix_str(self, *_):
        pass

    def close(self):
        pass
