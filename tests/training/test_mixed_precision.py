"""Mixed precision as users run it, on CPU: ``--bf16`` trains bf16 parameters with fp32 main
parameters (megatron-core's Float16OptimizerWithFloat16Params / DistributedOptimizer), a
``--finetune --bf16`` run starts from the loaded weights (not from the random init the optimizer
copied when it was built), ``--fp16`` trains with dynamic loss scaling and resumes its scaler,
and the first warmup step trains."""

import json
import re

import pytest
import torch

from tests.training.conftest import iteration_dir, launch, parse_iters, read_checkpoint, train_args

pytestmark = pytest.mark.multiprocess

BASE_ITERS = 4


def _run(nproc, data, save, *extra, iters, lr=1e-2):
    proc = launch(nproc, train_args(data, "--save", save, *extra, iters=iters, lr=lr))
    return {"stdout": proc.stdout, "iters": parse_iters(proc.stdout), "save": str(save)}


def _model_tensors(folder, iteration):
    return {k: v for k, v in read_checkpoint(iteration_dir(folder, iteration)).items()
            if not k.startswith("optimizer.")}


@pytest.fixture(scope="module")
def bf16_base(packed_data, tmp_path_factory):
    """4 bf16 iterations in one process, saved."""
    return _run(1, packed_data, tmp_path_factory.mktemp("bf16"), "--bf16", "--lr-warmup-iters",
                "2", iters=BASE_ITERS)


def test_bf16_trains_bf16_parameters_with_fp32_main_parameters(bf16_base):
    saved = read_checkpoint(iteration_dir(bf16_base["save"], BASE_ITERS))
    model = {k: v for k, v in saved.items() if not k.startswith("optimizer.")}
    main = {k: v for k, v in saved.items() if k.startswith("optimizer.state.fp32_param.")}
    assert model and {v.dtype for v in model.values()} == {torch.bfloat16}
    assert sorted(k.removeprefix("optimizer.state.fp32_param.") for k in main) == sorted(model)
    assert {v.dtype for v in main.values()} == {torch.float32}
    for key, value in main.items():  # the bf16 parameters are the rounded main parameters
        name = key.removeprefix("optimizer.state.fp32_param.")
        assert torch.equal(value.to(torch.bfloat16), model[name]), name
    losses = [r["loss_turn"] for r in bf16_base["iters"]]
    assert len(losses) == BASE_ITERS and losses[-1] < losses[0] - 0.5, bf16_base["stdout"]
    recorded = json.loads(open(f"{bf16_base['save']}/config.json").read())
    assert recorded["config"]["optim"]["bf16"] is True
    # the dataset holds validation packs but no --eval-* flag asks for them: the log says so
    assert "note: no validation (the validation split has " in bf16_base["stdout"]


@pytest.mark.parametrize("layout", ["single", "distributed_optimizer_dp2"])
def test_finetune_bf16_starts_from_the_loaded_weights(layout, bf16_base, packed_data, tmp_path):
    """At lr 1e-9 two fine-tuning steps must leave the loaded weights as they are; megatron's
    mixed-precision optimizers copy the parameters when they are built (before the load), so
    without reloading them the first step writes the random init back."""
    extra = ["--use-distributed-optimizer"] if layout != "single" else []
    nproc = 2 if layout != "single" else 1
    run = _run(nproc, packed_data, tmp_path / "ft", "--bf16", "--load", bf16_base["save"],
               "--finetune", *extra, iters=2, lr=1e-9)
    assert "(weights only)" in run["stdout"]
    before = _model_tensors(bf16_base["save"], BASE_ITERS)
    after = _model_tensors(run["save"], 2)
    assert sorted(before) == sorted(after)
    worst = max((before[k].float() - after[k].float()).abs().max().item() for k in before)
    assert worst < 1e-6, f"fine-tuning at lr 1e-9 moved a weight by {worst}"
    # and the first fine-tuning loss is the trained model's, far below a random model's (~6.2)
    assert run["iters"][0]["loss_turn"] < bf16_base["iters"][0]["loss_turn"] - 0.5


def test_fp16_uses_dynamic_loss_scaling_and_resumes_the_scaler(packed_data, tmp_path):
    scale = ["--fp16", "--initial-loss-scale", "65536", "--loss-scale-window", "2"]
    first = _run(1, packed_data, tmp_path / "a", *scale, iters=6)
    pattern = re.compile(r"^iter\s+(\d+)/\d+ .*\| loss scale ([0-9.]+) \| skipped \(overflow\) "
                         r"(\d)$", re.M)
    lines = [(int(i), float(s), int(k)) for i, s, k in pattern.findall(first["stdout"])]
    assert [i for i, _, _ in lines] == list(range(1, 7)), first["stdout"]
    assert any(skipped for _, _, skipped in lines)  # 65536 overflows the summed fp16 gradients
    assert any(not skipped for _, _, skipped in lines)  # the lowered scale trains
    assert first["iters"][-1]["loss_turn"] < first["iters"][0]["loss_turn"]
    saved = read_checkpoint(iteration_dir(first["save"], 6))
    assert {v.dtype for k, v in saved.items() if not k.startswith("optimizer.")} == {torch.float16}
    resumed = _run(1, packed_data, tmp_path / "b", *scale, "--load", first["save"], iters=7)
    (line,) = pattern.findall(resumed["stdout"])
    assert float(line[1]) in (lines[-1][1], lines[-1][1] * 2, lines[-1][1] / 2), \
        "the resumed loss scale does not continue from the checkpoint's"


def test_the_first_warmup_step_trains(packed_data, tmp_path):
    """Iteration 1 runs at lr / warmup (megatron-core's scheduler would give it lr 0): a control
    run at a negligible lr must log a different iteration 2."""
    runs = [_run(1, packed_data, tmp_path / str(lr), "--lr-warmup-iters", "2", iters=2, lr=lr)
            for lr in (1e-2, 1e-12)]
    trained, control = (run["iters"] for run in runs)
    assert trained[0]["lr"] == pytest.approx(5e-3)
    assert trained[0]["loss_turn"] == control[0]["loss_turn"]  # same weights before step 1
    assert trained[1]["loss_turn"] < control[1]["loss_turn"] - 1e-3, (trained, control)


def test_a_full_resume_in_another_precision_is_refused_before_building(bf16_base, packed_data):
    proc = launch(1, train_args(packed_data, "--load", bf16_base["save"], iters=BASE_ITERS + 1),
                  expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        f"error: --load {bf16_base['save']}: the checkpoint was saved with --bf16 and its "
        "optimizer state has that form; resume with --bf16, or start from its weights with "
        "--finetune")
    assert "mt_dialog: TP=" not in proc.stdout
