"""torchrun worker: one training step of the LIBRARY code path vs plain-PyTorch references.

    torchrun --nproc_per_node N tests/training/equivalence_worker.py --tp T --pp P \
        [--untie] [--micro 1 3] [--vpp-micro 4 | --moe alltoall --ep E] --json OUT.json \
        [--then --tp T2 ... --json OUT2.json ...]                         (N = T * P * DP)

Layouts after ``--then`` run in the same launch (same N), one after the other.

The model comes from ``mt_dialog.training.model`` (``build_model_chunks`` + ``wrap_ddp``, wired like
``loop._setup``: DDP ``no_sync`` and megatron's ``finalize_model_grads``); micro-batches from
``mt_dialog.data.dataset.build_sample`` + ``mt_dialog.training.data.flatten_micro_batch``; the step
is ``mt_dialog.training.loop.train_step`` itself (``step_sample_indices`` picks each DP rank's packs,
megatron's ``get_forward_backward_func()`` runs ``pretrain_dialog.make_forward_step(norm)``). Its
optimizer is a recorder whose ``step()`` gathers the full reduced gradients instead of updating.

For each number of micro-batches per step (``--micro``), on the same packs and weights:
  turn   vs the "split into n samples" baseline (each sample = history + one reply, run alone,
         mean over the reply's tokens; step = mean over all samples of the global batch)
  token  vs its own token-mean reference, and vs the turn baseline (must differ)
  power  (--loss-normalization power, p = 0.5) vs its own reference
  the logged 'loss per turn' / 'loss per token' vs the reference losses
and once more ("context", 3 micro-batches) on packs of agent conversations rendered by the
library's ``render_conversation`` (replies with weight 0, tool calls and results as context):
the baseline's samples are rendered with only their one reply trained, so untrained replies and
tool results must contribute nothing and count as no turn; and ("blend", 3 micro-batches) on a
blend of a conversation dataset and a plain-text dataset (packs of document pieces, every token
trained but each piece's first), each micro-batch mixing them: 'token' must give the plain token
mean over the global batch, 'turn' every piece and every reply equal weight, and each dataset's
logged loss its own reference.
Isolation: per-token losses of each conversation inside packed micro-batches vs the same
conversation run alone through the same model (no packed params), vs the reference; and, as a
control, with ``--packed-attention causal`` packing (must differ).
With ``--vpp-micro M`` (PP=2) the groups are then rebuilt for the interleaved schedule (2 model
chunks per stage, 4 layers) and one step of M micro-batches is compared with the split baseline.
With ``--moe`` the model is a Mixture of Experts (4 experts, top 2, ``--ep`` expert-parallel
ranks; the reference routes each token in plain PyTorch, ``reference.reference_moe``) trained
without the load-balancing loss, and ``check_aux_loss`` measures that loss's part of the gradient;
``check_dispatcher`` builds it again with the other token dispatcher (allgather <-> alltoall).
Rank 0 writes everything to ``--json``; the pass/fail decisions are the test's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import types
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pretrain_dialog  # noqa: E402
from mt_dialog.data.dataset import build_sample  # noqa: E402
from mt_dialog.training import context_parallel, distributed, loop  # noqa: E402
from mt_dialog.training.config import (  # noqa: E402
    DataConfig, DialogTrainingConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig,
    validate_world,
)
from mt_dialog.training.data import DataInfo, flatten_micro_batch  # noqa: E402
from mt_dialog.training.model import build_model_chunks, transformer_config, wrap_ddp  # noqa: E402
from tests.training import reference as ref  # noqa: E402

SEQ = 64  # tokens per pack
MBS = 2  # packs per micro-batch: flattened to one [1, 128] sequence
SEED = 1234
AUX_COEFF = 0.1  # --moe: the load-balancing loss weight of check_aux_loss
EDGES = [2, 4, 8]  # reply-length buckets of the validation check: 1-2, 3-4, 5-8, 9+
BLEND = ["chat", "text"]
NORMS = ("turn", "token", "power")  # each case's steps; 'power' at p = reference.POWER_P
# --moe-routing: ModelConfig fields of the DeepSeek-V3-style layout (with 4 experts, top 2)
ROUTING = dict(moe_layer_freq=[0, 1], moe_shared_expert_intermediate_size=32,
               moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
               moe_router_num_groups=2, moe_router_group_topk=1,
               moe_router_topk_scaling_factor=2.0,
               # the Switch loss of sigmoid scores (normalized over all experts) gives smaller
               # gradients than softmax's: a larger weight keeps check_aux_loss's difference of
               # two gradients (with and without it) well above fp32 rounding
               moe_aux_loss_coeff=1.0,
               # DeepSeek-V3's attention: multi-latent attention (Lite: no query down-projection)
               num_query_groups=4, multi_latent_attention=True, qk_layernorm=True,
               kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16)  # the datasets of the "blend" case, as loop names them (blend_names)


def single_packs(make):
    """The packs of a one-dataset case: (packs, no dataset numbers)."""
    return lambda seed, n_packs: (ref.make_packs(seed=seed, n_packs=n_packs, seq=SEQ,
                                                 make=make), None)


def late_reply_packs(seed, n_packs):
    """Packs of 4 conversations of 16 tokens each replying in its last 2 tokens (trained label
    positions 13 and 14 of 16): at CP=2 every loss position lies in chunk 3 of 4, context-
    parallel rank 0's, and rank 1 holds no loss token at all (Megatron-LM's 0/0 case)."""
    rng = __import__("random").Random(seed)

    def late(_rng, _max_len):
        toks = [ref.BOS] + ref._content(rng, 13)
        return ref.Conversation(toks, [ref._reply(rng, toks, 2)])

    return [ref.Pack([late(rng, SEQ) for _ in range(SEQ // 16)]) for _ in range(n_packs)], None


def blend_packs(seed, n_packs):
    """(packs, their datasets): alternately a pack of conversations (dataset 0, "chat") and a
    pack of text document pieces (dataset 1, "text"), so that each micro-batch of 2 mixes them."""
    chat = ref.make_packs(seed, n_packs - n_packs // 2, SEQ)
    text = ref.make_packs(seed + 1, n_packs // 2, SEQ, make=ref.text_piece,
                          fill=lambda rng, length: ref.text_piece(rng, SEQ, length))
    datasets = [i % 2 for i in range(n_packs)]
    return [(text if d else chat).pop(0) for d in datasets], datasets


def dataset_reference(Wref, packs, datasets, mcfg, tied) -> dict:
    """Each blend dataset's loss per token and per turn in plain PyTorch (each conversation or
    piece run alone), under the names ``loss.dataset_report_names`` gives."""
    out = {}
    for number, name in enumerate(BLEND):
        total, count, turns = 0.0, 0, []
        for pack in (p for p, d in zip(packs, datasets) if d == number):
            for conv in pack.conversations:
                ce = ref.reference_token_losses(Wref, conv, mcfg, tied).double()
                for a, e in conv.replies:
                    total, count = total + float(ce[a - 1:e - 1].sum()), count + e - a
                    turns.append(float(ce[a - 1:e - 1].mean()))
        out[f"dataset {name}: loss per token"] = total / count
        out[f"dataset {name}: loss per turn"] = sum(turns) / len(turns)
    return out


def _routers(model):
    gpt = model.module if hasattr(model, "module") else model
    for layer in gpt.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is not None and router.expert_bias is not None:
            yield layer.layer_number - 1, router


def set_expert_bias(model) -> None:
    """A random expert bias (the same on every rank), large enough to change the routing."""
    for number, router in _routers(model):
        generator = torch.Generator().manual_seed(SEED + number)
        with torch.no_grad():
            router.expert_bias.copy_(torch.randn(router.expert_bias.shape, generator=generator)
                                     * 0.3)


def expert_biases(model) -> dict:
    """``decoder.layers.<i>.mlp.router.expert_bias`` (a buffer: not in ``gather_full``)."""
    return {f"decoder.layers.{number}.mlp.router.expert_bias": router.expert_bias.detach().cpu()
            for number, router in _routers(model)}


class GradRecorder:
    """Stands in for the megatron optimizer in ``loop.train_step``: ``step()`` gathers the reduced
    full gradients of every model chunk (a collective on every rank, as the real step is) and
    updates nothing."""

    def __init__(self, model):
        self.model = model
        self.param_groups = [{"lr": 0.0}]
        self.grads = None
        self.steps = 0

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        self.grads = ref.gather_chunks(self.model, "grad")
        self.steps += 1
        norm = sum(float(g.double().pow(2).sum()) for g in self.grads.values()) ** 0.5
        return True, norm, 0


def main():
    """Every layout of the command line in turn, in this one launch (layouts separated by
    ``--then``, each with its own flags and ``--json``): megatron-core's groups are rebuilt
    between them, as ``check_virtual_pipeline`` rebuilds them, and every layout seeds anew."""
    from megatron.core import parallel_state as ps

    layouts = [[]]
    for arg in sys.argv[1:]:
        layouts.append([]) if arg == "--then" else layouts[-1].append(arg)
    for argv in layouts:
        run_layout(build_parser().parse_args(argv))
        ps.destroy_model_parallel()
    distributed.destroy()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1, help="context-parallel size")
    ap.add_argument("--untie", action="store_true", help="untied embedding and output layer")
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 3],
                    help="micro-batches per step to check")
    ap.add_argument("--vpp-micro", type=int, default=0,
                    help="with --pp 2: then check the interleaved schedule (2 chunks per stage) "
                         "at this many micro-batches per step")
    ap.add_argument("--moe", choices=("allgather", "alltoall"),
                    help="a Mixture-of-Experts model (4 experts, top 2) with this token "
                    "dispatcher; its load-balancing loss is checked too (check_aux_loss)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size (with --moe)")
    ap.add_argument("--moe-routing", action="store_true",
                    help="with --moe: DeepSeek-V3-style layout (ROUTING: multi-latent attention, "
                    "a dense first layer, a shared expert, sigmoid scores with a random expert "
                    "bias, 2 groups of 2, scaling factor)")
    ap.add_argument("--json", required=True)
    return ap


def run_layout(args: argparse.Namespace) -> None:
    """One layout's checks; rank 0 writes them to ``args.json``. Collective."""
    t0 = time.time()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    moe = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
               moe_token_dispatcher_type=args.moe, moe_aux_loss_coeff=AUX_COEFF) if args.moe else {}
    if args.moe_routing:
        moe.update(ROUTING)
    model = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, init_method_std=0.08, make_vocab_size_divisible_by=4,
                 untie_embeddings_and_output_weights=args.untie, transformer_impl="local")
    config = DialogTrainingConfig(
        ModelConfig(**{**model, **moe}),
        ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                       expert_model_parallel_size=args.ep, context_parallel_size=args.cp),
        DataConfig(data_path=["unused"], seq_length=SEQ, micro_batch_size=MBS),
        OptimConfig(), TrainConfig(train_iters=1, seed=SEED, eval_reply_length_buckets=EDGES))
    dp = validate_world(config, world)
    distributed.initialize(args.tp, args.pp, None, SEED, expert_parallel=args.ep,
                           context_parallel=args.cp)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    rank = dist.get_rank()
    dp_rank = ps.get_data_parallel_rank()
    is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
    tied = not args.untie
    mcfg = config.model

    # the model, as loop._setup builds and wires it
    tconfig = transformer_config(config)
    tconfig.moe_aux_loss_coeff = 0.0  # the dialogue loss alone, but for check_aux_loss
    chunks = build_model_chunks(config, tconfig, ref.VOCAB, SEQ)
    model = wrap_ddp(chunks, tconfig, config)
    tconfig.no_sync_func = model[0].no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads

    if args.moe_routing:
        set_expert_bias(model[0])
    W = ref.gather_full(model[0], "data")
    W.update(expert_biases(model[0]))
    if tied and args.pp > 1:
        assert torch.equal(W["embedding.word_embeddings.weight"], W["output_layer.weight"]), \
            "the tied output-layer copy on the last stage differs from the first stage's embedding"
    Wref = {k: v for k, v in W.items() if not (tied and k == "output_layer.weight")}

    info = DataInfo(prefixes=["unused"], weights=[1.0], valid_prefixes=[], seq_length=SEQ,
                    vocab_size=ref.VOCAB, tokenizer={}, special_ids={"pad": ref.PAD})
    recorder = GradRecorder(model)
    run = loop.Run(config=config, info=info, model=model, optimizer=recorder,
                   scheduler=types.SimpleNamespace(step=lambda increment=1: None),
                   train_stream=[], valid_sets=[], forward_step=None, dp_size=dp, global_batch=0,
                   train_iters=1)
    out = {"tp": args.tp, "pp": args.pp, "dp": dp, "cp": args.cp, "world": world, "tied": tied, "seq": SEQ,
           "ep": ps.get_expert_model_parallel_world_size(),
           "local_experts": sum(".local_experts." in n and n.endswith("linear_fc1.weight")
                                for n, _ in model[0].module.named_parameters()),
           "micro_batch_size": MBS, "setup_s": round(time.time() - t0, 2), "steps": {}}

    def everyone(value):
        """The value of whichever rank(s) have one (not None): list over ranks."""
        vals = [None] * world
        dist.all_gather_object(vals, value)
        return vals

    # the synthetic packs with --micro M micro-batches per step, and "context": packs of agent
    # conversations rendered by the library (weight-0 replies, tool calls and results), 3 micro
    cases = [(str(M), M, 100 + M, single_packs(ref.make_conversation)) for M in args.micro]
    cases.append(("context", 3, 300, single_packs(ref.rendered_conversation)))
    cases.append(("blend", 3, 500, blend_packs))
    if args.cp > 1:
        cases.append(("late_replies", 1, 700, late_reply_packs))
    for name, M, seed, build in cases:
        n_packs = dp * M * MBS
        packs, datasets = build(seed, n_packs)
        # sample index i of the step = pack i; loop.train_step picks this rank's indices
        run.train_stream = [build_sample(*p.triple(), SEQ, ref.PAD) for p in packs]
        run.info.prefixes = BLEND if datasets else ["unused"]
        if datasets:  # a blend: each sample says its dataset, as SampleStream's do
            run.train_stream = [dict(s, dataset=d) for s, d in zip(run.train_stream, datasets)]
        run.global_batch = n_packs
        convs = [c for p in packs for c in p.conversations]
        res = {"packs": n_packs, "conversations": len(convs),
               "turns": sum(len(c.replies) for c in convs),
               "split_samples": sum(len(c.samples()) for c in convs),
               "untrained_replies": sum(c.untrained_replies for c in convs),
               "tool_messages": sum(c.tool_messages for c in convs),
               "reply_lengths": sorted({e - a for c in convs for a, e in c.replies}),
               "padding_tokens": sum(SEQ - len(p) for p in packs)}
        read = []
        orig_micro_batches = loop._micro_batches

        local_loss_tokens = []

        def spy(run_, indices, stream):
            read.append(indices)
            batches = orig_micro_batches(run_, indices, stream)
            local_loss_tokens.append(sum(int(b["loss_mask"].sum()) for b in batches))
            return batches

        loop._micro_batches = spy
        refs = {}
        if rank == 0:
            for norm in NORMS:
                refs[norm] = ref.reference_grads(Wref, convs, norm, mcfg, tied)
            if datasets:
                res["dataset_reference"] = dataset_reference(Wref, packs, datasets, mcfg, tied)
                res["text_pieces"] = sum(len(p.conversations) for p, d in zip(packs, datasets) if d)
                res["cut_pieces"] = sum(c.tokens[-1] != ref.EOT for p, d in zip(packs, datasets)
                                        if d for c in p.conversations)
        base_data = run.config.data
        for norm in NORMS:
            # 'power' through the config, as a run gets it (flatten's weights, the step's scale)
            run.config.data = dataclasses.replace(
                base_data, loss_normalization=norm,
                loss_turn_exponent=ref.POWER_P if norm == "power" else None)
            run.forward_step = pretrain_dialog.make_forward_step(norm)
            run.consumed, run.iteration = 0, 0
            read.clear()
            t = time.time()
            metrics = loop.train_step(run)
            step_s = time.time() - t
            G = recorder.grads
            all_metrics = everyone(metrics)
            reads = everyone((dp_rank, read[0]))
            loss_tokens_by_rank = everyone(local_loss_tokens[-1])
            if rank == 0:
                m = next(x for x in all_metrics if x is not None)
                ref_loss, ref_g = refs[norm]
                e, worst = ref.max_rel_err({k: G[k] for k in ref_g}, ref_g)
                res[f"{norm}_max_rel_err"] = e
                res[f"{norm}_worst_param"] = worst
                res[f"{norm}_step_s"] = round(step_s, 4)
                res[f"{norm}_loss_ref"] = ref_loss
                res[f"{norm}_logged_loss_per_turn"] = m["loss per turn"]
                res[f"{norm}_logged_loss_per_token"] = m["loss per token"]
                res[f"{norm}_logged_turns"] = m["turn_num"]
                res[f"{norm}_logged_power"] = m.get("loss per turn (power)")
                res[f"{norm}_logged_datasets"] = {k: v for k, v in m.items()
                                                  if k.startswith("dataset ")}
                if tied and args.pp > 1:  # the last stage's copy must get the same reduced grad
                    res[f"{norm}_tied_copy_rel_err"] = ref.max_rel_err(
                        {"w": G["output_layer.weight"]},
                        {"w": ref_g["embedding.word_embeddings.weight"]})[0]
                if norm == "token":
                    res["token_vs_turn_baseline_rel_err"] = ref.max_rel_err(
                        {k: G[k] for k in ref_g}, refs["turn"][1])[0]
                by_dp = {}
                for r, idx in reads:
                    by_dp.setdefault(r, idx)
                    assert by_dp[r] == idx, "ranks of one DP group read different packs"
                res["packs_read_by_dp_rank"] = {str(r): v for r, v in sorted(by_dp.items())}
                res["loss_tokens_by_rank"] = loss_tokens_by_rank
        loop._micro_batches = orig_micro_batches
        run.info.prefixes = ["unused"]
        run.config.data = base_data
        assert recorder.steps == len(NORMS) * (len(out["steps"]) + 1)
        out["steps"][name] = res
        if name == str(args.micro[-1]):  # the most micro-batches: kept for check_dispatcher
            kept = (run.train_stream, run.global_batch, refs.get("turn"))

    # ---------------- isolation ----------------
    t = time.time()
    iso_packs = ref.make_packs(seed=7, n_packs=2 * MBS, seq=SEQ)
    samples = [build_sample(*p.triple(), SEQ, ref.PAD) for p in iso_packs]
    device = distributed.device()

    def losses_step(data_iterator, model_):
        batch = next(data_iterator)
        output = model_(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                        packed_seq_params=batch.get("packed_seq_params"))
        return output, lambda o: (o.sum(), torch.tensor(1, dtype=torch.int32, device=o.device),
                                  {"losses": o.detach().float().cpu()})

    fwd = types.SimpleNamespace(model=model, forward_step=losses_step)
    split = context_parallel.layout(config.parallel)

    def forward_losses(batches):
        with torch.no_grad():
            store = loop._run_schedule(fwd, batches, forward_only=True)
        if args.cp > 1:  # each context-parallel rank's part, put back in place
            return [context_parallel.gather_full(s["losses"], b).view(-1)
                    for s, b in zip(store, batches)]
        return [s["losses"].view(-1) for s in store] if is_last else None

    for chunk in model:
        chunk.eval()
    packed = {}
    for isolated in (True, False):
        batches = context_parallel.split_micro_batches(
            [flatten_micro_batch(samples[m * MBS:(m + 1) * MBS], isolated, device)
             for m in range(2)], split)
        packed[isolated] = forward_losses(batches)
    alone = []
    for p in iso_packs:
        for conv in p.conversations:
            toks = torch.tensor(conv.tokens, device=device).view(1, -1)
            one = {"tokens": toks[:, :-1], "labels": toks[:, 1:],
                   "position_ids": torch.arange(toks.size(1) - 1, device=device).view(1, -1)}
            if args.cp > 1:  # a sequence is always split: the reference stands in for it
                alone.append(ref.reference_token_losses(Wref, conv, mcfg, tied) if is_last
                             else None)
                continue
            losses = forward_losses([one])  # plain causal attention, no packed params
            alone.append(losses[0] if is_last else None)
    for chunk in model:
        chunk.train()
    iso = None
    if is_last:
        e_iso, e_causal, e_ref, k = 0.0, 0.0, 0.0, 0
        for pi, p in enumerate(iso_packs):
            m, off = divmod(pi, MBS)
            off *= SEQ
            for conv in p.conversations:
                n = len(conv.tokens) - 1
                la = alone[k]
                e_iso = max(e_iso, float((packed[True][m][off:off + n] - la).abs().max()))
                e_causal = max(e_causal, float((packed[False][m][off:off + n] - la).abs().max()))
                e_ref = max(e_ref, float(
                    (la - ref.reference_token_losses(Wref, conv, mcfg, tied)).abs().max()))
                off += len(conv.tokens)
                k += 1
        iso = {"conversations": k, "max_abs_pack_vs_alone": e_iso,
               "max_abs_alone_vs_reference": e_ref, "max_abs_causal_pack_vs_alone": e_causal}
    iso = next(x for x in everyone(iso) if x is not None)
    iso["seconds"] = round(time.time() - t, 3)
    out["isolation"] = iso
    out["validation"] = check_validation(run, Wref, dp, tied, everyone)
    if args.vpp_micro:
        out["virtual_pipeline"] = check_virtual_pipeline(config, world, args.vpp_micro)
    if args.moe_routing:
        out["routing"] = check_routing(model[0], Wref, mcfg, tied)
    if args.moe:
        out["aux_loss"] = check_aux_loss(run, tconfig, recorder, dp)
        out["other_dispatcher"] = check_dispatcher(run, *kept)
    out["total_s_in_process"] = round(time.time() - t0, 2)
    if rank == 0:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(json.dumps(out), flush=True)
    dist.barrier()


