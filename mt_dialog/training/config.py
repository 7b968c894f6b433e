"""Training configuration: one dataclass per concern, each field a Megatron-style flag.

``ModelConfig`` (--num-layers ...), ``ParallelConfig`` (--tensor-model-parallel-size ...),
``DataConfig`` (--data-path, --micro-batch-size, --global-batch-size ...), ``OptimConfig``
(--lr, --min-lr, --lr-decay-style ...), ``TrainConfig`` (--train-iters, --save, --load ...).
Each validates its own fields in ``__post_init__``; ``validate_world`` checks the combination
against the world size before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from mt_dialog.config_utils import option
from mt_dialog.training.loss import NORMALIZATIONS


def _positive(name: str, value: Optional[float], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")


@dataclass
class ModelConfig:
    """Llama-style GPT (RMSNorm, SwiGLU, RoPE, grouped-query attention) on megatron-core."""

    num_layers: int = option(2, help="transformer layers")
    hidden_size: int = option(64, help="hidden size")
    ffn_hidden_size: Optional[int] = option(None, help="SwiGLU inner size (default: the Llama "
                                            "rule, 8/3 x hidden rounded up to a multiple of 64)")
    num_attention_heads: int = option(4, help="attention heads")
    num_query_groups: Optional[int] = option(None, help="key/value groups for grouped-query "
                                             "attention (default: one per head)")
    kv_channels: Optional[int] = option(None, help="attention head size (default: hidden size "
                                        "/ attention heads)")
    rotary_base: float = option(10000.0, help="RoPE base")
    use_rope_scaling: bool = option(False, help="Llama 3.1-style RoPE frequency scaling "
                                    "(--rope-scaling-* below)")
    rope_scaling_factor: float = option(8.0, help="with --use-rope-scaling: divide the low "
                                        "frequencies by this")
    rope_scaling_low_freq_factor: float = option(1.0, help="with --use-rope-scaling: "
                                                 "wavelengths above original / this are scaled")
    rope_scaling_high_freq_factor: float = option(4.0, help="with --use-rope-scaling: "
                                                  "wavelengths below original / this are kept")
    rope_scaling_original_max_position: int = option(8192, help="with --use-rope-scaling: "
                                                     "the context length of pretraining")
    rotary_seq_len_interpolation_factor: Optional[float] = option(
        None, help="linear RoPE position interpolation: positions are divided by this")
    norm_epsilon: float = option(1e-5, help="RMSNorm epsilon")
    untie_embeddings_and_output_weights: bool = option(False, help="separate output layer "
                                                       "instead of the input embedding")
    add_qkv_bias: bool = option(False, help="bias on the QKV projection (Qwen2)")
    init_method_std: float = option(0.02, help="std of the normal weight initialization")
    make_vocab_size_divisible_by: int = option(128, help="pad the vocabulary to a multiple of "
                                               "this times the tensor-parallel size")
    transformer_impl: str = option("auto", choices=("auto", "local", "transformer_engine"),
                                   help="layer implementation: transformer_engine (CUDA + TE), "
                                   "local (megatron-core's torch layers), auto picks TE when usable")
    packed_attention: str = option("isolated", choices=("isolated", "causal"),
                                   help="isolated: conversations in a pack never attend to each "
                                   "other and positions restart; causal: one causal mask over "
                                   "the pack (for comparison)")
    recompute_activations: bool = option(False, help="recompute attention in backward "
                                         "(selective) to save memory")

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "rotary_base",
                     "norm_epsilon", "init_method_std", "make_vocab_size_divisible_by",
                     "rope_scaling_factor", "rope_scaling_low_freq_factor",
                     "rope_scaling_original_max_position"):
            _positive(name, getattr(self, name))
        for name in ("ffn_hidden_size", "kv_channels", "rotary_seq_len_interpolation_factor"):
            _positive(name, getattr(self, name), allow_none=True)
        if self.rope_scaling_high_freq_factor <= self.rope_scaling_low_freq_factor:
            raise ValueError(f"rope_scaling_high_freq_factor: {self.rope_scaling_high_freq_factor}"
                             f" must exceed rope_scaling_low_freq_factor "
                             f"{self.rope_scaling_low_freq_factor}")
        if self.use_rope_scaling and self.rotary_seq_len_interpolation_factor:
            raise ValueError("rotary_seq_len_interpolation_factor: give either it (linear "
                             "scaling) or --use-rope-scaling (Llama 3.1 scaling), not both")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size: {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        groups = self.query_groups
        if groups <= 0 or self.num_attention_heads % groups:
            raise ValueError(f"num_query_groups: {groups} must divide num_attention_heads "
                             f"{self.num_attention_heads}")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return -(-int(8 * self.hidden_size / 3) // 64) * 64


@dataclass
class ParallelConfig:
    """How the model and the batch are split over processes."""

    tensor_model_parallel_size: int = option(1, help="tensor-parallel size (TP)")
    pipeline_model_parallel_size: int = option(1, help="pipeline-parallel size (PP)")
    virtual_pipeline_model_parallel_size: Optional[int] = option(
        None, help="model chunks per pipeline rank (interleaved schedule)")
    sequence_parallel: bool = option(False, help="sequence parallelism with TP (needs the "
                                     "Transformer Engine layers)")
    context_parallel_size: int = option(1, help="context parallelism; only 1 is supported")
    use_distributed_optimizer: bool = option(False, help="shard optimizer state over data "
                                             "parallel ranks")

    def __post_init__(self) -> None:
        _positive("tensor_model_parallel_size", self.tensor_model_parallel_size)
        _positive("pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        _positive("virtual_pipeline_model_parallel_size",
                  self.virtual_pipeline_model_parallel_size, allow_none=True)
        if self.context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size: {self.context_parallel_size} is not supported: the "
                "turn-normalized loss needs each turn counted once, before the sequence split, "
                "which this version does not implement; use --context-parallel-size 1 and more "
                "tensor/pipeline parallelism for long sequences")
        if self.virtual_pipeline_model_parallel_size and self.pipeline_model_parallel_size < 2:
            raise ValueError("virtual_pipeline_model_parallel_size: needs "
                             "--pipeline-model-parallel-size 2 or more")


@dataclass
class DataConfig:
    """Which packed datasets are read, and how they are batched."""

    data_path: List[str] = option(help="packed dataset prefix(es) from tools/preprocess_dialog.py;"
                                  " with weights to blend: 0.7 A 0.3 B", metavar="PATH")
    valid_data_path: List[str] = option([], help="validation dataset prefix(es) (default: the "
                                        "'valid' split of --data-path)", metavar="PATH")
    seq_length: Optional[int] = option(None, help="tokens per pack (default: the datasets'; "
                                       "must match them)")
    micro_batch_size: int = option(1, help="packs per micro-batch on one data-parallel rank")
    global_batch_size: Optional[int] = option(None, help="packs per step over all data-parallel "
                                              "ranks (default: micro-batch size x DP); "
                                              "micro-batches per step = GBS / (MBS x DP)")
    loss_normalization: str = option("turn", choices=NORMALIZATIONS,
                                     help="turn: every assistant turn in the global batch counts "
                                     "equally; token: global token mean; conversation: mean of "
                                     "conversations' token means")

    def __post_init__(self) -> None:
        self.blend()  # validates --data-path
        _positive("micro_batch_size", self.micro_batch_size)
        _positive("global_batch_size", self.global_batch_size, allow_none=True)
        _positive("seq_length", self.seq_length, allow_none=True)
        if self.loss_normalization not in NORMALIZATIONS:
            raise ValueError(f"loss_normalization: {self.loss_normalization!r} is not one of "
                             f"{', '.join(NORMALIZATIONS)}")

    def blend(self) -> Tuple[List[str], List[float]]:
        """(prefixes, weights) of --data-path: ``A B`` (equal weights) or ``0.7 A 0.3 B``."""
        items = list(self.data_path)
        if not items:
            raise ValueError("data_path: at least one dataset prefix is needed")
        try:
            float(items[0])
        except ValueError:
            return items, [1.0] * len(items)
        if len(items) % 2:
            raise ValueError(f"data_path: weighted form needs WEIGHT PREFIX pairs, got {items}")
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            raise ValueError(f"data_path: weighted form needs WEIGHT PREFIX pairs, got {items}") from None
        if min(weights) <= 0:
            raise ValueError(f"data_path: weights must be positive, got {weights}")
        return items[1::2], weights


@dataclass
class OptimConfig:
    """Adam(W), learning-rate schedule, gradient clipping."""

    lr: float = option(3e-4, help="peak learning rate")
    min_lr: float = option(0.0, help="learning rate at the end of the decay")
    lr_warmup_iters: int = option(0, help="linear warmup iterations")
    lr_decay_style: str = option("cosine", choices=("cosine", "linear", "constant"),
                                 help="decay after warmup")
    lr_decay_iters: Optional[int] = option(None, help="iterations of warmup + decay (default: "
                                           "--train-iters)")
    weight_decay: float = option(0.01, help="decoupled weight decay (AdamW)")
    adam_beta1: float = option(0.9, help="Adam beta1")
    adam_beta2: float = option(0.95, help="Adam beta2")
    adam_eps: float = option(1e-8, help="Adam epsilon")
    clip_grad: float = option(1.0, help="clip the global gradient norm to this (0: off)")
    bf16: bool = option(False, help="bf16 mixed precision (GPU); CPU runs in fp32")

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: must be in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("lr_warmup_iters", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        _positive("lr_decay_iters", self.lr_decay_iters, allow_none=True)


@dataclass
class TrainConfig:
    """Length of the run, evaluation, logging and checkpoints."""

    train_iters: Optional[int] = option(None, help="optimizer steps to run")
    train_epochs: Optional[float] = option(None, help="or: passes over the training packs "
                                           "(converted to steps)")
    seed: int = option(1234, help="seed of weights, data order and dropout")
    log_interval: int = option(10, help="iterations between log lines")
    eval_interval: Optional[int] = option(None, help="iterations between validation runs")
    eval_iters: Optional[int] = option(None, help="validation steps per run (default: the "
                                       "whole validation set)")
    save: Optional[str] = option(None, help="checkpoint folder to save to")
    save_interval: Optional[int] = option(None, help="iterations between checkpoints (a final "
                                          "one is always saved with --save)")
    load: Optional[str] = option(None, help="checkpoint folder to resume from (model, "
                                 "optimizer, scheduler, data position, RNG)")
    finetune: bool = option(False, help="with --load: take the weights only, start at iteration 0")
    use_checkpoint_args: bool = option(False, help="with --load: take the model flags "
                                       "(layers, sizes, heads, RoPE, norm) from the checkpoint")
    tensorboard_dir: Optional[str] = option(None, help="write TensorBoard scalars here")

    def __post_init__(self) -> None:
        if (self.train_iters is None) == (self.train_epochs is None):
            raise ValueError("train_iters: give exactly one of --train-iters and --train-epochs")
        _positive("train_iters", self.train_iters, allow_none=True)
        _positive("train_epochs", self.train_epochs, allow_none=True)
        _positive("log_interval", self.log_interval)
        for name in ("eval_interval", "eval_iters", "save_interval"):
            _positive(name, getattr(self, name), allow_none=True)
        if self.finetune and not self.load:
            raise ValueError("finetune: --finetune needs --load CHECKPOINT")
        if self.use_checkpoint_args and not self.load:
            raise ValueError("use_checkpoint_args: --use-checkpoint-args needs --load CHECKPOINT")


@dataclass
class DialogTrainingConfig:
    """Everything one training run needs."""

    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig


def validate_world(config: DialogTrainingConfig, world_size: int) -> int:
    """Check the parallel layout against ``world_size``; returns the data-parallel size."""
    par, data, model = config.parallel, config.data, config.model
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor x pipeline parallel "
            f"{par.tensor_model_parallel_size} x {par.pipeline_model_parallel_size}; launch a "
            f"multiple of {model_parallel} processes or change the parallel sizes")
    dp = world_size // model_parallel
    gbs = data.global_batch_size or data.micro_batch_size * dp
    if gbs % (data.micro_batch_size * dp):
        raise ValueError(
            f"global_batch_size: {gbs} is not divisible by micro-batch size x data-parallel size "
            f"= {data.micro_batch_size} x {dp}; use a multiple of {data.micro_batch_size * dp}")
    if model.num_attention_heads % par.tensor_model_parallel_size or (
            model.query_groups % par.tensor_model_parallel_size
            and par.tensor_model_parallel_size % model.query_groups):
        raise ValueError(
            f"tensor_model_parallel_size: {par.tensor_model_parallel_size} must divide the "
            f"{model.num_attention_heads} attention heads and the {model.query_groups} query groups")
    layers_per_stage = par.pipeline_model_parallel_size * (par.virtual_pipeline_model_parallel_size or 1)
    if model.num_layers % layers_per_stage:
        raise ValueError(
            f"num_layers: {model.num_layers} layers cannot be split evenly over "
            f"{layers_per_stage} pipeline chunks")
    return dp
