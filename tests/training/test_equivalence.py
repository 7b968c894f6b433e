"""Turn-normalized training on megatron-core == the "split into n samples" baseline.

Each parallel layout is checked by ``equivalence_worker.py`` under torchrun (the library's model
builder, micro-batching, ``pretrain_dialog.make_forward_step`` and ``loop.train_step`` with DDP and
``finalize_model_grads``), which checks 1 and 3 micro-batches per step against plain-PyTorch
references computed from the gathered full weights. The layouts of one world size share one
launch, once per session; the tests below read each layout's JSON.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.training.launch import run_torchrun

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "equivalence_worker.py")
TOL = 1e-5
MICRO = ("1", "3")
VPP_MICRO = 6  # micro-batches of the interleaved check: more than PP (= 2), a multiple of it

# name -> (processes, worker args, expected (tp, pp, dp[, cp]))
LAYOUTS = {
    "single": (1, [], (1, 1, 1)),
    "tp2": (2, ["--tp", "2"], (2, 1, 1)),
    # tied embeddings: the copy on the last stage too; then the interleaved schedule (VPP=2)
    "pp2": (2, ["--pp", "2", "--vpp-micro", str(VPP_MICRO)], (1, 2, 1)),
    "dp2": (2, [], (1, 1, 2)),
    "tp2_dp2": (4, ["--tp", "2", "--untie"], (2, 1, 2)),
    # Mixture of Experts, the experts split over the two data-parallel ranks (alltoall dispatch)
    "moe_ep2": (2, ["--moe", "alltoall", "--ep", "2"], (1, 1, 2)),
    # DeepSeek-V3-style layout: multi-latent attention; a dense first layer, then a MoE layer
    # with a shared expert and sigmoid scores with an expert bias, group-limited, scaled
    # (allgather dispatch)
    "moe_routing_ep2": (2, ["--moe", "allgather", "--ep", "2", "--moe-routing"], (1, 1, 2)),
    # context parallelism: every conversation split in 4 chunks over 2 ranks (load-balanced),
    # alone, with tensor parallelism, and with pipeline parallelism (one length per step)
    "cp2": (2, ["--cp", "2"], (1, 1, 1, 2)),
    "tp2_cp2": (4, ["--tp", "2", "--cp", "2", "--untie"], (2, 1, 1, 2)),
    "pp2_cp2": (4, ["--pp", "2", "--cp", "2"], (1, 2, 1, 2)),
}

_RESULTS = {}


def _result(name, tmp_path_factory):
    """The worker's JSON for layout ``name``. Every layout of the same number of processes runs
    in one launch (``--then``: 3 launches, not 10), once per session; a failure is re-raised for
    each of them, not re-run."""
    if name not in _RESULTS:
        nproc = LAYOUTS[name][0]
        group = [n for n, layout in LAYOUTS.items() if layout[0] == nproc]
        paths = {n: tmp_path_factory.mktemp(f"equivalence_{n}") / "result.json" for n in group}
        argv = []
        for n in group:
            argv += [*(["--then"] if argv else []), *LAYOUTS[n][1], "--micro", *MICRO,
                     "--json", str(paths[n])]
        try:
            run_torchrun(WORKER, nproc, argv, timeout=300 * len(group))
            for n in group:
                with open(paths[n]) as handle:
                    _RESULTS[n] = json.load(handle)
        except Exception as exc:  # noqa: BLE001
            _RESULTS.update({n: exc for n in group})
    if isinstance(_RESULTS[name], Exception):
        raise _RESULTS[name]
    return _RESULTS[name]


layouts = pytest.mark.parametrize("name", list(LAYOUTS))
pytestmark = pytest.mark.multiprocess


@layouts
def test_layout_and_data(name, tmp_path_factory):
    res = _result(name, tmp_path_factory)
    expected = LAYOUTS[name][2]
    assert (res["tp"], res["pp"], res["dp"], res["cp"]) == (*expected[:3], (*expected, 1)[3])
    for m in MICRO:
        step = res["steps"][m]
        assert step["packs"] == int(m) * res["dp"] * res["micro_batch_size"]
        # the data has the spread the check relies on: short and long replies, padding
        assert min(step["reply_lengths"]) <= 2 and max(step["reply_lengths"]) >= 10, step
        assert step["padding_tokens"] > 0
        # loop.train_step read every pack of the global batch exactly once over the DP ranks
        read = [i for micro in step["packs_read_by_dp_rank"].values() for mb in micro for i in mb]
        assert sorted(read) == list(range(step["packs"])), step["packs_read_by_dp_rank"]
        assert len(step["packs_read_by_dp_rank"]) == res["dp"]


@layouts
def test_turn_gradient_equals_split_baseline(name, tmp_path_factory):
    res = _result(name, tmp_path_factory)
    for m in MICRO:
        step = res["steps"][m]
        assert step["turn_max_rel_err"] <= TOL, (m, step["turn_worst_param"], step)
        if "turn_tied_copy_rel_err" in step:
            assert step["turn_tied_copy_rel_err"] <= TOL, (m, step)
        # the logged loss per turn is the baseline loss; every turn counted
        assert step["turn_logged_loss_per_turn"] == pytest.approx(step["turn_loss_ref"], rel=TOL)
        assert step["turn_logged_turns"] == step["turns"]


@layouts
def test_token_normalization_differs_from_turn(name, tmp_path_factory):
    res = _result(name, tmp_path_factory)
    for m in MICRO:
        step = res["steps"][m]
        assert step["token_max_rel_err"] <= TOL, (m, step["token_worst_param"], step)
        if "token_tied_copy_rel_err" in step:
            assert step["token_tied_copy_rel_err"] <= TOL, (m, step)
        assert step["token_logged_loss_per_token"] == pytest.approx(step["token_loss_ref"], rel=TOL)
        assert step["token_vs_turn_baseline_rel_err"] > 1e-2, (m, step)


@layouts
def test_power_normalization_equals_its_reference(name, tmp_path_factory):
    """--loss-normalization power (p = 0.5: sum l / sqrt(L) over sum sqrt(L)) in every case of
    the layout (1 and 3 micro-batches, rendered agent conversations, the text + chat blend, CP's
    late replies): the gradient and the logged loss are its plain-PyTorch reference's."""
    res = _result(name, tmp_path_factory)
    for case, step in res["steps"].items():
        assert step["power_max_rel_err"] <= TOL, (case, step["power_worst_param"], step)
        if "power_tied_copy_rel_err" in step:
            assert step["power_tied_copy_rel_err"] <= TOL, (case, step)
        assert step["power_logged_power"] == pytest.approx(step["power_loss_ref"], rel=TOL)
        assert step["power_logged_turns"] == step["turns"]


