"""Run a script under torchrun from tests: a fresh free port, OMP_NUM_THREADS=1, cwd = the repo.

    from tests.training.launch import run_torchrun
    proc = run_torchrun("tests/training/equivalence_worker.py", 2, ["--tp", "2"], timeout=120)

``run_torchrun`` returns the ``subprocess.CompletedProcess`` (text stdout/stderr) and raises
``AssertionError`` carrying the command and the captured output when the launch exits non-zero or
times out.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Dict, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TAIL = 20000  # characters of each stream kept in failure messages


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun() -> list:
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _report(what: str, cmd, stdout, stderr) -> str:
    return (f"{what}\ncommand: {' '.join(cmd)}\n"
            f"--- stdout (last {_TAIL} chars) ---\n{_text(stdout)[-_TAIL:]}\n"
            f"--- stderr (last {_TAIL} chars) ---\n{_text(stderr)[-_TAIL:]}")


def run_torchrun(script: str, nproc: int, args: Sequence[str] = (), timeout: float = 300,
                 env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc script *args`` on 127.0.0.1 and a free port.

    ``script`` is absolute or relative to the repo root (the working directory). ``env`` entries
    are added to the inherited environment (less any RANK/WORLD_SIZE/MASTER_* of an enclosing
    launcher; OMP_NUM_THREADS=1 and the repo on PYTHONPATH are
    set unless given). A port taken between choosing and binding it is retried once."""
    full_env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        full_env.pop(key, None)  # never inherit an enclosing launcher's layout
    full_env["OMP_NUM_THREADS"] = "1"
    full_env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
    full_env.update(env or {})
    for attempt in range(2):
        cmd = [*_torchrun(), "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               script, *map(str, args)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(_report(f"torchrun timed out after {timeout} s", cmd,
                                         exc.stdout, exc.stderr)) from None
        if proc.returncode == 0:
            return proc
        in_use = "address already in use" in (proc.stdout + proc.stderr).lower()
        if not (in_use and attempt == 0):
            raise AssertionError(_report(f"torchrun exited with {proc.returncode}", cmd,
                                         proc.stdout, proc.stderr))
    raise AssertionError("unreachable")
