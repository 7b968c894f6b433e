"""scripts/gpu_check.sh on a machine without CUDA, run as users run it: its refusals of bad input,
and the CPU mode of its cheap parts (versions, the demo dataset, a CPU-written checkpoint and the
packed-vs-alone 'thd' check); plus proof that the 'thd' comparison fails when conversations of a
pack attend to each other. The GPU-only parts run on a GPU machine (README: GPU check)."""

import importlib.util
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_check(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(["bash", "scripts/gpu_check.sh", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def script():
    """scripts/gpu_check.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "gpu_check_script", os.path.join(REPO, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def result_lines(stdout: str) -> dict:
    """label -> (status, detail) of the PASS / FAIL / SKIP lines."""
    out = {}
    for line in stdout.splitlines():
        for status in ("PASS", "FAIL", "SKIP (no CUDA)", "SKIP (no TE)"):
            if line.startswith(status):
                label, detail = line[14:40].strip(), line[40:].strip()
                out[label] = (status, detail)
    return out


def test_bad_input_is_refused_with_the_fix(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cases = [(("--only", "thd,bogus"), ["--only 'thd,bogus'", "unknown check bogus",
                                        "versions,thd,resume,finetune,cpu-checkpoint,chat"]),
             (("--python", tmp_path / "no-python"), [str(tmp_path / "no-python"),
                                                     "no such interpreter"]),
             (("--python",), ["--python needs an interpreter"]),
             (("--work-dir", foreign), [str(foreign), "not made by gpu_check",
                                        "pass an empty or new folder"])]
    for args, expected in cases:
        proc = gpu_check(*args, timeout=120)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        for text in expected:
            assert text in proc.stderr, (args, proc.stderr)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """``bash scripts/gpu_check.sh --only thd`` without CUDA: (process, work dir)."""
    if torch.cuda.is_available():
        pytest.skip("CPU mode only; with CUDA run bash scripts/gpu_check.sh itself")
    work = tmp_path_factory.mktemp("gpu_check") / "work"
    proc = gpu_check("--only", "thd", "--work-dir", work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, str(work)


@pytest.mark.multiprocess  # cpu_run: gpu_check.sh trains under torchrun
def test_cpu_mode_reports_versions_and_skips_gpu_parts(cpu_run):
    proc, _ = cpu_run
    lines = result_lines(proc.stdout)
    status, detail = lines["1 versions"]
    assert status == "PASS"
    assert f"torch {torch.__version__}" in detail
    assert f"megatron-core {metadata.version('megatron-core')}" in detail
    for label in ("1 cuda", "2 thd TE bf16", "2 local weights -> TE"):
        assert lines[label][0] == "SKIP (no CUDA)", lines
    assert lines["2 thd local fp32"][0] == "PASS" and lines["2 thd local bf16"][0] == "PASS"
    assert "3 PASS, 0 FAIL, 3 SKIP" in proc.stdout.splitlines()[-1]


@pytest.mark.multiprocess  # cpu_run: gpu_check.sh trains under torchrun
def test_cpu_mode_reads_the_training_logs_it_made(cpu_run, script):
    """The log parser reads every iteration line pretrain_dialog.py wrote (the resume and
    finetune checks compare these numbers on the GPU)."""
    _, work = cpu_run
    with open(os.path.join(work, "logs", "cpu-checkpoint-write.log"), encoding="utf-8") as handle:
        text = handle.read()
    log = script.parse_train_log(text)
    iters = script.CPU_SIZES.cpu_iters
    assert sorted(log.iters) == list(range(1, iters + 1))
    assert len(log.iters) == sum(line.startswith("iter ") for line in text.splitlines())
    assert script.max_loss_diff(log, log, range(1, iters + 1)) == 0.0


@pytest.mark.multiprocess  # cpu_run: gpu_check.sh trains under torchrun
def test_thd_check_fails_when_conversations_attend_to_each_other(cpu_run, script):
    """The packed-vs-alone comparison the check makes, on its own batch and checkpoint: 0 with
    training's isolated segments, far above the tolerance with one causal mask per pack."""
    from mt_dialog.training.data import flatten_micro_batch
    from mt_dialog.training.distributed import destroy_single_process

    _, work = cpu_run
    samples, segments = script.packed_samples(os.path.join(work, "data", "demo"))
    model, error = script.model_from_checkpoint(os.path.join(work, "ckpt_cpu"), "local",
                                                torch.float32)
    try:
        assert error is None
        diffs = {}
        for isolated in (True, False):
            batch = flatten_micro_batch(samples, isolated, torch.device("cpu"))
            packed, alone = script.packed_and_alone_logits(model, batch, segments)
            diffs[isolated] = float((packed - alone).abs().max())
        tolerance = script.fp32_tolerance(float(alone.abs().max()))
    finally:
        destroy_single_process()
    assert diffs[True] <= tolerance < diffs[False] / 10, diffs


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    """``bash scripts/gpu_check.sh --only attention`` without CUDA: (process, work dir)."""
    if torch.cuda.is_available():
        pytest.skip("CPU mode only; with CUDA run bash scripts/gpu_check.sh itself")
    work = tmp_path_factory.mktemp("gpu_check_attention") / "work"
    proc = gpu_check("--only", "attention", "--work-dir", work, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, str(work)


@pytest.mark.multiprocess  # three CPU training runs of gpu_check.sh (about 3 minutes on 2 cores)
def test_attention_check_cpu_mode(attention_run, script):
    """Check 9 in CPU mode: each variant's local fp32 / bf16 packed-vs-alone lines pass, the TE
    lines say SKIP (no CUDA); and its comparison fails on the window checkpoint when the
    conversations of a pack attend to each other (one causal mask per pack)."""
    from mt_dialog.training.data import flatten_micro_batch
    from mt_dialog.training.distributed import destroy_single_process

    proc, work = attention_run
    lines = result_lines(proc.stdout)
    for name in script.ATTENTION_VARIANTS:
        for part in ("local fp32", "local bf16"):
            assert lines[f"9 {name} {part}"][0] == "PASS", lines
        for part in ("TE bf16", "local -> TE"):
            assert lines[f"9 {name} {part}"][0] == "SKIP (no CUDA)", lines
    samples, segments = script.packed_samples(os.path.join(work, "data", "demo"))
    model, error = script.model_from_checkpoint(os.path.join(work, "ckpt_attention_window"),
                                                "local", torch.float32)
    try:
        assert error is None
        batch = flatten_micro_batch(samples, False, torch.device("cpu"))
        packed, alone = script.packed_and_alone_logits(model, batch, segments)
    finally:
        destroy_single_process()
    assert float((packed - alone).abs().max()) > 10 * script.fp32_tolerance(
        float(alone.abs().max()))


@pytest.mark.multiprocess  # gpu_check.sh trains (the marker's definition)
def test_cpu_mode_runs_the_gemma3_block_check(tmp_path):
    """``--only gemma3`` without CUDA: the local fp32 / bf16 packed-vs-alone lines pass, the TE
    line is skipped with its reason."""
    if torch.cuda.is_available():
        pytest.skip("CPU mode only; with CUDA run bash scripts/gpu_check.sh itself")
    proc = gpu_check("--only", "gemma3", "--work-dir", tmp_path / "work")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line[15:40].strip(): line[:15].strip() for line in proc.stdout.splitlines()
             if line[:4] in ("PASS", "FAIL", "SKIP")}
    assert lines["11 gemma3 local fp32"] == "PASS" and lines["11 gemma3 local bf16"] == "PASS"
    assert lines["11 gemma3 TE bf16"] == "SKIP (no CUDA)"


@pytest.mark.multiprocess  # gpu_check.sh launches pretrain_dialog.py
def test_cpu_mode_fp8_and_overlap_checks_are_the_refusals(tmp_path):
    """``--only fp8,tp-comm-overlap`` without CUDA: pretrain_dialog.py refuses both flags in one
    line naming why (the CPU stand-in passes), the GPU runs are skipped with that reason."""
    if torch.cuda.is_available():
        pytest.skip("CPU mode only; with CUDA run bash scripts/gpu_check.sh itself")
    proc = gpu_check("--only", "fp8,tp-comm-overlap", "--work-dir", tmp_path / "work")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = result_lines(proc.stdout)
    status, detail = lines["12 fp8 refused"]
    assert status == "PASS" and "exit 2: error: --fp8-format hybrid" in detail, detail
    assert "compute capability 8.9" in detail and "no CUDA GPU" in detail
    assert lines["12 fp8 vs bf16"][0] == "SKIP (no CUDA)"
    status, detail = lines["13 overlap refused"]
    assert status == "PASS" and "error: --tp-comm-overlap: the overlap runs in Transformer " \
        "Engine's userbuffers" in detail, detail
    assert lines["13 tp-comm-overlap"][0] == "SKIP (no CUDA)"
    assert "3 PASS, 0 FAIL, 3 SKIP" in proc.stdout.splitlines()[-1]


def test_fp8_verdict_fails_a_drifting_or_non_finite_run(script):
    """Check 12's comparison: FP8's first loss within 5% of bf16's and every loss finite."""
    def log(*losses):
        return script.TrainLog(iters={i + 1: (v, v) for i, v in enumerate(losses)})

    bf16 = log(5.0, 4.5, 4.0)
    assert script.fp8_verdict(bf16, log(5.1, 4.6, 4.1), 3)[0]
    assert not script.fp8_verdict(bf16, log(5.5, 4.6, 4.1), 3)[0]  # 10% off
    assert not script.fp8_verdict(bf16, log(5.0, float("nan"), 4.1), 3)[0]
    assert not script.fp8_verdict(bf16, log(5.0, 4.6), 3)[0]  # an iteration not logged


@pytest.mark.multiprocess  # gpu_check.sh trains under torchrun (1 and 2 processes)
def test_cpu_mode_context_parallel_stand_in(tmp_path):
    """``--only context-parallel`` without CUDA: CP=2 on 2 processes (the local attention's
    all-gather path, gloo) trains like one process, bf16, within the check's tolerance."""
    if torch.cuda.is_available():
        pytest.skip("CPU mode only; with CUDA run bash scripts/gpu_check.sh itself")
    proc = gpu_check("--only", "context-parallel", "--work-dir", tmp_path / "work")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = result_lines(proc.stdout)
    status, detail = lines["14 context-parallel p2p"]
    assert status == "PASS" and "CPU stand-in" in detail and "max |dloss|" in detail, detail
    assert "2 PASS, 0 FAIL" in proc.stdout.splitlines()[-1], proc.stdout
