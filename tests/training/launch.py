"""The one way tests launch the project's scripts: torchrun for several processes (a fresh free
port), plain ``python SCRIPT`` for one (the path a single-process user takes), OMP_NUM_THREADS=1,
the repository first on PYTHONPATH and as the working directory, and no RANK / WORLD_SIZE /
MASTER_* inherited from an enclosing launcher.

    from tests.training.launch import run, run_torchrun
    proc = run("pretrain_dialog.py", 1, ARGS, expect_ok=False)            # python, any exit code
    proc = run_torchrun("tests/training/equivalence_worker.py", 2, ["--tp", "2"], timeout=120)

``tool_here(main, *args)`` runs a tool's ``main`` in this process instead (no fresh interpreter:
for tests whose point is not the command line, which other tests launch).

``run`` returns the ``subprocess.CompletedProcess`` (text stdout/stderr); with ``expect_ok`` (the
default) a non-zero exit raises ``AssertionError`` carrying the command and the captured output,
and so does a timeout, always. ``command`` and ``launch_env`` give what ``run`` runs, for tests
that drive the process themselves (``subprocess.Popen``: signals, several at once).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TAIL = 20000  # characters of each stream kept in failure messages
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                       "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment less an enclosing launcher's layout, with OMP_NUM_THREADS=1
    and the repository on PYTHONPATH (``extra`` entries win)."""
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCHER_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                  else []))
    env.update(extra or {})
    return env


def command(script: str, nproc: int, args: Sequence = (),
            torchrun: Optional[bool] = None) -> List[str]:
    """``torchrun --nproc_per_node nproc script *args`` on 127.0.0.1 and a free port, or
    ``python script *args`` (by default for one process). ``script`` is absolute or relative to
    the repository."""
    args = [str(a) for a in args]
    if not (nproc > 1 if torchrun is None else torchrun):
        return [sys.executable, script, *args]
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    runner = [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]
    return [*runner, "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), script, *args]


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def describe(proc: subprocess.CompletedProcess, what: str = "") -> str:
    """The command, its exit code and the tail of its output, for assertion messages."""
    cmd = proc.args if isinstance(proc.args, str) else " ".join(map(str, proc.args))
    return (f"{what}\ncommand: {cmd}\nexit code: {proc.returncode}\n"
            f"--- stdout (last {_TAIL} chars) ---\n{_text(proc.stdout)[-_TAIL:]}\n"
            f"--- stderr (last {_TAIL} chars) ---\n{_text(proc.stderr)[-_TAIL:]}")


def run(script: str, nproc: int = 1, args: Sequence = (), timeout: float = 300,
        env: Optional[Dict[str, str]] = None, expect_ok: bool = True,
        torchrun: Optional[bool] = None) -> subprocess.CompletedProcess:
    """Run ``command(script, nproc, args, torchrun)`` in the repository with ``launch_env(env)``
    and capture its output; a torchrun whose free port was taken between choosing and binding
    it is retried once."""
    for attempt in range(2):
        cmd = command(script, nproc, args, torchrun)
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=launch_env(env), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            timed_out = subprocess.CompletedProcess(cmd, None, exc.stdout, exc.stderr)
            raise AssertionError(describe(timed_out, f"timed out after {timeout} s")) from None
        in_use = "address already in use" in (proc.stdout + proc.stderr).lower()
        if proc.returncode != 0 and in_use and attempt == 0 and "--master_port" in cmd:
            continue
        if expect_ok and proc.returncode != 0:
            raise AssertionError(describe(proc, f"{script} exited with {proc.returncode}"))
        return proc
    raise AssertionError("unreachable")


def run_torchrun(script: str, nproc: int, args: Sequence = (), timeout: float = 300,
                 env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``run`` under torchrun whatever ``nproc`` (a worker that reads torchrun's environment),
    failing on a non-zero exit."""
    return run(script, nproc, args, timeout, env, expect_ok=True, torchrun=True)


def tool_here(main, *args, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """A tool's ``main(args)`` (``tools/convert_checkpoint.py``, ``tools/chat.py``,
    ``tools/preprocess_dialog.py``, a refusal of ``pretrain_dialog.py``) in this process: what
    ``run`` runs less a fresh interpreter's seconds of torch / megatron imports. Returns a
    CompletedProcess with the exit code and the captured stdout / stderr; the single-process
    groups the tool set up are torn down. The command lines themselves stay launched as users
    launch them elsewhere (test_hf_checkpoint.py starts each tool in a fresh process)."""
    from mt_dialog.training.distributed import destroy_single_process

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    finally:
        destroy_single_process()
    proc = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if expect_ok and code != 0:
        raise AssertionError(f"{main.__module__} {argv} exited {code}:\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc
