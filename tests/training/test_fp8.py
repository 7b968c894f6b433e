"""--fp8-format / --fp8-recipe / --tp-comm-overlap: refused with the reason where they cannot run
(this CPU machine, through the real command line), accepted where the capability probe reports
Transformer Engine and an FP8 GPU (``training.fp8.probe`` replaced), and what they set in
megatron-core's TransformerConfig; TE's userbuffers initialized with the training micro-batch's
shape before the model is built. The GPU runs themselves are scripts/gpu_check.py's "fp8" and
"tp-comm-overlap" checks."""

import sys
import types

import pytest
import torch

from mt_dialog.training import fp8

BASE = ["--data-path", "data/unused", "--train-iters", "2"]
HOPPER = fp8.Capability("2.8.0", None, 1, (9, 0))
OVERLAP = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--tp-comm-overlap",
           "--bf16"]


def _parse(*extra):
    from pretrain_dialog import parse_config

    return parse_config(BASE + [str(e) for e in extra])


def _main(argv, capsys):
    """pretrain_dialog.main in this process: (exit code, its one stderr line)."""
    from pretrain_dialog import main

    try:
        code = main(BASE + [str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    return code, err


@pytest.fixture
def machine(monkeypatch):
    """Set the capability the probe reports (default: Hopper with TE 2.8); TE's layers are then
    what --transformer-impl auto picks."""
    def use(capability=HOPPER):
        monkeypatch.setattr(fp8, "probe", lambda: capability)
        monkeypatch.setattr("mt_dialog.training.model.transformer_engine_usable", lambda: True)
        # TransformerConfig asks for TE's fused RoPE kernel, on by default with TE's layers
        monkeypatch.setattr("megatron.core.models.common.embeddings.rope_utils."
                            "fused_apply_rotary_pos_emb", lambda *args, **kwargs: None)
    return use


# ------------------------------------------------------------------ this CPU machine: refused

@pytest.mark.parametrize("extra, expected", [
    (["--fp8-format", "hybrid", "--bf16"],
     "error: --fp8-format hybrid --fp8-recipe delayed: FP8 needs Transformer Engine and a CUDA "
     "GPU of compute capability 8.9 or more, but this machine has no transformer-engine"),
    (["--fp8-format", "e4m3", "--fp8-recipe", "mxfp8", "--bf16"],
     "error: --fp8-format e4m3 --fp8-recipe mxfp8: FP8 needs Transformer Engine and a CUDA GPU "
     "of compute capability 10.0 or more"),
    (["--fp8-format", "hybrid", "--fp16"],
     "error: --fp8-format hybrid needs --bf16 (FP8 GEMMs keep bf16 parameters and activations, "
     "as Megatron-LM runs them), but the run is --fp16; use --bf16 instead of --fp16"),
    (["--fp8-format", "hybrid"], "error: --fp8-format hybrid needs --bf16"),
    (["--fp8-recipe", "tensorwise"],
     "error: --fp8-recipe needs --fp8-format e4m3|hybrid; add it or drop the flag"),
    (["--fp8-amax-history-len", "16"], "error: --fp8-amax-history-len needs --fp8-format"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--fp8-margin", "1", "--bf16"],
     "error: --fp8-margin applies to --fp8-recipe delayed only (this run: tensorwise, which "
     "computes its scales from the current tensors); drop the flag"),
    (["--fp8-format", "e5m2"], "error: argument --fp8-format: invalid choice: 'e5m2'"),
    (["--fp8-recipe", "custom"], "error: argument --fp8-recipe: invalid choice: 'custom'"),
    (["--tp-comm-overlap"],
     "error: --tp-comm-overlap overlaps the communication of tensor parallelism with sequence "
     "parallelism, but --tensor-model-parallel-size is 1 and --sequence-parallel is off; add "
     "--tensor-model-parallel-size 2 (or more) --sequence-parallel"),
    (["--tensor-model-parallel-size", "2", "--tp-comm-overlap"],
     "error: --tp-comm-overlap overlaps the communication of tensor parallelism with sequence "
     "parallelism, but --tensor-model-parallel-size is 2 and --sequence-parallel is off"),
    (OVERLAP, "error: --tp-comm-overlap: the overlap runs in Transformer Engine's userbuffers on "
              "CUDA GPUs, but this machine has no transformer-engine"),
    (["--fp8-param-gather"], "error: --fp8-param-gather: not supported; mt_dialog's FP8 flags "
                             "are --fp8-format, --fp8-recipe"),
    (["--tp-comm-overlap-cfg", "ub.yaml"], "error: --tp-comm-overlap-cfg: not supported"),
])
def test_the_cli_refuses_in_one_line_naming_why(extra, expected, capsys):
    if torch.cuda.is_available():
        pytest.skip("the machine refusals are for a machine without CUDA")
    code, line = _main(extra, capsys)
    assert code == 2 and line.startswith(expected), line
    if "this machine has" in line:
        assert "no CUDA GPU" in line and "or train with --bf16 alone" in line or \
            "drop --tp-comm-overlap" in line, line


# ------------------------------------------------ a machine with TE and an FP8 GPU: accepted

@pytest.mark.parametrize("extra, fields", [
    (["--fp8-format", "hybrid"], ("hybrid", "delayed", 0, 1, "most_recent")),
    (["--fp8-format", "e4m3", "--fp8-margin", "1", "--fp8-amax-history-len", "16",
      "--fp8-amax-compute-algo", "max"], ("e4m3", "delayed", 1, 16, "max")),
    (["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"],
     ("hybrid", "tensorwise", 0, 1, "most_recent")),
    (["--fp8-format", "hybrid", "--fp8-recipe", "blockwise"],
     ("hybrid", "blockwise", 0, 1, "most_recent")),
])
def test_fp8_flags_reach_megatron_cores_transformer_config(machine, extra, fields):
    from mt_dialog.training.model import transformer_config

    machine()
    config = _parse("--bf16", *extra)
    tconfig = transformer_config(config)
    assert (tconfig.fp8, tconfig.fp8_recipe, tconfig.fp8_margin, tconfig.fp8_amax_history_len,
            tconfig.fp8_amax_compute_algo) == fields
    assert tconfig.bf16 and tconfig.params_dtype == torch.bfloat16
    assert not tconfig.tp_comm_overlap


def test_without_the_flags_nothing_is_probed_and_fp8_is_off(monkeypatch):
    from mt_dialog.training.model import transformer_config

    def fail():
        raise AssertionError("probed without --fp8-format / --tp-comm-overlap")

    monkeypatch.setattr(fp8, "probe", fail)
    tconfig = transformer_config(_parse("--bf16", "--transformer-impl", "local"))
    assert tconfig.fp8 is None and not tconfig.tp_comm_overlap


def test_tp_comm_overlap_reaches_the_transformer_config(machine, monkeypatch):
    from mt_dialog.training.model import transformer_config

    machine()
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    tconfig = transformer_config(_parse(*OVERLAP, "--fp8-format", "hybrid"))
    assert tconfig.tp_comm_overlap and tconfig.sequence_parallel and tconfig.fp8 == "hybrid"


# ------------------------------------------- a GPU machine that still cannot run the request

@pytest.mark.parametrize("capability, extra, message", [
    (fp8.Capability("2.8.0", None, 1, (8, 6)), [],
     "--fp8-recipe delayed needs a GPU of compute capability 8.9 or more (Ada, Hopper, "
     "Blackwell), this one has 8.6; train with --bf16 alone"),
    (HOPPER, ["--fp8-recipe", "mxfp8"],
     "--fp8-recipe mxfp8 needs a GPU of compute capability 10.0 or more (Blackwell), this one "
     "has 9.0; train with --bf16 alone, or --fp8-recipe delayed (8.9+)"),
    (fp8.Capability("2.1.0", None, 1, (9, 0)), ["--fp8-recipe", "tensorwise"],
     "--fp8-recipe tensorwise needs transformer-engine 2.2 or newer (this is 2.1.0)"),
    (fp8.Capability("2.8.0", None, 1, (9, 0), (("delayed", "Device compute capability 8.9 or "
                                                "higher required for FP8 execution."),)), [],
     "transformer-engine 2.8.0 refuses it on this GPU (Device compute capability 8.9"),
    (HOPPER, ["--transformer-impl", "local"], "FP8 runs in Transformer Engine's layers, not "
                                              "megatron-core's local ones"),
    (HOPPER, ["--num-experts", "4"], "FP8 on Mixture-of-Experts layers needs each expert's "
                                     "token count padded"),
])
def test_fp8_is_refused_where_the_gpu_te_or_layers_cannot_run_it(machine, capability, extra,
                                                                 message):
    machine(capability)
    with pytest.raises(ValueError) as exc:
        _parse("--bf16", "--fp8-format", "hybrid", *extra)
    text = str(exc.value)
    assert text.startswith("fp8_format: --fp8-format hybrid --fp8-recipe ") and message in text


@pytest.mark.parametrize("capability, extra, seq_length, message", [
    (HOPPER, ["--seq-length", "200"], None,
     "FP8 GEMMs (delayed) need the tokens of every micro-batch to be a multiple of 16, but "
     "--seq-length is 200 (a validation micro-batch is one pack); rebuild the dataset with "
     "tools/preprocess_dialog.py --seq-length 208, or train with --bf16"),
    (fp8.Capability("2.8.0", None, 1, (10, 0)), ["--fp8-recipe", "mxfp8"], 528,
     "multiple of 32, but --seq-length is 528"),
    (HOPPER, ["--hidden-size", "72", "--num-attention-heads", "4"], 256,
     "need every weight size to be a multiple of 16, but --hidden-size = 72"),
    (HOPPER, ["--ffn-hidden-size", "200"], 256, "--ffn-hidden-size / TP = 200"),
])
def test_fp8_is_refused_for_gemm_sizes_it_cannot_take(machine, capability, extra, seq_length,
                                                      message):
    """--seq-length on the command line is checked when parsed; the datasets' length by
    ``check`` before the model is built (``loop.check_before_build``)."""
    machine(capability)
    with pytest.raises(ValueError, match="^fp8_format: ") as exc:
        config = _parse("--bf16", "--fp8-format", "hybrid", *extra)
        fp8.check(config, seq_length)
    assert message in str(exc.value)


def test_the_datasets_sequence_length_is_checked_before_the_model(machine, demo_tokenizer):
    """The run's real pre-build checks on a dataset packed to 200 tokens (not a multiple of
    16): refused naming the length and the fix; 16 x 13 = 208 passes the check."""
    from mt_dialog.training.loop import check_before_build
    from tests.training.conftest import _other_demo_data

    machine()
    prefix = _other_demo_data(demo_tokenizer, "fp8_odd", 40, seed=5, seq_length=200)
    config = _parse("--bf16", "--fp8-format", "hybrid")
    config.data.data_path = [prefix]
    with pytest.raises(ValueError, match="--seq-length is 200 .*--seq-length 208"):
        check_before_build(config, 1)
    fp8.check(config, 208)  # no error


@pytest.mark.parametrize("extra, env, message", [
    ([], None, "export CUDA_DEVICE_MAX_CONNECTIONS=1 before launching"),
    (["--micro-batch-size", "2", "--eval-iters", "1"], "1",
     "the userbuffers hold one micro-batch shape (--micro-batch-size 2 packs), but validation "
     "runs one pack per micro-batch; use --micro-batch-size 1"),
    (["--transformer-impl", "local"], "1", "not megatron-core's local ones"),
    (["--multi-latent-attention"], "1", "no userbuffers for multi-latent attention"),
])
def test_tp_comm_overlap_is_refused_where_it_cannot_run(machine, monkeypatch, extra, env,
                                                        message):
    machine()
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    if env:
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", env)
    with pytest.raises(ValueError, match="^tp_comm_overlap: --tp-comm-overlap: ") as exc:
        _parse(*OVERLAP, *extra)
    assert message in str(exc.value)


def test_tp_comm_overlap_needs_te_with_the_torch_distributed_bootstrap(machine, monkeypatch):
    machine(fp8.Capability("1.8.0", None, 2, (9, 0)))
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with pytest.raises(ValueError, match="transformer-engine 1.8.0 bootstraps its userbuffers "
                                         "with MPI only"):
        _parse(*OVERLAP)


def test_blackwell_needs_no_single_cuda_queue(machine, monkeypatch):
    machine(fp8.Capability("2.8.0", None, 2, (10, 0)))
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    assert _parse(*OVERLAP).parallel.tp_comm_overlap


# ------------------------------------------------------------------ TE's userbuffers, set up once

def test_userbuffers_get_the_training_micro_batch_shape(machine, monkeypatch):
    """``initialize_tp_communicators`` calls TE's ``initialize_ub`` as Megatron-LM does: the
    flattened micro-batch (micro-batch size x seq length tokens) by the hidden size, the TP
    size, FP8 buffers with --fp8-format; nothing (no TE import) without --tp-comm-overlap."""
    calls = []
    base = types.ModuleType("transformer_engine.pytorch.module.base")
    base.initialize_ub = lambda **kwargs: calls.append(kwargs)
    for name in ("transformer_engine", "transformer_engine.pytorch",
                 "transformer_engine.pytorch.module"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.module.base", base)
    sys.modules["transformer_engine.pytorch.module"].base = base
    machine()
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    plain = _parse("--bf16", "--transformer-impl", "local")
    assert not fp8.initialize_tp_communicators(plain, 512, torch.bfloat16) and not calls
    config = _parse(*OVERLAP, "--fp8-format", "hybrid", "--micro-batch-size", "2",
                    "--hidden-size", "128")
    assert fp8.initialize_tp_communicators(config, 512, torch.bfloat16)
    assert calls == [{"shape": [1024, 128], "tp_size": 2, "use_fp8": True,
                      "dtype": torch.bfloat16, "ub_cfgs": {}, "bootstrap_backend": "nccl"}]


def test_a_saved_fp8_run_generates_without_fp8(machine):
    """Chat and conversion of an FP8 run build its model in the saved --bf16, on any machine."""
    from mt_dialog.config_utils import to_dict
    from mt_dialog.training.saved_run import inference_config

    machine()
    saved = to_dict(_parse("--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "16"))
    assert saved["optim"]["fp8_format"] == "hybrid"
    fp8_probe = fp8.probe
    fp8.probe = lambda: (_ for _ in ()).throw(AssertionError("probed"))
    try:
        config = inference_config(saved)
    finally:
        fp8.probe = fp8_probe
    assert config.optim.bf16 and config.optim.fp8_format is None
    assert config.optim.fp8_amax_history_len == 1