def check_routing(model, Wref, mcfg, tied) -> dict:
    """What the --moe-routing layout holds, and controls: the expert bias is unchanged by the
    steps (update rate 0), and the reference loss without it (or without the shared expert)
    differs from the reference loss with it, so the gradient checks saw both."""
    gpt = model.module
    kinds = [type(layer.mlp).__name__ for layer in gpt.decoder.layers]
    attention = [type(layer.self_attention).__name__ for layer in gpt.decoder.layers]
    now = expert_biases(model)
    unchanged = all(torch.equal(now[k], Wref[k]) for k in now)
    if dist.get_rank() != 0:
        return None
    convs = [c for p in ref.make_packs(seed=9, n_packs=2, seq=SEQ) for c in p.conversations]
    with_all = ref.reference_grads(Wref, convs[:4], "turn", mcfg, tied)[0]
    no_bias = {k: v for k, v in Wref.items() if not k.endswith("expert_bias")}
    no_shared = {k: (v * 0 if ".shared_experts." in k else v) for k, v in Wref.items()}
    return {"layers": kinds, "attention": attention, "expert_bias_keys": sorted(now),
            "bias_unchanged": unchanged,
            "loss_rel_diff_without_bias": abs(
                ref.reference_grads(no_bias, convs[:4], "turn", mcfg, tied)[0] / with_all - 1),
            "loss_rel_diff_without_shared": abs(
                ref.reference_grads(no_shared, convs[:4], "turn", mcfg, tied)[0] / with_all - 1)}


