"""torchrun worker (2 processes): the attention variants at tensor-parallel size 2, then at
context-parallel size 2.

    torchrun --nproc_per_node 2 tests/training/attention_tp_worker.py OUT.pt CHECKPOINT_DIR

For each variant of ``VARIANTS`` the model is built by the library (``build_model_chunks`` at
TP=2, local layers), its sink logits set from a per-head rule on the global head index, and run on
one pack of two conversations. Rank 0 saves the full weights (``reference.gather_full``), the
gathered logits and the local shapes of ``softmax_offset``, and every rank writes its shards with
``dist_checkpointing`` into CHECKPOINT_DIR/<variant>; the test rebuilds the model at TP=1 from
the gathered weights and from the checkpoint (resharded to TP=1) and compares the logits.
Then the same processes form one context-parallel group (CP=2): each variant's logits of the
pack split over the two ranks (``run_variant_cp``) are compared with TP=1 likewise.
"""

from __future__ import annotations

import os
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.training.reference import gather_full  # noqa: E402

VOCAB = 50
CU = [0, 9, 23]
MLA = dict(multi_latent_attention=True, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4,
           v_head_dim=12, qk_layernorm=True)
VARIANTS = {
    "window+sinks": dict(window_size=[2, 0], window_attn_skip_freq=[2], softmax_type="learnable"),
    "mla-lite": MLA,
    "mla-yarn": dict(MLA, q_lora_rank=12, rope_type="yarn", rotary_scaling_factor=4.0,
                     mscale=0.707, mscale_all_dim=0.707, original_max_position_embeddings=8),
}


def model_config(fields):
    from mt_dialog.training.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                       transformer_impl="local", make_vocab_size_divisible_by=1,
                       init_method_std=0.3, **fields)


def set_sinks(model, tp_rank=0, tp=1):
    """softmax_offset of global head h = (h + 1) * (-1)^h, each rank holding its heads."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("softmax_offset"):
                heads = torch.arange(param.numel() * tp, dtype=torch.float32)
                full = (heads + 1) * (1 - 2 * (heads % 2))
                param.copy_(full.view(tp, -1)[tp_rank])


def packed_logits(model, ids):
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    positions = torch.cat([torch.arange(b - a) for a, b in zip(CU[:-1], CU[1:])])[None]
    with torch.no_grad():
        return model(ids, positions, None,
                     packed_seq_params=packed_seq_params_from_cu_seqlens(torch.tensor(CU)))


def _gather(tensor, dim):
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(tensor) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def run_variant(fields, ids, save_dir):
    from megatron.core import parallel_state as ps

    from mt_dialog.training.config import ParallelConfig
    from mt_dialog.training.model import build_model_chunks, transformer_config
    from mt_dialog.training.saved_run import single_process_config

    config = single_process_config(model_config(fields))
    config.parallel = ParallelConfig(tensor_model_parallel_size=2)
    (model,) = build_model_chunks(config, transformer_config(config), VOCAB, 64)
    model.eval()
    set_sinks(model, ps.get_tensor_model_parallel_rank(), 2)
    logits = _gather(packed_logits(model, ids), dim=-1)
    state = gather_full(model)  # TP shards joined along partition_dim (fc1: stride 2)
    local = [tuple(p.shape) for n, p in model.named_parameters() if n.endswith("softmax_offset")]
    from megatron.core import dist_checkpointing

    os.makedirs(save_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), save_dir)  # resharded by the test
    return {"state": state, "logits": logits, "sink_shapes": local}


def run_variant_cp(fields, ids):
    """The variant at context-parallel size 2: the pack split by the library
    (``split_micro_batches``: 2 x 2 chunks per conversation), the local attention's CP path
    (keys and values all-gathered) and megatron-core's RoPE on each rank's chunks; the logits
    gathered back in place (``gather_full``)."""
    from mt_dialog.training.config import ParallelConfig
    from mt_dialog.training.context_parallel import gather_full, layout, split_micro_batches
    from mt_dialog.training.model import build_model_chunks, transformer_config
    from mt_dialog.training.saved_run import single_process_config

    config = single_process_config(model_config(fields))
    # Transformer Engine runs windows under CP with all-to-all only (config's check)
    config.parallel = ParallelConfig(context_parallel_size=2, cp_comm_type="a2a"
                                     if "window_size" in fields else "p2p")
    (model,) = build_model_chunks(config, transformer_config(config), VOCAB, 64)
    model.eval()
    set_sinks(model)
    positions = torch.cat([torch.arange(b - a) for a, b in zip(CU[:-1], CU[1:])])[None]
    whole = {"tokens": ids, "position_ids": positions, "loss_weights": {},
             "cu_seqlens": torch.tensor(CU, dtype=torch.int32)}
    (part,) = split_micro_batches([whole], layout(config.parallel))
    with torch.no_grad():
        logits = model(part["tokens"], part["position_ids"], None,
                       packed_seq_params=part["packed_seq_params"])
    return {"state": gather_full_state(model), "logits": gather_full(logits, part)}


def gather_full_state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()
            if not name.endswith("_extra_state")}


def main(out, checkpoints):
    from megatron.core import parallel_state as ps

    from mt_dialog.training import distributed

    distributed.initialize(2, 1, seed=11)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, CU[-1]))
    results = {"ids": ids}
    for name, fields in VARIANTS.items():
        results[name] = run_variant(fields, ids, os.path.join(checkpoints, name))
    ps.destroy_model_parallel()  # the same two processes as one context-parallel group
    distributed.initialize(1, 1, seed=11, context_parallel=2)
    results["cp2"] = {name: run_variant_cp(fields, ids) for name, fields in VARIANTS.items()}
    if dist.get_rank() == 0:
        torch.save(results, out)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