@layouts
def test_packed_conversations_are_isolated(name, tmp_path_factory):
    iso = _result(name, tmp_path_factory)["isolation"]
    assert iso["conversations"] >= 4
    assert iso["max_abs_pack_vs_alone"] <= 1e-5, iso
    assert iso["max_abs_alone_vs_reference"] <= 1e-5, iso
    # control: one causal mask over the pack lets conversations see each other
    assert iso["max_abs_causal_pack_vs_alone"] > 1e-3, iso


@layouts
def test_untrained_replies_and_tool_messages_train_nothing(name, tmp_path_factory):
    """Packs of rendered agent conversations holding replies with weight 0 and tool calls and
    results: the gradient is the split baseline's over the trained replies only (each baseline
    sample rendered with its one reply trained), and only trained replies count as turns."""
    step = _result(name, tmp_path_factory)["steps"]["context"]
    assert step["untrained_replies"] >= 3 and step["tool_messages"] >= 3, step
    assert step["turns"] == step["split_samples"], step
    assert step["turn_max_rel_err"] <= TOL, (step["turn_worst_param"], step)
    assert step["turn_logged_turns"] == step["turns"]
    assert step["turn_logged_loss_per_turn"] == pytest.approx(step["turn_loss_ref"], rel=TOL)
    assert step["token_max_rel_err"] <= TOL, (step["token_worst_param"], step)