def check_virtual_pipeline(config, world, micro) -> dict:
    """The interleaved schedule: megatron-core's groups rebuilt in this process with 2 model
    chunks per pipeline stage (4 layers), one ``loop.train_step`` over ``micro`` micro-batches
    (more than PP, so that 1F1B's steady state sends activations and gradients both ways in one
    exchange) with the turn-normalized loss vs the split baseline. Collective."""
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    t = time.time()
    par = config.parallel
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, num_layers=4),
        parallel=dataclasses.replace(par, virtual_pipeline_model_parallel_size=2))
    ps.destroy_model_parallel()
    distributed.initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, 2,
                           SEED)
    tconfig = transformer_config(config)
    model = wrap_ddp(build_model_chunks(config, tconfig, ref.VOCAB, SEQ), tconfig, config)
    tconfig.no_sync_func = [chunk.no_sync for chunk in model]
    tconfig.finalize_model_grads_func = finalize_model_grads
    W = ref.gather_chunks(model, "data")
    Wref = {k: v for k, v in W.items() if k != "output_layer.weight"}  # the tied copy
    dp = validate_world(config, world)
    packs = ref.make_packs(seed=700, n_packs=dp * micro * MBS, seq=SEQ)
    info = DataInfo(prefixes=["unused"], weights=[1.0], valid_prefixes=[], seq_length=SEQ,
                    vocab_size=ref.VOCAB, tokenizer={}, special_ids={"pad": ref.PAD})
    recorder = GradRecorder(model)
    run = loop.Run(config=config, info=info, model=model, optimizer=recorder,
                   scheduler=types.SimpleNamespace(step=lambda increment=1: None),
                   train_stream=[build_sample(*p.triple(), SEQ, ref.PAD) for p in packs],
                   valid_sets=[], forward_step=pretrain_dialog.make_forward_step("turn"),
                   dp_size=dp, global_batch=len(packs), train_iters=1)
    metrics = loop.train_step(run)
    logged = [None] * world
    dist.all_gather_object(logged, metrics and (metrics["loss per turn"], metrics["turn_num"]))
    if dist.get_rank() != 0:
        return None
    convs = [c for p in packs for c in p.conversations]
    loss, want = ref.reference_grads(Wref, convs, "turn", config.model, True)
    G = recorder.grads
    err, worst = ref.max_rel_err({k: G[k] for k in want}, want)
    loss_logged, turns_logged = next(x for x in logged if x is not None)
    return {"chunks": len(model), "micro": micro, "batch_p2p_comm": tconfig.batch_p2p_comm,
            "layers": sorted({int(k.split(".")[2]) for k in G if k.startswith("decoder.layers.")}),
            "turns": sum(len(c.replies) for c in convs), "turn_max_rel_err": err,
            "turn_worst_param": worst, "turn_loss_ref": loss,
            "turn_logged_loss_per_turn": loss_logged, "turn_logged_turns": turns_logged,
            "turn_tied_copy_rel_err": ref.max_rel_err(
                {"w": G["output_layer.weight"]},
                {"w": want["embedding.word_embeddings.weight"]})[0],
            "seconds": round(time.time() - t, 2)}


