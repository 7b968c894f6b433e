"""Files written whole or not at all, on a file system that many hosts share.

Every temporary file or folder is named after its final path, the host and the process::

    runs/ckpt/config.json.tmp-node07-4242      becomes runs/ckpt/config.json (os.replace)
    data/chat.tmp-node03-977/                  preprocessing's staging folder of data/chat
    out/.qwen_hf.tmp-node07-4242/              an export, moved to out/qwen_hf when complete

``os.replace`` swaps a finished file in atomically, so a crash or a full disk leaves the last
complete file in place, never a cut one. A leftover (its process killed) is removed by the next
run only when its owner can be checked: a process of *this* host that is gone. A temporary of
another host may be that node's live work: it is never removed here (``leftovers`` reports it).
Names without a host (``PATH.tmp-PID``, written by earlier versions) count as this host's.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
from typing import Any, List, NamedTuple, Optional

_MARK = ".tmp-"


def host() -> str:
    """This machine's name as temporary names carry it (no path separators)."""
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def temp_path(path: str) -> str:
    """``PATH.tmp-HOST-PID``: this process's temporary name for ``path``."""
    return f"{path}{_MARK}{host()}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Leftover(NamedTuple):
    """A temporary sibling of a path: its owner and what can be said of it."""

    path: str
    host: str
    pid: int
    state: str  # "alive" (this host), "gone" (this host: removable), "elsewhere" (unknown)


def _owner(path: str) -> Optional[Leftover]:
    tail = path.rsplit(_MARK, 1)[1]
    name, _, pid = tail.rpartition("-")
    if not pid.isdigit():
        return None
    owner = name or host()
    if owner != host():
        return Leftover(path, owner, int(pid), "elsewhere")
    if int(pid) == os.getpid():
        return None
    return Leftover(path, owner, int(pid), "alive" if process_alive(int(pid)) else "gone")


def leftovers(path: str) -> List[Leftover]:
    """Temporary siblings of ``path`` (``PATH.tmp-*``) other than this process's, with their
    owners' state."""
    found = (_owner(p) for p in sorted(glob.glob(glob.escape(path) + _MARK + "*")))
    return [leftover for leftover in found if leftover is not None]


def remove_gone(path: str) -> List[str]:
    """Remove the temporaries of ``path`` whose process on this host is gone; their paths."""
    removed = []
    for leftover in leftovers(path):
        if leftover.state == "gone":
            if os.path.isdir(leftover.path):
                shutil.rmtree(leftover.path, ignore_errors=True)
            elif os.path.exists(leftover.path):
                os.remove(leftover.path)
            removed.append(leftover.path)
    return removed


def write_json_atomic(path: str, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` through ``temp_path`` + fsync + ``os.replace``: readers
    see the old file or the new one, whole. Leftovers of killed writers are removed first."""
    remove_gone(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