@layouts
def test_validation_metrics_equal_the_reference(name, tmp_path_factory):
    """Loss per turn, greedy accuracy and exact turns by reply length and turn index, from a
    real validation (``loop.evaluate``, vocabulary-parallel argmax at TP=2, last stage at PP=2,
    sums over DP=2), equal the plain-PyTorch model's reply by reply; every turn falls in one
    length group and one index group."""
    val = _result(name, tmp_path_factory)["validation"]
    assert val["logged_turns"] == val["turns"] >= 10
    for metric, want in val["reference"].items():
        got = val["metrics"][metric]
        if want is None:
            assert got is None, metric
        else:
            assert got == pytest.approx(want, rel=TOL, abs=1e-9), (metric, got, want)
    groups = val["group_turns"]
    assert sum(v for k, v in groups.items() if k.startswith("reply length")) == val["turns"]
    assert sum(v for k, v in groups.items() if k.startswith("turn ")) == val["turns"]
    reference = val["reference"]
    assert 0.2 < reference["accuracy"] < 0.9 and 0 < reference["exact turns"] < 1, reference


@layouts
def test_text_and_chat_blend(name, tmp_path_factory):
    """A blend of conversations and plain-text document pieces (dataset "text": every token
    trained but each piece's first), mixed in every micro-batch: with 'token' normalization the
    gradient is the plain token mean over the global batch's trained tokens of both datasets;
    with 'turn' every piece and every reply weigh the same; each dataset's logged loss per
    token and per turn is its own reference, summed over micro-batches and DP ranks."""
    step = _result(name, tmp_path_factory)["steps"]["blend"]
    assert step["text_pieces"] >= 4 and step["cut_pieces"] >= 1, step
    assert step["token_max_rel_err"] <= TOL, (step["token_worst_param"], step)
    assert step["token_logged_loss_per_token"] == pytest.approx(step["token_loss_ref"], rel=TOL)
    assert step["turn_max_rel_err"] <= TOL, (step["turn_worst_param"], step)
    assert step["turn_logged_turns"] == step["turns"]
    reference = step["dataset_reference"]
    assert len(reference) == 4
    for norm in ("token", "turn"):
        logged = step[f"{norm}_logged_datasets"]
        for key, want in reference.items():
            assert logged[key] == pytest.approx(want, rel=TOL), (norm, key)
    assert logged["dataset text: turns"] == step["text_pieces"]


@pytest.mark.parametrize("name", [n for n, (_, args, _) in LAYOUTS.items() if "--cp" in args])
def test_context_parallel_rank_without_loss_tokens(name, tmp_path_factory):
    """Every trained token of the step on context-parallel rank 0 (replies in the last quarter
    of each conversation): the other rank returns (0, 0), no NaN, and the step is still the
    split baseline's; every turn counted once."""
    step = _result(name, tmp_path_factory)["steps"]["late_replies"]
    by_rank = step["loss_tokens_by_rank"]
    assert 0 in by_rank and max(by_rank) > 0, by_rank
    for norm in ("turn", "token"):
        assert step[f"{norm}_max_rel_err"] <= TOL, (norm, step[f"{norm}_worst_param"], step)
        assert step[f"{norm}_logged_turns"] == step["turns"]
    assert step["turn_logged_loss_per_turn"] == pytest.approx(step["turn_loss_ref"], rel=TOL)