def check_dispatcher(run, stream, global_batch, reference) -> dict:
    """The MoE model built again with the other token dispatcher (alltoall <-> allgather), given
    the same weights, takes one turn-normalized step of the same packs: its gradient against the
    same split baseline (``reference``: (loss, grads) on rank 0). Returns {dispatcher,
    turn_max_rel_err, worst_param} on rank 0, None elsewhere."""
    from dataclasses import replace

    from megatron.core.distributed import finalize_model_grads

    mine = run.config.model.moe_token_dispatcher_type
    other = "allgather" if mine == "alltoall" else "alltoall"
    config = replace(run.config, model=replace(run.config.model, moe_token_dispatcher_type=other))
    tconfig = transformer_config(config)
    tconfig.moe_aux_loss_coeff = 0.0
    model = wrap_ddp(build_model_chunks(config, tconfig, ref.VOCAB, SEQ), tconfig, config)
    tconfig.no_sync_func = model[0].no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    weights = dict(run.model[0].module.named_parameters())
    with torch.no_grad():
        for name, param in model[0].module.named_parameters():
            param.copy_(weights[name])
    recorder = GradRecorder(model)
    other_run = replace(run, config=config, model=model, optimizer=recorder, train_stream=stream,
                        global_batch=global_batch,
                        forward_step=pretrain_dialog.make_forward_step("turn"))
    other_run.consumed, other_run.iteration = 0, 0
    loop.train_step(other_run)
    if dist.get_rank() != 0:
        return None
    dispatchers = {type(m.token_dispatcher).__name__ for m in model[0].module.modules()
                   if hasattr(m, "token_dispatcher")}
    err, worst = ref.max_rel_err({k: recorder.grads[k] for k in reference[1]}, reference[1])
    return {"dispatcher": other, "classes": sorted(dispatchers), "turn_max_rel_err": err,
            "worst_param": worst}


