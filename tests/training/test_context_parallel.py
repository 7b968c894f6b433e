"""Context parallelism's split of a micro-batch (``training.context_parallel``) and the exactness
of the loss over it, in one process: the conversations rendered and packed by the library
(``test_loss``'s firefly packs), flattened by ``flatten_micro_batch`` with a context-parallel
layout, then ``pretrain_dialog.make_forward_step``'s loss on each rank's part. The ranks' sums
and counts must add up to the unsplit micro-batch's for every normalization, and every real
position must be held by exactly one rank. The multi-process runs (model, attention, gradients
against the split baseline) are the equivalence suite's ``cp2`` layouts."""

import json
import math
import re

import numpy as np
import pytest
import torch

from mt_dialog.training.context_parallel import (
    global_order, padded_cu_seqlens, partition_indices, source_positions, split_micro_batches)
from mt_dialog.training.data import flatten_micro_batch
from mt_dialog.training.loss import NORMALIZATIONS
from tests.training.test_loss import P, firefly, global_batch, loss_of, references  # noqa: F401

CPU = torch.device("cpu")


def test_partition_is_the_load_balanced_chunk_layout():
    """The module docstring's picture: A (7 tokens) and B (3) at CP=2."""
    cu_padded = padded_cu_seqlens(np.array([0, 7, 10]), 4)
    assert cu_padded.tolist() == [0, 8, 12]
    assert partition_indices(cu_padded, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert partition_indices(cu_padded, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    held = np.concatenate([partition_indices(cu_padded, 2, r) for r in range(2)])
    assert np.array_equal(held[global_order(cu_padded, 2)], np.arange(12))
    assert source_positions(np.array([0, 7, 10]), cu_padded).tolist() == \
        [0, 1, 2, 3, 4, 5, 6, -1, 7, 8, 9, -1]


def rank_parts(samples, isolated, size):
    """Each rank's part; 'power' scaled by the micro-batch's totals, summed over the ranks as
    ``loop._set_power_scale`` does over data x context parallel."""
    from mt_dialog.training.loss import power_totals, set_power_scale

    whole = flatten_micro_batch(samples, isolated, CPU, turn_exponent=P)
    parts = [split_micro_batches([whole], (size, rank, 2 * size))[0] for rank in range(size)]
    totals = [power_totals([part]) for part in parts]
    set_power_scale(parts, sum(t[0] for t in totals), sum(t[1] for t in totals))
    return parts


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("isolated", [True, False])
def test_every_position_is_held_once_with_its_own_values(global_batch, size, isolated):
    samples, _, _ = global_batch
    whole = flatten_micro_batch(samples, isolated, CPU)
    parts = rank_parts(samples, isolated, size)
    lengths = {p["tokens"].shape[1] for p in parts}
    assert len(lengths) == 1  # every rank holds as many positions
    held = torch.cat([p["cp_positions"] for p in parts])
    real = held[held >= 0]
    assert sorted(real.tolist()) == list(range(whole["tokens"].shape[1]))
    for part in parts:
        where = part["cp_positions"]
        mine = where >= 0
        for key in ("tokens", "labels", "loss_mask", "loss_token_num", "position_ids"):
            assert torch.equal(part[key][0, mine], whole[key][0, where[mine]]), key
            assert not part[key][0, ~mine].any(), key  # padding: zeros, never trained
        params = part["packed_seq_params"]
        assert torch.equal(params.cu_seqlens_q, whole["packed_seq_params"].cu_seqlens_q)
        padded = params.cu_seqlens_q_padded
        assert bool(((padded[1:] - padded[:-1]) % (2 * size) == 0).all())
        assert params.max_seqlen_q == int((padded[1:] - padded[:-1]).max())
        assert part["num_tokens"] == whole["num_tokens"]  # counts stay the micro-batch's


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_rank_sums_add_up_to_the_whole_micro_batch(global_batch, normalization, size):
    """A turn cut between ranks counts once in total: the counts are integers on every rank
    and add up to the micro-batch's turns (tokens, conversations); the loss sums and each
    position's gradient are the unsplit ones."""
    samples, turns, values = global_batch
    want_sum, want_count = references(values, turns)[normalization]
    whole_grad = values.clone().requires_grad_(True)
    whole_sum, whole_count, whole_report = loss_of(
        flatten_micro_batch(samples, True, CPU, turn_exponent=P), whole_grad, normalization)
    (whole_sum / whole_count).backward()
    total, count, grad = 0.0, 0, torch.zeros(values.numel())
    report = {}
    for part in rank_parts(samples, True, size):
        where = part["cp_positions"]
        local = torch.where(where >= 0, values[0, where.clamp(min=0)], torch.tensor(7.0))
        local = local[None, :].clone().requires_grad_(True)  # padding gets a loss: weight 0
        loss_sum, n, rep = loss_of(part, local, normalization)
        assert n.dtype == torch.int32 and torch.isfinite(loss_sum)
        (loss_sum / want_count).backward()
        total, count = total + float(loss_sum.detach()), count + int(n)
        grad.index_add_(0, where[where >= 0], local.grad[0, where >= 0])
        assert not local.grad[0, where < 0].any()
        for name, pair in rep.items():
            report[name] = report.get(name, 0) + pair
    assert count == want_count == int(whole_count)
    assert total == pytest.approx(float(want_sum), rel=1e-6)
    assert torch.allclose(grad, whole_grad.grad.view(-1), rtol=1e-6, atol=1e-9)
    for name, pair in whole_report.items():
        assert torch.allclose(report[name], pair, rtol=1e-6), name


def test_a_step_s_micro_batches_share_one_length(global_batch):
    """Pipeline stages exchange one activation shape per step: every micro-batch of a step is
    padded to the longest (its last segment takes the extra padding, a multiple of 2 x CP)."""
    samples, _, _ = global_batch
    batches = [flatten_micro_batch([s], True, CPU) for s in samples]
    held = [[] for _ in batches]
    for rank in range(2):
        parts = split_micro_batches(batches, (2, rank, 4))
        assert len({p["tokens"].shape[1] for p in parts}) == 1
        for number, part in enumerate(parts):
            held[number] += part["cp_positions"][part["cp_positions"] >= 0].tolist()
            padded = part["packed_seq_params"].cu_seqlens_q_padded
            assert int(padded[-1]) == 2 * part["tokens"].shape[1]
            assert part["tokens"].shape[1] % 32 == 0  # FP8 GEMMs: 16s, MXFP8: 32s
            assert bool(((padded[1:] - padded[:-1]) % 4 == 0).all())
    assert [sorted(h) for h in held] == [list(range(b["tokens"].shape[1])) for b in batches]
    assert len({b["packed_seq_params"].cu_seqlens_q.numel() for b in batches}) > 1  # unalike


def test_a_rank_without_loss_tokens_gives_zero_not_nan(global_batch):
    """Megatron-LM's known context-parallel failure (a 0/0 mean on a rank whose tokens carry no
    loss): here such a rank returns (0.0, 0) and the others carry the whole count."""
    samples, turns, values = global_batch
    sample = dict(samples[1])
    mask = np.zeros_like(sample["loss_mask"])
    ltn = np.zeros_like(sample["loss_token_num"])
    last = int(np.nonzero(sample["loss_mask"])[0][-1])
    mask[last], ltn[last] = 1, 1  # one trained token, the pack's last reply's end of turn
    sample.update(loss_mask=mask, loss_token_num=ltn)
    parts = rank_parts([sample], True, 4)
    counts, sums = [], []
    for part in parts:
        losses = torch.rand(part["tokens"].shape)
        for normalization in NORMALIZATIONS:
            loss_sum, n, report = loss_of(part, losses, normalization)
            assert torch.isfinite(loss_sum) and all(torch.isfinite(v).all()
                                                    for v in report.values())
            if normalization == "turn":
                counts.append(int(n))
                sums.append(float(loss_sum))
    assert sorted(counts) == [0, 0, 0, 1]
    assert [s for s, n in zip(sums, counts) if n == 0] == [0.0, 0.0, 0.0]


# --------------------------------------------- through pretrain_dialog.py (torchrun), in bf16

K = 3
CP2 = ["--context-parallel-size", "2"]
BF16 = ["--bf16", "--lr-decay-iters", str(2 * K)]


def _train(nproc, prefix, save, *extra, iters):
    from tests.training.conftest import launch, parse_iters, train_args

    proc = launch(nproc, train_args(prefix, "--save", save, *BF16, *extra, iters=iters))
    return {"stdout": proc.stdout, "iters": parse_iters(proc.stdout), "save": str(save)}


@pytest.fixture(scope="module")
def cp_runs(packed_data, tmp_path_factory):
    """2k iterations in one process (CP=1); k at CP=2 (2 processes) resumed at CP=1 to 2k; k at
    CP=1 resumed at CP=2 to 2k (with validation); all bf16 as users train."""
    folder = tmp_path_factory.mktemp("cp")
    runs = {"straight": _train(1, packed_data, folder / "straight", iters=2 * K),
            "cp2_half": _train(2, packed_data, folder / "cp2_half", *CP2, iters=K),
            "cp1_half": _train(1, packed_data, folder / "cp1_half", iters=K)}
    runs["cp2_to_cp1"] = _train(1, packed_data, folder / "cp2_to_cp1", "--load",
                                runs["cp2_half"]["save"], iters=2 * K)
    runs["cp1_to_cp2"] = _train(2, packed_data, folder / "cp1_to_cp2", *CP2, "--load",
                                runs["cp1_half"]["save"], "--eval-interval", str(2 * K),
                                iters=2 * K)
    return runs


def _close(got, want, what):
    assert [r["iter"] for r in got] == [r["iter"] for r in want], what
    for g, w in zip(got, want):
        assert g["lr"] == w["lr"], (what, g, w)
        for key in ("loss_turn", "loss_token"):
            # bf16: CP=2 attends in another order than one process (all-gathered keys)
            assert g[key] == pytest.approx(w[key], rel=1e-2), (what, key, g, w)


@pytest.mark.multiprocess
def test_context_parallel_trains_like_one_process_and_resumes_both_ways(cp_runs):
    straight = cp_runs["straight"]["iters"]
    assert "mt_dialog: TP=1 PP=1 DP=1" in cp_runs["cp2_half"]["stdout"]
    assert "CP=2" in cp_runs["cp2_half"]["stdout"], cp_runs["cp2_half"]["stdout"][:2000]
    losses = [r["loss_turn"] for r in straight]
    assert losses[-1] < losses[0] - 1.0, losses  # it learns: the comparisons mean something
    _close(cp_runs["cp2_half"]["iters"], straight[:K], "CP=2 vs one process")
    _close(cp_runs["cp2_to_cp1"]["iters"], straight[K:], "CP=2 checkpoint resumed at CP=1")
    _close(cp_runs["cp1_to_cp2"]["iters"], straight[K:], "CP=1 checkpoint resumed at CP=2")
    for name in ("cp2_to_cp1", "cp1_to_cp2"):
        source = cp_runs[name.split("_to_")[0] + "_half"]["save"]
        assert f"loaded {source} at iteration {K}\n" in cp_runs[name]["stdout"]


@pytest.mark.multiprocess
def test_context_parallel_validation_counts_every_turn(cp_runs, packed_data):
    """Validation at CP=2 (per-token losses and greedy hits gathered back in place) counts
    the validation split's turns once and reports finite losses."""
    from tests.training.conftest import parse_validation

    (line,) = parse_validation(cp_runs["cp1_to_cp2"]["stdout"])
    assert line["iter"] == 2 * K and math.isfinite(line["loss_turn"]), line
    assert "turns" in cp_runs["cp1_to_cp2"]["stdout"]


@pytest.mark.multiprocess
def test_a_context_parallel_checkpoint_chats_and_exports(cp_runs, tmp_path):
    """A checkpoint trained at CP=2 loads in one process: tools/chat.py replies, and
    tools/convert_checkpoint.py mcore-to-hf writes a model transformers loads."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    save = cp_runs["cp2_half"]["save"]
    chat = subprocess.run([sys.executable, "tools/chat.py", "--load", save, "--message", "Hi",
                           "--max-new-tokens", "4", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert len(json.loads(chat.stdout.strip().splitlines()[-1])["token_ids"]) >= 1
    out = tmp_path / "hf"
    export = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "mcore-to-hf",
                             "--load-dir", save, "--save-dir", str(out), "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2


@pytest.fixture(scope="module")
def composed_runs(packed_data, cp_runs, tmp_path_factory):
    """LoRA (--finetune from the CP=1 checkpoint) and a Mixture of Experts (4 experts, top 2,
    no load-balancing loss: CP's padding tokens are routed too, so that loss sees a few more
    padding tokens than one process does), each for k iterations in one process and at CP=2."""
    folder = tmp_path_factory.mktemp("cp_composed")
    flags = {"lora": ["--load", cp_runs["cp1_half"]["save"], "--finetune", "--lora-rank", "4"],
             "moe": ["--num-experts", "4", "--moe-router-topk", "2",
                     "--moe-aux-loss-coeff", "0"]}
    return {name: (_train(1, packed_data, folder / f"{name}_1", *extra, iters=K),
                   _train(2, packed_data, folder / f"{name}_cp2", *CP2, *extra, iters=K))
            for name, extra in flags.items()}


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["lora", "moe"])
def test_context_parallel_composes_with_lora_and_experts(composed_runs, name):
    one, split = composed_runs[name]
    assert len(one["iters"]) == K, one["stdout"][-2000:]
    _close(split["iters"], one["iters"], f"{name}: CP=2 vs one process")


@pytest.mark.parametrize("flags, message", [
    (["--cp-comm-type", "all_gather"], "takes no packed (THD) sequences; use --cp-comm-type p2p"),
    (["--cp-comm-type", "a2a+p2p"], "takes no packed (THD) sequences"),
    (["--window-size", "4", "0"], "only with all-to-all; use --cp-comm-type a2a"),
    (["--multi-latent-attention", "--cp-comm-type", "a2a"], "only with p2p; use --cp-comm-type p2p"),
])
def test_comm_types_transformer_engine_cannot_run_are_refused(flags, message):
    """Refused on every machine, naming the type that works, before anything is built."""
    import pretrain_dialog

    argv = ["--data-path", "unused", "--train-iters", "1", "--num-layers", "2", "--hidden-size",
            "64", "--num-attention-heads", "4", *CP2, *flags]
    with pytest.raises(ValueError, match=re.escape(message)):
        pretrain_dialog.parse_config(argv)
    pretrain_dialog.parse_config(["--data-path", "unused", "--train-iters", "1", *CP2])  # p2p: fine


def test_a2a_needs_heads_and_groups_divisible_by_cp():
    import pretrain_dialog

    argv = ["--data-path", "unused", "--train-iters", "1", "--num-layers", "2", "--hidden-size",
            "64", "--num-attention-heads", "4", *CP2, "--cp-comm-type", "a2a"]
    with pytest.raises(ValueError, match="4 heads and 1 query groups over 2 ranks"):
        pretrain_dialog.parse_config([*argv, "--num-query-groups", "1"])
    pretrain_dialog.parse_config([*argv, "--num-query-groups", "2"])