def test_virtual_pipeline_gradient_equals_split_baseline(tmp_path_factory):
    """The interleaved schedule at PP=2 (2 chunks of 1 layer per stage) over more micro-batches
    than stages: 1F1B's steady state exchanges an activation and a gradient with the one other
    stage in each call (megatron-core's batched p2p swaps them there; ``batch_p2p_comm`` off)."""
    vpp = _result("pp2", tmp_path_factory)["virtual_pipeline"]
    assert (vpp["chunks"], vpp["micro"], vpp["layers"]) == (2, VPP_MICRO, [0, 1, 2, 3]), vpp
    assert vpp["turn_max_rel_err"] <= TOL, (vpp["turn_worst_param"], vpp)
    assert vpp["turn_tied_copy_rel_err"] <= TOL, vpp
    assert vpp["turn_logged_loss_per_turn"] == pytest.approx(vpp["turn_loss_ref"], rel=TOL)
    assert vpp["turn_logged_turns"] == vpp["turns"]
    assert vpp["batch_p2p_comm"] is False


def test_moe_layout_splits_the_experts(tmp_path_factory):
    res = _result("moe_ep2", tmp_path_factory)
    assert res["ep"] == 2 and res["local_experts"] == 2 * 2, res  # 2 of 4 experts x 2 layers


def test_moe_aux_loss_scale_does_not_depend_on_the_split(tmp_path_factory):
    """The load-balancing loss's part of the gradient on one global batch of identical packs is
    the same for turn and token normalization, micro-batch sizes 1 and 2, 1 to 4 micro-batches
    and twice the packs (``training.moe``: coeff x the token-weighted mean of the micro-batches'
    Switch losses); megatron-core's own scale under per-token loss (the control) is not."""
    aux = _result("moe_ep2", tmp_path_factory)["aux_loss"]
    assert any(".mlp.router.weight" in name for name in aux["params_with_aux_grad"]), aux
    for split, diff in aux["rel_diff_to_first"].items():
        assert diff <= 1e-4, (split, aux)
    assert aux["control_megatron_scale_turn_vs_token"] > 0.1, aux


def test_moe_other_dispatcher_equals_split_baseline(tmp_path_factory):
    """The layout's model built again with megatron-core's allgather dispatcher (the default;
    the layout runs alltoall), same weights and packs: the same turn-normalized gradient."""
    other = _result("moe_ep2", tmp_path_factory)["other_dispatcher"]
    assert other["dispatcher"] == "allgather", other
    assert other["classes"] == ["MoEAllGatherTokenDispatcher"], other
    assert other["turn_max_rel_err"] <= TOL, other


def test_moe_routing_layout_holds_what_it_checks(tmp_path_factory):
    """The --moe-routing layout: multi-latent attention in both layers, layer 0 dense, layer 1
    MoE (2 of its 4 experts per EP rank); its expert bias, a buffer megatron-core never gives the
    optimizer, stays as set (update rate 0) and changes the loss, as does the shared expert
    (controls: the gradient checks above saw both)."""
    res = _result("moe_routing_ep2", tmp_path_factory)
    assert res["ep"] == 2 and res["local_experts"] == 2, res
    routing = res["routing"]
    assert routing["layers"] == ["MLP", "MoELayer"], routing
    assert routing["attention"] == ["MLASelfAttention"] * 2, routing  # reference._mla
    assert routing["expert_bias_keys"] == ["decoder.layers.1.mlp.router.expert_bias"], routing
    assert routing["bias_unchanged"] is True, routing
    assert routing["loss_rel_diff_without_bias"] > 1e-4, routing
    assert routing["loss_rel_diff_without_shared"] > 1e-3, routing


def test_moe_routing_aux_loss_scale_does_not_depend_on_the_split(tmp_path_factory):
    """The aux-loss scale of ``training.moe`` with sigmoid scores and an expert bias (megatron's
    Switch loss on the sigmoid scores normalized over all experts): the same for every split."""
    aux = _result("moe_routing_ep2", tmp_path_factory)["aux_loss"]
    assert any(".mlp.router.weight" in name for name in aux["params_with_aux_grad"]), aux
    for split, diff in aux["rel_diff_to_first"].items():
        assert diff <= 1e-4, (split, aux)
    assert aux["control_megatron_scale_turn_vs_token"] > 0.1, aux