def check_aux_loss(run, tconfig, recorder, dp) -> dict:
    """The load-balancing loss's part of the gradient, ``grad(coeff) - grad(0)``, for one global
    batch of identical packs (so that every micro-batch, whatever its packs, has the same Switch
    loss) split several ways: (turn | token normalization) x (micro-batch size 2, 1 micro-batch
    per rank | size 1, 2 micro-batches | size 1, 4 micro-batches, twice the packs). mt_dialog's
    definition (``training.moe``) makes them all equal; megatron-core's own scale (C / N = 1) is
    run too, as a control: it depends on the normalization. Returns max relative differences
    to the first split (rank 0; None elsewhere)."""
    from dataclasses import replace

    from mt_dialog.training import moe

    pack = ref.make_packs(seed=21, n_packs=1, seq=SEQ)[0]
    sample = build_sample(*pack.triple(), SEQ, ref.PAD)
    base_data, original_scale = run.config.data, moe.set_aux_loss_scale

    def aux_grad(norm, mbs, packs_per_rank):
        run.config.data = replace(base_data, micro_batch_size=mbs, loss_normalization=norm)
        run.forward_step = pretrain_dialog.make_forward_step(norm)
        run.train_stream, run.global_batch = [sample] * (packs_per_rank * dp), packs_per_rank * dp
        grads = []
        for coeff in (run.config.model.moe_aux_loss_coeff, 0.0):
            tconfig.moe_aux_loss_coeff = coeff
            run.consumed, run.iteration = 0, 0
            loop.train_step(run)
            grads.append(recorder.grads)
        return {k: grads[0][k] - grads[1][k] for k in grads[0]}

    splits = {"turn mbs2 x1": ("turn", 2, 2), "token mbs2 x1": ("token", 2, 2),
              "turn mbs1 x2": ("turn", 1, 2), "turn mbs1 x4": ("turn", 1, 4)}
    got = {name: aux_grad(*split) for name, split in splits.items()}
    moe.set_aux_loss_scale = lambda count, tokens: original_scale(1, 1)  # megatron's scale
    try:
        control = {name: aux_grad(*splits[name]) for name in ("turn mbs2 x1", "token mbs2 x1")}
    finally:
        moe.set_aux_loss_scale = original_scale
        run.config.data, tconfig.moe_aux_loss_coeff = base_data, 0.0
    if dist.get_rank() != 0:
        return None
    first = got["turn mbs2 x1"]
    nonzero = {k: v for k, v in first.items() if float(v.norm()) > 0}
    return {"params_with_aux_grad": sorted(nonzero),
            "rel_diff_to_first": {name: ref.max_rel_err({k: g[k] for k in nonzero}, nonzero)[0]
                                  for name, g in got.items()},
            "worst_param": {name: ref.max_rel_err({k: g[k] for k in nonzero}, nonzero)[1]
                            for name, g in got.items()},
            "aux_norms": {k: float(v.norm()) for k, v in nonzero.items()},
            "control_megatron_scale_turn_vs_token": ref.max_rel_err(
                {k: control["token mbs2 x1"][k] for k in nonzero},
                {k: control["turn mbs2 x1"][k] for k in nonzero})[0]}


