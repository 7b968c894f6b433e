"""Shared helpers of the benchmarks: paths, machine/version record, tables, JSON, plots, timing.

Every benchmark writes ``benchmarks/results/<name>.json`` (its figures plus ``machine`` =
``machine_info()``) and ``benchmarks/results/<name>.png``, and prints a table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
WORK_DIR = os.path.join(BENCH_DIR, "work")  # scratch data (git-ignored: /benchmarks/work/)
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")  # ../shared/data
LLAMA2_MODEL = os.path.join(SHARED_DATA, "llama2_tokenizer.model")
FIREFLY_JSONL = os.path.join(SHARED_DATA, "firefly_multiturn_zh.jsonl")

if REPO not in sys.path:
    sys.path.insert(0, REPO)


def quiet_warnings() -> None:
    """megatron-core warns at import that TE/apex are absent: expected on CPU."""
    for message in (".*Transformer Engine and Apex.*", "Apex is not installed.*",
                    "full scope is deprecated.*", ".*torch.jit.script_method.*"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def shared_data_status() -> Optional[str]:
    """None when ../shared/data has the Llama 2 model and the Firefly file, else why not."""
    missing = [p for p in (LLAMA2_MODEL, FIREFLY_JSONL) if not os.path.isfile(p)]
    if missing:
        return (f"skipped: {', '.join(missing)} not found (../shared is absent on a fresh clone; "
                "these rows need the Llama 2 tokenizer and the Firefly conversations)")
    return None


# -- machine and versions ---------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed is an answer, not an error
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> Dict[str, Any]:
    """CPU, cores, load, OS, Python and package versions, git commit (read-only git calls)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average_1_5_15": load,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "megatron_core": _version("megatron-core"),
        "numpy": _version("numpy"),
        "sentencepiece": _version("sentencepiece"),
        "matplotlib": _version("matplotlib"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_tracked_changes": bool(status) if status is not None else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def machine_line(info: Dict[str, Any]) -> str:
    return (f"{info['cpu']} ({info['usable_cores']} usable cores, load {info['load_average_1_5_15']})"
            f" | Python {info['python']} | torch {info['torch']} | megatron-core "
            f"{info['megatron_core']} | numpy {info['numpy']} | sentencepiece "
            f"{info['sentencepiece']} | commit {str(info['git_commit'])[:10]}"
            + (" (+ local changes)" if info.get("git_tracked_changes") else ""))


# -- output ------------------------------------------------------------------------------------


def result_paths(name: str, quick: bool) -> Dict[str, str]:
    """Where a benchmark's JSON and PNG go (quick runs get a ``-quick`` suffix, so a smoke run
    never overwrites the figures of a full run)."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stem = os.path.join(RESULTS_DIR, name + ("-quick" if quick else ""))
    return {"json": stem + ".json", "png": stem + ".png"}


def write_json(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, default=_json_default)
        handle.write("\n")
    os.replace(tmp, path)


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return float(value)
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


def made_with(sidecar: str, params: Dict[str, Any]) -> bool:
    """Whether generated inputs are reusable: ``sidecar`` (JSON) records exactly ``params``."""
    try:
        with open(sidecar, encoding="utf-8") as handle:
            return json.load(handle) == params
    except (OSError, ValueError):
        return False


def record_made_with(sidecar: str, params: Dict[str, Any]) -> None:
    """Write ``params`` to ``sidecar`` once the inputs they describe are complete."""
    with open(sidecar, "w", encoding="utf-8") as handle:
        json.dump(params, handle)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into README.md)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_looks_numeric(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w
                            for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _looks_numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("%", "").replace("x", "").replace("s", "").strip()
    try:
        float(stripped)
        return True
    except ValueError:
        return text in ("-", "")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot written (pip install matplotlib)",
              file=sys.stderr)
        return None
    return plt


def save_figure(fig, path: str, info: Dict[str, Any]) -> None:
    fig.text(0.01, 0.005, machine_line(info)[:180], fontsize=6, color="0.4")
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def fmt_int(value: float) -> str:
    return f"{int(round(value)):,}"


def fmt_seconds(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:,.0f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def pin_to_one_core() -> Optional[int]:
    """Run this process on a single core (the last usable one); returns it, or None."""
    try:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[-1]})
        return cores[-1]
    except (AttributeError, OSError):
        return None


def header(title: str, info: Dict[str, Any], quick: bool) -> str:
    mode = "QUICK smoke run (small sizes; not the published figures)" if quick else "full run"
    return f"== {title} — {mode}\n   {machine_line(info)}"


def wall() -> float:
    return time.perf_counter()


def stats(values: List[float]) -> Dict[str, float]:
    import numpy as np

    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "std": float("nan"),
                "sem": float("nan")}
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"n": int(array.size), "mean": float(array.mean()), "median": float(np.median(array)),
            "std": std, "sem": std / max(1.0, array.size) ** 0.5, "min": float(array.min()),
            "max": float(array.max())}


def run_torchrun_worker(script: str, worker_args: Sequence[str], out: str,
                        nproc: int = 2) -> Dict[str, Any]:
    """``torchrun --standalone --nproc_per_node nproc script --worker ... --out out`` with
    OMP_NUM_THREADS=1 and the repository on PYTHONPATH; the JSON the worker wrote to ``out``
    (SystemExit with the output's tail when it fails)."""
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    runner = [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]
    command = [*runner, "--standalone", "--nproc_per_node", str(nproc), os.path.abspath(script),
               "--worker", "--out", out, *map(str, worker_args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]]
                                                  if env.get("PYTHONPATH") else []))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"training worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)