def reference_validation(Wref, convs, mcfg, tied) -> dict:
    """The per-turn metrics of ``turn_metrics`` computed reply by reply in plain PyTorch: each
    conversation run alone through the reference model, greedy over the real vocabulary."""
    from mt_dialog.data.storage import bucket_names
    from mt_dialog.training.turn_metrics import TURN_INDEX_GROUPS, report_names

    sums = {}
    for conv in convs:
        t = torch.tensor(conv.tokens)
        with torch.no_grad():
            logits = ref.reference_logits(Wref, t[:-1], mcfg, tied)
        ce = torch.nn.functional.cross_entropy(logits, t[1:], reduction="none").double()
        right = (logits[:, :ref.VOCAB].argmax(-1) == t[1:]).double()
        for number, (a, e) in enumerate(conv.replies, start=1):
            n = e - a
            values = {"loss per turn": (float(ce[a - 1:e - 1].mean()), 1),
                      "accuracy": (float(right[a - 1:e - 1].sum()), n),
                      "exact turns": (float(right[a - 1:e - 1].sum() == n), 1)}
            length = next(g for g, edge in zip(bucket_names(EDGES), [*EDGES, 10 ** 9])
                          if n <= edge)
            index = TURN_INDEX_GROUPS[min(number, len(TURN_INDEX_GROUPS)) - 1]
            for prefix in ("", f"reply length {length}: ", f"turn {index}: "):
                for part, (total, count) in values.items():
                    name = prefix + part
                    old = sums.get(name, (0.0, 0))
                    sums[name] = (old[0] + total, old[1] + count)
    return {name: (sums[name][0] / sums[name][1] if sums.get(name, (0, 0))[1] else None)
            for name in report_names(EDGES)}


def greedy_replies(Wref, packs, mcfg, tied) -> None:
    """Rewrite the content of every other reply (and the last token of a few) with the
    reference model's greedy next tokens, so that accuracy and exact turns are neither 0 nor
    1 in every group."""
    k = 0
    for pack in packs:
        for conv in pack.conversations:
            for a, e in conv.replies:
                k += 1
                if k % 2:
                    continue
                for j in range(a, e - 1 if k % 3 else e):  # content (and EOT for some)
                    with torch.no_grad():
                        logits = ref.reference_logits(Wref, torch.tensor(conv.tokens[:j]),
                                                      mcfg, tied)
                    conv.tokens[j] = int(logits[-1, :ref.VOCAB].argmax())


def check_validation(run, Wref, dp, tied, everyone) -> dict:
    """``loop.evaluate`` with ``pretrain_dialog``'s validation forward step on packs of
    conversations (3 per data-parallel rank) vs ``reference_validation``."""
    from mt_dialog.training.turn_metrics import report_names

    packs = ref.make_packs(seed=11, n_packs=3 * dp, seq=SEQ)
    if dist.get_rank() == 0:  # every other reply: the reference's own greedy continuation
        greedy_replies(Wref, packs, run.config.model, tied)
    shared = [packs]
    dist.broadcast_object_list(shared, src=0)
    packs = shared[0]
    run.valid_sets = [[build_sample(*p.triple(), SEQ, ref.PAD) for p in packs]]
    run.eval_forward_step = pretrain_dialog.make_eval_forward_step("turn", EDGES)
    metrics = next((m for m in everyone(loop.evaluate(run)) if m is not None), None)
    if dist.get_rank() != 0:
        return None
    convs = [c for p in packs for c in p.conversations]
    want = reference_validation(Wref, convs, run.config.model, tied)
    got = {name: (None if metrics[name] != metrics[name] else metrics[name])
           for name in report_names(EDGES)}
    return {"turns": sum(len(c.replies) for c in convs), "logged_turns": metrics["turn_num"],
            "metrics": got, "reference": want,
            "group_turns": {k: v for k, v in metrics.items() if k.endswith(": turns")}}


if __name__ == "__main__":
    main()
